"""Smoke tests that use each real service: Ray (ray job submit), SLURM (submitit). S3 is in test_storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def _json_block(text: str) -> dict:
    """The JSON object `python -m ocr_cluster.envinfo` printed, out of a log with other lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return json.loads("\n".join(lines[start:end + 1]))


@pytest.mark.ray
def test_ray_job_submit_runs_a_package_module(ray_cluster):
    env = {**os.environ, **ray_cluster.env}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
         "--", "python", "-m", "ocr_cluster.envinfo", "--ray"],
        capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    report = _json_block(result.stdout)
    cluster = report["ray_cluster"]
    assert cluster["local_cluster"] is False  # it joined the test head, not a new cluster
    assert cluster["resources"]["CPU"] == 4.0  # logical: 2 train workers + Ray Data tasks
    assert cluster["resources"]["object_store_memory"] <= 512 * 1024**2  # the cap held
    assert cluster["task"]["pid"] != report["pid"]  # the task ran in a Ray worker process
    assert cluster["task"]["ocr_cluster"] == report["ocr_cluster"]


@pytest.mark.ray
def test_ray_head_refuses_a_wrong_token(ray_cluster):
    env = {**os.environ, **ray_cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    result = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_cluster.dashboard_url],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "403" in result.stdout + result.stderr or "Forbidden" in result.stdout + result.stderr


@pytest.mark.slurm
def test_submitit_job_on_slurm_imports_the_package(slurm, tmp_path):
    import submitit

    from ocr_cluster import envinfo

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition=slurm.partition, cpus_per_task=1,
                               name="ocr-cluster-smoke")
    job = executor.submit(envinfo.report)
    report = job.result()
    assert report["slurm_job_id"] == str(job.job_id)
    assert report["pid"] != os.getpid()
    assert report["executable"] == sys.executable
    squeue = subprocess.run(["squeue", "-h", "-j", str(job.job_id)], capture_output=True, text=True)
    assert squeue.returncode in (0, 1)  # the job is gone or finishing, never stuck


@pytest.mark.slurm
def test_slurm_has_two_nodes_on_their_own_loopback_addresses(slurm, tmp_path):
    """Two slurmd (multiple-slurmd build) in one partition: a two-node step runs one task on each, and each
    node's NodeAddr, as a multi-node cell resolves it, is a loopback address of its own."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    assert any(line.split("=")[0].strip() == "MULTIPLE_SLURMD" and line.split("=")[1].strip() == "Yes"
               for line in config.splitlines() if "=" in line)
    probe = ("from ocr_cluster.sweep.multinode import node_ip; import os; "
             "print(os.environ['SLURM_PROCID'], os.environ['SLURMD_NODENAME'], node_ip())")
    out = subprocess.run(["srun", "-N2", "-n2", "-p", slurm.partition, "-t", "2", sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:2]) == ["0 n1 127.0.0.2", "1 n2 127.0.0.3"], out.stdout
