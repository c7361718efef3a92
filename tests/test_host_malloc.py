"""train/host.py: with its malloc thresholds a CPU forward/backward reuses freed activations instead of
page-faulting them in again every step; users' own malloc settings are left alone.

Each case runs in a fresh interpreter: mallopt changes the process for good, and glibc's dynamic
threshold depends on everything the process freed before.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from ocr_cluster.train import host
print("applied", host.keep_freed_memory() if sys.argv[1] == "on" else None)
net = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)])
x = torch.randn(1, 16, 256, 256)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("faults", *faults)
"""


def _run(mode: str, **env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120,
                            env={**clean, **env})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    return lines["applied"], [int(n) for n in lines["faults"].split()]


def test_steps_stop_faulting_with_the_thresholds():
    applied, faults = _run("on")
    assert applied == "True"
    # the first steps grow the heap; then a step reuses it: 0 fresh pages (glibc's defaults: 10000+, below)
    assert statistics.median(faults[2:]) < 300, faults
    _, default_faults = _run("off")
    assert statistics.median(default_faults[2:]) > 2000, default_faults  # what the setting is for; else this test proves nothing


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}])
def test_users_own_malloc_settings_win(env):
    applied, _ = _run("on", **env)
    assert applied == "False"
