"""The Ray Tune backend on the real session Ray head: `sweep launch --backend ray` submits one Ray job that
runs one Tune trial per cell; stopping it mid-way (`sweep cancel` = stop the Ray job) and launching again
restores the experiment and finishes every cell once, a cell added to the grid since included; a third
launch submits nothing. Data, checkpoints, results and Tune's experiment state live on the moto S3
endpoint; the shared head has no credentials, so the launch passes them (--with-secrets). Cells are tiny
(HRNetV2-W18-Small, 64x64, one CPU worker, a few iterations). The waits are generous: on a 2-core machine
shared with other Ray tests a trial's actor can take minutes to start.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_sweep_slurm import tiny_synth

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def synth_uri(_s3_service):
    """A tiny synthetic dataset on the S3 endpoint, shared by this module's tests."""
    return tiny_synth(_s3_service, "sweep-tune")


def write_grid(path: Path, root: str, synth_uri: str, address: str, iters: list[int], name: str) -> Path:
    """A grid whose default backend is Ray; its SLURM section is there too (the same file runs on both)."""
    body = {
        "name": name,
        "base": str(REPO / "jobs" / "quickstart.yaml"),
        "set": {
            "data": {"uri": synth_uri, "crop_size": "64x64", "scale": "64x64", "batch_size": 2},
            "schedule": {"checkpoint_interval": 2, "log_interval": 2},
            "evaluation": {"interval": 100, "fps_images": 4},
            "cluster": {"num_workers": 1},
            "storage": {"checkpoint_uri": f"{root}/runs"},
            "results": {"store_uri": f"{root}/results"},
        },
        "axes": {"model.head": ["ocr"], "schedule.iters": iters},
        "backend": {"default": "ray", "slurm": {"gpus_per_node": 0, "time": "20:00"},
                    "ray": {"address": address, "max_concurrent_trials": 2}},
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def sweep(cli, action: str, grid: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return cli("sweep", action, str(grid), *extra, timeout=timeout)


def states(cli, grid: Path) -> dict[str, dict]:
    out = sweep(cli, "status", grid, "--json", timeout=120)
    return {row["run_id"]: row for row in map(json.loads, out.stdout.splitlines())}


def rows(store: str) -> list[dict]:
    from ocr_cluster.results import read_attempts

    return read_attempts(store).drop_columns(["iou_per_class"]).to_pylist()


def job_id_of(output: str) -> str:
    return next(line.split()[0] for line in output.splitlines() if line.startswith("  ocr-sweep-"))


def job_status(ray_cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(job_id).value)


def job_logs(ray_cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_cluster.dashboard_url).get_job_logs(job_id)


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_tune_sweep_stop_relaunch_restores_and_trains_each_cell_once(ray_cluster, s3, synth_uri, cli, tmp_path,
                                                                     monkeypatch):
    from ocr_cluster.sweep.status import progress

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the grid's backend.ray.address names the cluster
    root = s3.url("tune")
    store = f"{root}/results"
    grid = write_grid(tmp_path / "tiny.yaml", root, synth_uri, ray_cluster.dashboard_url, [24, 6, 4], "tiny-tune")

    first = sweep(cli, "launch", grid, "--with-secrets", timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    job1 = job_id_of(first.stdout)
    assert "as Ray job" in first.stdout

    plan = cli("sweep", "plan", str(grid), "--json", timeout=120)
    planned = {row["run_id"]: row for row in map(json.loads, plan.stdout.splitlines())}
    assert len(planned) == 3

    # Stop the sweep (`sweep cancel` = stop its Ray job) once the long cell has a checkpoint.
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import prepare

    cells = prepare(load(grid), None)

    def some_checkpoint():
        state = job_status(ray_cluster, job1)
        if state not in ("PENDING", "RUNNING"):
            pytest.fail(f"the sweep's job ended ({state}) before it was stopped:\n{job_logs(ray_cluster, job1)[-4000:]}")
        return progress(cells[0].config, cells[0].run_id)[0] > 0  # the 24-iteration cell is mid-way

    assert cells[0].config.schedule.iters == 24

    wait_for(some_checkpoint, 600, "a cell's first checkpoint")
    cancel = sweep(cli, "cancel", grid, timeout=120)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert job1 in cancel.stdout
    wait_for(lambda: job_status(ray_cluster, job1) == "STOPPED", 120, "the stopped Ray job")
    stopped = states(cli, grid)
    done_before = {run_id for run_id, r in stopped.items() if r["state"] == "completed"}
    assert len(done_before) < 3, stopped
    assert {r["state"] for r in stopped.values()} <= {"completed", "cancelled"}, stopped

    # A cell added since the first launch; the relaunch restores the experiment and trains the new cell.
    write_grid(grid, root, synth_uri, ray_cluster.dashboard_url, [24, 6, 4, 2], "tiny-tune")
    second = sweep(cli, "launch", grid, "--with-secrets", "--wait", "--interval", "3", timeout=1200)
    log2 = job_logs(ray_cluster, job_id_of(second.stdout))
    assert second.returncode == 0, second.stdout + second.stderr + log2[-4000:]
    job2 = job_id_of(second.stdout)
    assert "restoring Tune experiment" in log2, log2[-4000:]
    assert "resuming from iteration" in log2, log2[-4000:]  # the 24-iteration cell, cut off mid-way
    wait_for(lambda: job_status(ray_cluster, job2) == "SUCCEEDED", 300, "the relaunched job's end")

    all_rows = rows(store)
    completed = [r for r in all_rows if r["status"] == "completed"]
    final = states(cli, grid)
    assert sorted(r["run_id"] for r in completed) == sorted(final), all_rows
    assert all(r["state"] == "completed" for r in final.values()), final
    assert len(completed) == 4 and len({r["run_id"] for r in completed}) == 4
    assert set(planned) < {r["run_id"] for r in completed}  # the ids `sweep plan` gives, as SLURM uses
    for row in completed:
        assert row["sweep"] == "tiny-tune" and row["launcher"] == "tune", row
        assert row["scheduler_job_id"] == (job1 if row["run_id"] in done_before else job2), row

    third = sweep(cli, "launch", grid, "--with-secrets", timeout=180)
    assert third.returncode == 0 and "nothing to submit" in third.stdout, third.stdout + third.stderr
    assert len(rows(store)) == len(all_rows)  # nothing trained again
    foreground = cli(str(grid), module="ocr_cluster.sweep.tune", timeout=180)  # the `ray job submit` entrypoint
    assert foreground.returncode == 0 and "nothing to train" in foreground.stdout, foreground.stdout + foreground.stderr

    from ocr_cluster.sweep import records as launch_records

    for record in launch_records.read_records(store, "tiny-tune"):
        text = json.dumps(record)
        assert ray_cluster.env["RAY_AUTH_TOKEN"] not in text and s3.env["AWS_SECRET_ACCESS_KEY"] not in text
        if record["kind"] == "launch":
            assert record["backend_kind"] == "ray" and record["address"] == ray_cluster.dashboard_url


def test_ray_backend_without_a_cluster_is_one_line(tmp_path, cli, monkeypatch, synth_uri, s3):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    grid = write_grid(tmp_path / "g.yaml", s3.url("none"), synth_uri, "", [2], "no-cluster")
    out = sweep(cli, "launch", grid, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no Ray cluster for --backend ray" in out.stderr and len(out.stderr.strip().splitlines()) == 1
