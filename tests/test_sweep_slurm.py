"""Sweeps on the real single-node SLURM cluster: `sweep launch` as one submitit job array, `sweep status`,
relaunch, a failed cell and its fix, preemption and resume, cancel, and the errors before submitting.

Data, checkpoints and results live on the test S3 endpoint; the array tasks inherit the submitting
environment (sbatch exports it), which holds the endpoint and a planted secret that must not land in
any file the sweep writes. Cells are tiny (HRNetV2-W18-Small, 64x64, one CPU worker, a few iterations).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ocr_cluster import storage

REPO = Path(__file__).resolve().parents[1]
SECRET = "planted-S3CRET-value-7f3c9a1e"
pytestmark = [pytest.mark.slurm, pytest.mark.s3, pytest.mark.timeout(900)]


def tiny_synth(s3_service, prefix: str) -> str:
    """A tiny synthetic dataset (4 classes, 16 + 4 images of 64x64) at s3://<bucket>/<prefix>/synth."""
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    saved = {k: os.environ.get(k) for k in s3_service.env}
    os.environ.update(s3_service.env)
    uri = f"s3://{s3_service.info['bucket']}/{prefix}/synth"
    write_synthetic(uri, SynthSpec(classes=4, num_train=16, num_val=4, size_hw=(64, 64)))
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return uri


@pytest.fixture(scope="module")
def synth_uri(_s3_service):
    """A tiny synthetic dataset on the S3 endpoint, shared by this module's tests."""
    return tiny_synth(_s3_service, "sweep-slurm")


@pytest.fixture
def cluster(slurm, s3, monkeypatch):
    """The submitting shell: SLURM_CONF, the S3 endpoint and a distinctive secret key."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return slurm


def write_grid(path: Path, root: str, synth_uri: str, slurm, *, iters=(4,), include=(), parallelism=2,
               name="tiny", checkpoint_interval=2, **backend) -> Path:
    body = {
        "name": name,
        "base": str(REPO / "jobs" / "quickstart.yaml"),
        "set": {
            "data": {"uri": synth_uri, "crop_size": "64x64", "scale": "64x64", "batch_size": 2},
            "schedule": {"checkpoint_interval": checkpoint_interval, "log_interval": 2},
            "evaluation": {"interval": 100, "fps_images": 6},
            "cluster": {"num_workers": 1},
            "storage": {"checkpoint_uri": f"{root}/runs"},
            "results": {"store_uri": f"{root}/results"},
        },
        "axes": {"model.head": ["ocr"], "schedule.iters": list(iters)},
        "include": list(include) or None,
        "backend": {"slurm": {"partition": slurm.partition, "gpus_per_node": 0, "time": "20:00",
                              "cpus_per_task": 1, "array_parallelism": parallelism, **backend}},
    }
    if not include:
        body.pop("include")
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def sweep(cli, action: str, grid: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return cli("sweep", action, str(grid), *extra, timeout=timeout)


def launch(cli, grid: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return sweep(cli, "launch", grid, "--folder", str(folder), "--interval", "3", *extra, timeout=700)


def states(cli, grid: Path) -> dict[str, dict]:
    out = sweep(cli, "status", grid, "--json", timeout=120)
    return {row["name"]: row for row in map(json.loads, out.stdout.splitlines())}


def attempts(store: str, run_id: str | None = None) -> list[dict]:
    from ocr_cluster.results import read_attempts

    table = read_attempts(store) if run_id is None else read_attempts(store, run_id=run_id)
    return table.drop_columns(["iou_per_class"]).to_pylist()


def submitted(output: str) -> dict[str, str]:
    """run id -> job id from the lines `  JOBID  NAME  RUNID` that launch prints."""
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and line.startswith("  ") and parts[0][0].isdigit():
            out[parts[2]] = parts[0]
    return out


def fresh_exists(uri: str) -> bool:
    """storage.exists without s3fs's listing cache of this process (it would keep a 'not there')."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    return fs.exists(path)


def files_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode(errors="ignore") for p in root.rglob("*") if p.is_file())


