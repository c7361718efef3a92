"""Ray Tune inside one SLURM allocation (`sweep launch --backend slurm-ray`) on the real SLURM cluster, with
data, checkpoints and results on the S3 endpoint: the grid's cells run as trials of one Tune experiment on
the allocation's private Ray cluster, the rows name the SLURM job, status and a relaunch see them."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from test_sweep_slurm import (SECRET, attempts, cluster, files_text, launch, states, submitted, sweep,  # noqa: F401
                              tiny_synth, write_grid)

pytestmark = [pytest.mark.slurm, pytest.mark.s3, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def synth_uri(_s3_service):
    return tiny_synth(_s3_service, "sweep-allocation")


def _wait_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=120)
        if queued.returncode == 0 and not queued.stdout.strip():
            return
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout:.0f}s"
        time.sleep(3)


def test_cells_run_as_tune_trials_in_one_allocation(cluster, s3, synth_uri, cli, tmp_path):
    root = s3.url("alloc")
    store = f"{root}/results"
    folder = tmp_path / "submitit"
    missing = f"s3://{s3.bucket}/no-such-dataset"
    bad = {"model.head": "fcn", "schedule.iters": 4, "set": {"data.uri": missing}}
    grid = write_grid(tmp_path / "alloc.yaml", root, synth_uri, cluster, iters=(4, 6), name="alloc", include=[bad])
    with_trials = grid.read_text() + "  ray: {max_concurrent_trials: 1}\n"
    grid.write_text(with_trials)
    # The run ids are the ones `sweep plan` (and so the SLURM arrays and `ray job submit`) use.
    plan = {r["name"]: r["run_id"] for r in map(json.loads, sweep(cli, "plan", grid, "--json").stdout.splitlines())}

    dry = sweep(cli, "launch", grid, "--backend", "slurm-ray", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would submit 3 of 3 cells as one SLURM job hosting Ray Tune" in dry.stdout

    first = launch(cli, grid, folder, "--backend", "slurm-ray")
    assert first.returncode == 0, first.stdout + first.stderr
    jobs = submitted(first.stdout)
    assert set(jobs) == set(plan.values()) and len(set(jobs.values())) == 1, first.stdout  # one job, all cells
    job_id = next(iter(jobs.values()))
    assert "_" not in job_id  # a plain job, not an array task
    _wait_gone(job_id, timeout=600)

    log = files_text(folder)
    cells = states(cli, grid)
    failed = cells.pop("fcn_hr18s_1xb2-4_synthetic-64x64")
    assert {c["state"] for c in cells.values()} == {"completed"}, (cells, log[-4000:])
    assert failed["state"] == "failed" and failed["detail"].startswith(f"no manifest at {missing}"), failed
    assert "sweep alloc: 3 cell(s) on one Ray cluster as SLURM job" in log
    assert "Tune experiment" in log
    rows = {r["run_id"]: r for r in attempts(store)}
    assert sorted(rows) == sorted(jobs), rows
    for name, run_id in plan.items():
        status = "failed" if run_id == failed["run_id"] else "completed"
        row = rows[run_id]
        assert (row["status"], row["sweep"], row["launcher"], row["scheduler_job_id"]) == \
            (status, "alloc", "slurm-tune", job_id), row
    assert rows[failed["run_id"]]["error"] == failed["detail"]  # the trial's preflight line

    write_grid(grid, root, synth_uri, cluster, iters=(4, 6), name="alloc")  # the bad cell dropped
    again = launch(cli, grid, folder, "--backend", "slurm-ray")
    assert again.returncode == 0 and "nothing to submit (2 completed" in again.stdout, again.stdout + again.stderr

    # Nothing left: the allocation's Ray (its temp dir) is gone, and no credential reached a file.
    temp_dirs = set(re.findall(r"temp dir (/tmp/ocr[sn]_\w+)", log))
    assert temp_dirs and not any(Path(d).exists() for d in temp_dirs), temp_dirs
    assert SECRET not in log
    from ocr_cluster.sweep import records

    assert SECRET not in str(records.read_records(store, "alloc"))
