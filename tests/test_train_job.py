"""The training job end to end on the real services: `ray job submit` to the test Ray head, data,
checkpoints and results on the test S3 endpoint; worker failure and resume; bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from ocr_cluster import storage

VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]


SPEC_ARGS = {"classes": 4, "num_train": 16, "num_val": 4, "size_hw": (64, 64)}


@contextmanager
def _s3_env(service):
    """The S3 endpoint's variables in this process (module fixtures cannot use monkeypatch)."""
    saved = {k: os.environ.get(k) for k in service.env}
    os.environ.update(service.env)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def synth_uri(_s3_service):
    """A tiny synthetic dataset on the S3 endpoint, shared by this module's tests."""
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    uri = f"s3://{_s3_service.info['bucket']}/train-job/synth"
    with _s3_env(_s3_service):
        write_synthetic(uri, SynthSpec(**SPEC_ARGS))
    return uri


BAD_KEYS = ("train_000005", "val_000001")


def write_synth(service, uri: str, spoil=None):
    """The tiny synthetic dataset at `uri`; returns its manifest. `spoil(key, image_bytes, label_bytes, label)`
    may return other encoded bytes for a sample (the writer still records sizes and checksums of what it
    wrote, so only the content is bad)."""
    from ocr_cluster.data import codec
    from ocr_cluster.data.shards import DatasetWriter
    from ocr_cluster.data.synth import SynthSpec, class_names, palette, render

    spec = SynthSpec(**SPEC_ARGS)
    with _s3_env(service):
        writer = DatasetWriter(uri, name="synthetic", dataset="synthetic", classes=class_names(spec.classes),
                               palette=palette(spec.classes))
        for split, count in (("train", spec.num_train), ("val", spec.num_val)):
            for index in range(count):
                key = f"{split}_{index:06d}"
                image, label = render(spec, split, index)
                data, encoded = codec.encode_image(image, spec.image_format), codec.encode_label(label)
                if spoil is not None:
                    data, encoded = spoil(key, data, encoded, label)
                writer.add(split, key, data, encoded, label_array=label, height=64, width=64,
                           image_format=spec.image_format)
        return writer.close()


def write_synth_with_bad(service, uri: str, bad_keys: tuple[str, ...]) -> str:
    """The tiny synthetic dataset at `uri` with an undecodable image at each of `bad_keys`."""
    write_synth(service, uri, lambda key, data, encoded, label:
                (b"not an image" if key in bad_keys else data, encoded))
    return uri


@pytest.fixture(scope="module")
def bad_synth_uri(_s3_service):
    """The same tiny dataset with one undecodable image in train and one in val (BAD_KEYS)."""
    return write_synth_with_bad(_s3_service, f"s3://{_s3_service.info['bucket']}/train-job/bad-synth", BAD_KEYS)


def tiny_job(tmp_path: Path, s3, synth_uri: str, **sections) -> tuple[Path, str]:
    """A job YAML: hrnetv2_w18_small + OCR on 64x64 crops, 2 CPU workers, everything on S3."""
    root = s3.url("job")
    body = {
        "model": {"backbone": "hrnetv2_w18_small", "head": "ocr"},
        "data": {"dataset": "synthetic", "uri": synth_uri, "crop_size": "64x64", "scale": "64x64",
                 "batch_size": 2},
        "schedule": {"iters": 6, "checkpoint_interval": 2, "log_interval": 2},
        "evaluation": {"interval": 6, "fps_images": 6},
        "cluster": {"num_workers": 2, "max_failures": 3},
        "storage": {"checkpoint_uri": f"{root}/runs"},
        "results": {"store_uri": f"{root}/results"},
    }
    for section, values in sections.items():
        body.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    return path, root