def test_launch_status_relaunch_failure_and_fix(cluster, s3, synth_uri, cli, tmp_path):
    root = s3.url("sweep")
    store = f"{root}/results"
    folder = tmp_path / "submitit"
    missing = f"s3://{s3.bucket}/no-such-dataset"
    bad = {"model.head": "fcn", "schedule.iters": 4, "set": {"data.uri": missing}}
    grid = write_grid(tmp_path / "tiny.yaml", root, synth_uri, cluster, include=[bad])

    dry = launch(cli, grid, folder, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would submit 2 of 2 cells" in dry.stdout and not folder.exists()

    first = launch(cli, grid, folder, "--wait")
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-3000:]  # one cell failed
    assert "submitted 2 of 2 cells as SLURM job array" in first.stdout
    jobs = submitted(first.stdout)
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array

    cells = states(cli, grid)
    good, failed = cells["ocrnet_hr18s_1xb2-4_synthetic-64x64"], cells["fcn_hr18s_1xb2-4_synthetic-64x64"]
    assert good["state"] == "completed" and good["detail"].startswith("mIoU ")
    assert failed["state"] == "failed" and failed["detail"].startswith(f"no manifest at {missing}"), failed
    assert sweep(cli, "status", grid).returncode == 1  # not every cell completed

    rows = {r["run_id"]: r for r in attempts(store)}
    for cell, status in ((good, "completed"), (failed, "failed")):
        row = rows[cell["run_id"]]
        assert (row["status"], row["sweep"], row["launcher"]) == (status, "tiny", "slurm")
        assert row["scheduler_job_id"] == jobs[cell["run_id"]] and row["restart_count"] == 0
    assert rows[failed["run_id"]]["error"] == failed["detail"]  # the preflight's one line

    # Fixed, and one cell added: the relaunch submits exactly those two, not the completed one. The fixed
    # cell's run id now has its dataset's fingerprint (the missing dataset had none to give).
    added = {"model.head": "ocr", "schedule.iters": 6}
    write_grid(grid, root, synth_uri, cluster, include=[{**bad, "set": {}}, added])
    second = launch(cli, grid, folder, "--wait")
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "submitted 2 of 3 cells" in second.stdout
    cells = states(cli, grid)
    fixed = cells["fcn_hr18s_1xb2-4_synthetic-64x64"]
    assert fixed["run_id"] != failed["run_id"] and cells[good["name"]]["run_id"] == good["run_id"]
    assert set(submitted(second.stdout)) == {fixed["run_id"], cells["ocrnet_hr18s_1xb2-6_synthetic-64x64"]["run_id"]}
    assert {c["state"] for c in cells.values()} == {"completed"}
    assert sweep(cli, "status", grid).returncode == 0

    again = launch(cli, grid, folder)
    assert again.returncode == 0 and "nothing to submit (3 completed" in again.stdout

    reconcile = cli("results", "reconcile", "--store", store, "--sweep", "tiny")
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
    assert "3/3 completed, 0 missing, 0 failed, 0 duplicated" in reconcile.stdout

    table = cli("results", "table", "--store", store, "--sweep", "tiny")  # laid out by the grid's axes
    assert table.returncode == 0, table.stderr
    header, _, *body = table.stdout.splitlines()
    assert [c.strip() for c in header.split("|")[1:-1]] == ["model.head", "4", "6"]
    assert sorted(line.split("|")[1].strip() for line in body if line.startswith("|")) == ["fcn", "ocr"]

    # The launch records hold the cells and job ids; no file the sweep wrote holds the secret.
    from ocr_cluster.sweep.records import read_records

    records = read_records(store, "tiny")
    assert [r["kind"] for r in records] == ["launch", "launch"]
    assert {c["run_id"]: c["job_id"] for c in records[0]["cells"]} == jobs
    assert records[0]["axes"] == ["model.head", "schedule.iters"]
    assert SECRET not in json.dumps(records) and SECRET not in json.dumps(attempts(store), default=str)
    assert SECRET not in files_text(folder)
    assert any(folder.rglob("*_log.out"))  # the folder was searched, not empty


