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


def tiny_settings(root: str, synth_uri: str, eval_interval: int) -> dict:
    """The grid's `set`: tiny one-worker cells on the S3 shards, runs and rows under `root`."""
    return {
        "data": {"uri": synth_uri, "crop_size": "64x64", "scale": "64x64", "batch_size": 2},
        "schedule": {"checkpoint_interval": 2, "log_interval": 2},
        "evaluation": {"interval": eval_interval, "fps_images": 4},
        "cluster": {"num_workers": 1},
        "storage": {"checkpoint_uri": f"{root}/runs"},
        "results": {"store_uri": f"{root}/results"},
    }


def write_grid(path: Path, root: str, synth_uri: str, address: str, iters: list[int], name: str) -> Path:
    """A grid whose default backend is Ray; its SLURM section is there too (the same file runs on both)."""
    body = {
        "name": name,
        "base": str(REPO / "jobs" / "quickstart.yaml"),
        "set": tiny_settings(root, synth_uri, eval_interval=100),
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


def dashboard_up(ray_cluster) -> bool:
    """The head's job API answers (a head just started on a loaded machine can take minutes)."""
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


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


def test_early_stopping_stops_a_hopeless_cell_with_its_own_row(ray_cluster, s3, synth_uri, cli, tmp_path,
                                                               monkeypatch):
    """ASHA on the eval mIoU (backend.ray.early_stopping), one trial at a time: the good cell (lr 0.01: the
    dominant class, mIoU ~20 at iteration 2) reaches the first rung first; the hopeless one (lr 1e-9: the
    initial model, mIoU ~2) is stopped there, at iteration 2 of 40. Its trial ends without an error, its
    checkpoint stays, its row says stopped (never completed); status, reconcile and a relaunch agree."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = s3.url("asha")
    store = f"{root}/results"
    body = {
        "name": "tiny-asha",
        "base": str(REPO / "jobs" / "quickstart.yaml"),
        "set": tiny_settings(root, synth_uri, eval_interval=2),
        "axes": {"cell": {"good": {"schedule.iters": 4},
                          "hopeless": {"schedule.iters": 40, "optimizer.lr": 1.0e-9}}},
        "backend": {"default": "ray",
                    "ray": {"address": ray_cluster.dashboard_url, "max_concurrent_trials": 1,
                            "early_stopping": {"grace_period": 2, "reduction_factor": 2}}},
    }
    grid = tmp_path / "asha.yaml"
    grid.write_text(yaml.safe_dump(body, sort_keys=False))
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import prepare
    from ocr_cluster.sweep.status import progress

    good, hopeless = prepare(load(grid), None)
    assert hopeless.config.schedule.iters == 40 and hopeless.config.optimizer.lr == 1e-9

    wait_for(lambda: dashboard_up(ray_cluster), 600, "the Ray head's job API", interval=5)
    first = sweep(cli, "launch", grid, "--with-secrets", "--wait", "--interval", "3", timeout=900)
    assert "as Ray job" in first.stdout, first.stdout + first.stderr
    job = job_id_of(first.stdout)
    log = job_logs(ray_cluster, job)
    (tmp_path / "job.log").write_text(log)
    assert first.returncode == 0, first.stdout + first.stderr + log[-4000:]
    wait_for(lambda: job_status(ray_cluster, job) == "SUCCEEDED", 300, "the sweep job's end")
    log = job_logs(ray_cluster, job)
    (tmp_path / "job.log").write_text(log)  # kept with a failed test's tmp_path
    assert "early stopping (ASHA on eval mIoU: grace_period 2, reduction_factor 2)" in log, log[-4000:]
    assert "1 stopped early" in log, log[-4000:]

    by_run: dict[str, list[dict]] = {}
    for row in rows(store):
        by_run.setdefault(row["run_id"], []).append(row)
    assert [r["status"] for r in by_run[good.run_id]] == ["completed"], by_run
    assert by_run[good.run_id][0]["iters_done"] == 4
    stopped = by_run[hopeless.run_id]
    assert [r["status"] for r in stopped] == ["stopped"], stopped  # and never a completed row
    row = stopped[0]
    assert row["iters_done"] == 2 < row["iters"] == 40, row
    assert row["miou"] is not None and row["miou"] < by_run[good.run_id][0]["miou"], row
    assert "stopped early by ASHA at iteration 2 of 40" in row["error"], row
    assert row["launcher"] == "tune" and row["scheduler_job_id"] == job and row["sweep"] == "tiny-asha", row
    assert progress(hopeless.config, hopeless.run_id)[0] >= 2  # its checkpoint stays

    final = states(cli, grid)
    assert final[good.run_id]["state"] == "completed", final
    assert final[hopeless.run_id]["state"] == "stopped", final
    assert "stopped early at iter 2/40" in final[hopeless.run_id]["detail"], final
    shown = sweep(cli, "status", grid, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr  # every cell ended: completed or kept stopped
    assert "stopped" in shown.stdout

    report = cli("results", "reconcile", "--store", store, "--sweep", "tiny-asha", timeout=120)
    assert "1/2 completed" in report.stdout and "1 stopped early" in report.stdout, report.stdout + report.stderr
    assert f"stopped     {hopeless.run_id}" in report.stdout, report.stdout

    again = sweep(cli, "launch", grid, "--with-secrets", timeout=180)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr
    assert "1 stopped early" in again.stdout, again.stdout
    rerun = sweep(cli, "launch", grid, "--rerun-stopped", "--dry-run", timeout=180)
    assert rerun.returncode == 0 and "would submit 1 of 2" in rerun.stdout and hopeless.run_id in rerun.stdout, \
        rerun.stdout + rerun.stderr
    assert len(rows(store)) == 2  # nothing trained again


def test_asha_settings_follow_the_cells(tmp_path):
    """Offline: ASHA's clock is the iteration; grace_period 0 = the first evaluation every cell reports (one
    that falls on a checkpoint); max_t past the longest cell; a cell with no such evaluation is named."""
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.tune import asha_settings

    body = {"base": str(REPO / "jobs" / "quickstart.yaml"),
            "set": {"schedule.checkpoint_interval": 20, "evaluation.interval": 30},
            "axes": {"schedule.iters": [100, 300, 50]}}
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(body))
    cells = load(grid).cells()
    settings, notes = asha_settings({"enabled": True, "grace_period": 0, "reduction_factor": 3.0}, cells)
    assert settings == {"time_attr": "iter", "metric": "mIoU", "mode": "max", "grace_period": 60,
                        "reduction_factor": 3.0, "max_t": 301}
    assert len(notes) == 1 and "cannot stop 1 cell(s)" in notes[0] and "-50_" in notes[0]  # 60 >= 50 iters
    assert asha_settings({"enabled": False, "grace_period": 0, "reduction_factor": 3.0}, cells) == (None, [])
    off, why = asha_settings({"enabled": True, "grace_period": 400, "reduction_factor": 3.0}, cells)
    assert off is None and "past every cell's last iteration" in why[-1]
