"""Nothing left behind: `scripts/services.py up` stopped by a signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import services  # scripts/services.py, on sys.path through conftest

REPO = Path(__file__).resolve().parents[1]


def _read_json(stream) -> dict:
    """The JSON object `services.py up` prints (its lines up to the closing brace)."""
    lines = []
    for line in stream:
        lines.append(line)
        if line.rstrip() == "}":
            return json.loads("".join(lines))
    raise AssertionError(f"services.py exited before printing its environment: {''.join(lines)}")


@pytest.mark.s3
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_services_up_cleans_up_on_a_signal(sig):
    if not (services.VENV_BIN / "moto_server").exists():
        pytest.skip("no moto_server in this environment")
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "services.py"), "up", "s3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = {}
    try:
        started = _read_json(proc.stdout)
        (moto,) = started["pids"]
        workdir = Path(started["workdir"])
        assert Path(f"/proc/{moto}").exists() and workdir.is_dir()
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        moto_outlived, workdir_left = services._alive(moto), workdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if started:  # whatever the outcome, leave nothing behind ourselves
            services.Service("s3", {}, started["pids"], Path(started["workdir"])).stop()
    assert not moto_outlived, f"moto (pid {moto}) outlived services.py"
    assert not workdir_left