def test_preempted_cell_resumes_from_its_checkpoint(cluster, s3, synth_uri, cli, tmp_path):
    root = s3.url("preempt")
    store = f"{root}/results"
    folder = tmp_path / "submitit"
    grid = write_grid(tmp_path / "pre.yaml", root, synth_uri, cluster, iters=(24,), name="pre")
    first = launch(cli, grid, folder)
    assert first.returncode == 0, first.stderr
    (run_id, job_id), = submitted(first.stdout).items()

    # Preempt once Ray Train has registered a checkpoint (its snapshot is written after the upload).
    snapshot = f"{root}/runs/{run_id}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while not fresh_exists(snapshot):
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(2)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    deadline = time.monotonic() + 420
    seen_requeued = False
    while True:
        cell = next(iter(states(cli, grid).values()))
        seen_requeued |= cell["state"] == "requeued"
        if cell["state"] not in ("running", "pending", "requeued"):
            break
        assert time.monotonic() < deadline, f"still {cell} after 420 s"
        time.sleep(5)
    assert cell["state"] == "completed", cell
    assert seen_requeued, "sweep status never showed the requeued job"
    rows = attempts(store, run_id)
    assert [r["status"] for r in rows] == ["completed"], rows  # the preempted attempt wrote no failed row
    assert rows[0]["restart_count"] == 1
    log = files_text(folder)
    assert "this job is preempted" in log
    resumed = [int(line.rsplit(" ", 1)[-1]) for line in log.splitlines() if "resuming from iteration" in line]
    assert resumed and resumed[0] >= 2, "the requeued attempt started from iteration 0"


def test_cancel_leaves_nothing_queued(cluster, s3, synth_uri, cli, tmp_path):
    root = s3.url("cancel")
    folder = tmp_path / "submitit"
    grid = write_grid(tmp_path / "long.yaml", root, synth_uri, cluster, iters=(400, 500), parallelism=1,
                      name="long")
    first = launch(cli, grid, folder)
    assert first.returncode == 0, first.stderr
    jobs = submitted(first.stdout)
    assert {c["state"] for c in states(cli, grid).values()} <= {"pending", "running"}
    plan = sweep(cli, "plan", grid, "--json", timeout=120)  # the plan sees the live jobs too
    assert {json.loads(line)["state"] for line in plan.stdout.splitlines()} <= {"pending", "running"}

    deadline = time.monotonic() + 180  # cancel a task that is running its cell, not one still starting
    while "private Ray head" not in files_text(folder):
        assert time.monotonic() < deadline, "no task started its Ray head within 180 s"
        time.sleep(1)
    cancel = sweep(cli, "cancel", grid, timeout=120)
    assert cancel.returncode == 0, cancel.stderr
    assert "cancelled 2 job(s)" in cancel.stdout
    deadline = time.monotonic() + 60
    while True:
        queued = subprocess.run(["squeue", "-h", "-r", "-j", next(iter(jobs.values())).split("_")[0]],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        if not queued:
            break
        assert time.monotonic() < deadline, queued
        time.sleep(2)
    assert {c["state"] for c in states(cli, grid).values()} == {"cancelled"}
    assert "no queued or running job" in sweep(cli, "cancel", grid).stdout

    # The cancelled task stopped its private Ray: no process or temp dir of it is left.
    temp_dirs = re.findall(r"private Ray head \S+, temp dir (\S+)", files_text(folder))
    deadline = time.monotonic() + 30
    while any(Path(d).exists() or _pids_with(d) for d in temp_dirs):
        assert time.monotonic() < deadline, [(d, _pids_with(d)) for d in temp_dirs]
        time.sleep(1)


def _pids_with(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in proc.joinpath("cmdline").read_bytes().decode(errors="ignore"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_errors_before_submitting(cluster, s3, synth_uri, cli, tmp_path):
    root = s3.url("errors")
    folder = tmp_path / "submitit"
    grid = write_grid(tmp_path / "e.yaml", root, synth_uri, cluster, partition="nosuchpart")
    unknown = launch(cli, grid, folder)
    assert unknown.returncode == 2
    assert "unknown partition 'nosuchpart'; partitions: debug" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    grid = write_grid(tmp_path / "e.yaml", root, synth_uri, cluster)
    no_sbatch = cli("sweep", "launch", str(grid), "--folder", str(folder),
                    env={"PATH": str(Path(sys.executable).parent)})
    assert no_sbatch.returncode == 2 and "sbatch is not on PATH" in no_sbatch.stderr

    conf = Path(os.environ["SLURM_CONF"]).read_text()
    dead = tmp_path / "dead.conf"
    port = next(line for line in conf.splitlines() if line.startswith("SlurmctldPort="))
    dead.write_text(conf.replace(port, "SlurmctldPort=1"))
    down = cli("sweep", "launch", str(grid), "--folder", str(folder), env={"SLURM_CONF": str(dead)})
    assert down.returncode == 2 and "the SLURM controller does not answer" in down.stderr, down.stderr
    assert not folder.exists()  # nothing was submitted
    assert not fresh_exists(f"{root}/results/_launches")