def submit(ray_cluster, s3, job: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit` as a user runs it. The shared test head has no S3 credentials of its own, so the
    runtime env carries the submitting shell's, by the explicit opt-in (test_job_shipping.py covers the
    default: nodes with their own credentials)."""
    env = {**os.environ, **ray_cluster.env, **s3.env}
    runtime_env = subprocess.run([sys.executable, "-m", "ocr_cluster.runtime_env", "--with-secrets"], env=env,
                                 check=True, capture_output=True, text=True).stdout
    assert json.loads(runtime_env)["env_vars"]["AWS_SECRET_ACCESS_KEY"] == s3.env["AWS_SECRET_ACCESS_KEY"]
    return subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
                           "--runtime-env-json", runtime_env, "--", "python", "-m", "ocr_cluster.train",
                           str(job), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def store_rows(store: str) -> list[dict]:
    from ocr_cluster.results import read_attempts

    return read_attempts(store).to_pylist()


def test_ray_job_submit_trains_on_s3_and_does_not_train_again(ray_cluster, s3, synth_uri, tmp_path):
    # cpus_per_worker 0: sized from the test head's nodes (4 CPUs, 2 workers: 1 each, 2 left for Ray Data).
    job, root = tiny_job(tmp_path, s3, synth_uri, cluster={"cpus_per_worker": 0})
    result = submit(ray_cluster, s3, job)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "eval at iter 6" in log and "completed: mIoU" in log
    assert "cluster.cpus_per_worker 0: 1 per worker (three quarters of the cluster's 4 CPUs over 2 " in log, log

    rows = store_rows(f"{root}/results")
    assert [r["status"] for r in rows] == ["completed"]
    row = rows[0]
    assert row["iters"] == 6 and row["backbone"] == "hrnetv2_w18_small" and 0 <= row["miou"] <= 100
    assert len(row["iou_per_class"]) == 4 and row["fps"] and row["fps"] > 0
    assert row["checkpoint_uri"] == f"{root}/runs/{row['run_id']}/checkpoint_iter=0000006/model.pt"
    assert row["skipped_samples"] == 0
    assert yaml.safe_load(row["config_yaml"])["cluster"]["cpus_per_worker"] == 1  # what the workers reserved
    # launched by `ray job submit`: the workers write what the job's driver saw
    assert row["launcher"] == "ray-job" and row["scheduler_job_id"].startswith("raysubmit_"), row
    assert storage.exists(row["checkpoint_uri"])  # the final checkpoint is on S3
    assert "testing" not in json.dumps(row, default=str)  # no credential in the row
    assert row["total_time_s"] == row["train_time_s"] > 0  # one attempt: the run's time is its time
    assert row["started_at"] < row["finished_at"]
    events = tensorboard_events(f"{root}/runs/{row['run_id']}/tensorboard")
    assert len(events) == 1 and all(b"train/loss" in data for data in events.values())
    assert staged_tensorboard(row["run_id"]) == []

    # The final checkpoint evaluates to the reported mIoU through `ocr-cluster eval`.
    env = {**os.environ, **s3.env}
    evaluated = subprocess.run([str(VENV_BIN / "ocr-cluster"), "eval", str(job), "--checkpoint",
                                row["checkpoint_uri"]], capture_output=True, text=True, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"mIoU {row['miou']:.2f}" in evaluated.stdout

    again = submit(ray_cluster, s3, job)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "already completed" in again.stdout
    assert "iter 2/6" not in again.stdout
    assert [r["status"] for r in store_rows(f"{root}/results")] == ["completed"]


def tensorboard_events(uri: str) -> dict[str, bytes]:
    """The TensorBoard event files under `uri`, read."""
    fs = storage.filesystem(uri)[0]
    fs.invalidate_cache()
    return {path: fs.cat_file(path) for path in storage.list_files(uri) if "events.out.tfevents" in path}


def staged_tensorboard(run_id: str) -> list[str]:
    """What the run left in the temp dir (the workers' TMPDIR: the test head started in this session's),
    two levels down: where TensorBoard events were staged."""
    top = Path(tempfile.gettempdir())
    return [str(p) for p in [*top.glob("*"), *top.glob("*/*")] if run_id in p.name]


def test_skipped_bad_samples_are_counted_in_the_row(ray_cluster, s3, bad_synth_uri, tmp_path):
    # 14 iterations of batch 2 read the 15 good training samples about twice: the bad one is met every
    # epoch and counted once; the val one is met at every evaluation and counted once.
    job, root = tiny_job(tmp_path, s3, bad_synth_uri, data={"skip_bad_samples": True},
                         schedule={"iters": 14, "checkpoint_interval": 7, "log_interval": 7},
                         evaluation={"interval": 7, "fps_images": 6})
    result = submit(ray_cluster, s3, job)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    (row,) = store_rows(f"{root}/results")
    assert row["status"] == "completed" and row["skipped_samples"] == len(BAD_KEYS)
    assert f"skipped {len(BAD_KEYS)} bad sample(s)" in log


def _alive_train_workers(ray_cluster) -> list[int]:
    """PIDs of the live Ray Train worker actors, from Ray's state API (not a process-name guess)."""
    out = subprocess.run([str(VENV_BIN / "ray"), "list", "actors", "--address", ray_cluster.address,
                          "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE", "--detail",
                          "--format", "json"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **ray_cluster.env})
    return [int(actor["pid"]) for actor in json.loads(out.stdout or "[]") if actor.get("pid")]


def _snapshots(fs, path: str) -> list[str]:
    try:
        return [p for p in fs.find(path, maxdepth=2) if p.endswith("checkpoint_manager_snapshot.json")]
    except FileNotFoundError:
        return []


def registered_checkpoint(checkpoints: str) -> int | None:
    """The iteration of the latest checkpoint Ray Train has registered for the one run under `checkpoints`
    (its checkpoint manager's snapshot: what a restarted worker group resumes from), None if none."""
    from ocr_cluster.train.layout import checkpoint_iteration

    fs, path = storage.filesystem(checkpoints)
    fs.invalidate_cache()
    (snapshot,) = _snapshots(fs, path)
    latest = json.loads(fs.cat_file(snapshot)).get("latest_checkpoint_result")
    return checkpoint_iteration(latest["checkpoint_dir_name"]) if latest else None


def _kill_a_worker_after_first_checkpoint(ray_cluster, checkpoints: str, killed: list,
                                          stop: threading.Event, registered: list | None = None) -> None:
    """SIGKILL a training worker once a checkpoint is registered; then `registered` gets the latest
    registered checkpoint's iteration as of the kill (read once the worker is gone)."""
    # Ray writes its checkpoint manager's snapshot once a checkpoint is registered (a checkpoint_iter=
    # directory appears earlier, when its upload starts; killing then would rightly restart from scratch).
    fs, path = storage.filesystem(checkpoints)
    while not stop.is_set() and not _snapshots(fs, path):
        fs.invalidate_cache()
        time.sleep(0.2)
    pids = _alive_train_workers(ray_cluster) if not stop.is_set() else []
    if pids:
        killed.append(time.time())
        os.kill(max(pids), signal.SIGKILL)
        if registered is not None:
            time.sleep(2)  # a report the worker sent before it died is registered by now; no new one can come
            registered.append(registered_checkpoint(checkpoints))


def test_killed_worker_is_restarted_and_resumes(ray_cluster, s3, synth_uri, tmp_path, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    job, root = tiny_job(tmp_path, s3, synth_uri, schedule={"iters": 60, "checkpoint_interval": 4,
                                                            "log_interval": 4},
                         evaluation={"interval": 60, "fps_images": 6})
    killed: list[float] = []
    registered: list[int | None] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(ray_cluster, f"{root}/runs", killed, stop, registered), daemon=True)
    killer.start()
    try:
        result = submit(ray_cluster, s3, job)
    finally:
        stop.set()
        killer.join(timeout=10)
    log = result.stdout + result.stderr
    assert killed, "no worker was killed"
    assert result.returncode == 0, log[-4000:]
    assert "resumed from the checkpoint at iteration" in log
    resumed_at = int(log.split("resumed from the checkpoint at iteration ")[1].split()[0])
    # The restarted group resumed from the checkpoint registered when the worker died: not 0, not another.
    assert registered and registered[0] is not None and resumed_at == registered[0], (resumed_at, registered)
    assert 4 <= resumed_at < 60
    (row,) = store_rows(f"{root}/results")
    assert row["status"] == "completed" and row["iters"] == 60
    # The run's accounting covers both attempts: the first's time up to its checkpoint, then the second's.
    assert row["started_at"].timestamp() < killed[0] < row["finished_at"].timestamp()
    assert row["total_time_s"] > row["train_time_s"] > 0
    # Each attempt's TensorBoard events are kept: the killed one's as of its checkpoint, none overwritten.
    events = tensorboard_events(f"{root}/runs/{row['run_id']}/tensorboard")
    assert len(events) >= 2 and all(b"train/loss" in data for data in events.values()), sorted(events)


@pytest.mark.parametrize("case", ["unknown backbone", "missing dataset", "unreachable endpoint",
                                  "wrong credentials"])
def test_bad_inputs_fail_before_any_worker(case, s3, synth_uri, tmp_path, cli):
    import services  # scripts/services.py, on sys.path through conftest

    job, root = tiny_job(tmp_path, s3, synth_uri)
    env, extra, auth_server = dict(s3.env), [], None
    if case == "unknown backbone":
        extra = ["--set", "model.backbone=hrnet_w48"]
        expected = "model.backbone: unknown value 'hrnet_w48'"
    elif case == "missing dataset":
        extra = ["--set", f"data.uri={root}/no-such-dataset"]
        expected = "no-such-dataset"
    elif case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{services.free_port()}"
        expected = "cannot read the dataset at"
    else:
        auth_server = services.start_s3(bucket=s3.bucket, enforce_auth=True)
        env["AWS_ENDPOINT_URL"] = auth_server.info["endpoint_url"]
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = "AKIAWRONGWRONGWRONG0", "wrong-secret"
        expected = "Forbidden"
    try:
        started = time.monotonic()
        result = cli("train", str(job), *extra, env=env, timeout=180)
    finally:
        if auth_server:
            auth_server.stop()
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "RayTrainWorker" not in result.stdout + result.stderr
    assert time.monotonic() - started < 120
    assert not [r for r in store_rows(f"{root}/results") if r["status"] == "completed"]
