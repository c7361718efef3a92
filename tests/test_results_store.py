"""The results store with real files: a local directory and the test S3 endpoint (moto's server).

Concurrency and kill tests fork real processes: 32 writers at once, and writers killed with SIGKILL
in the middle of a write. Nothing here mocks the filesystem or S3.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
import urllib.parse
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ocr_cluster import config, storage
from ocr_cluster.results import (RowError, SCHEMA, SCHEMA_VERSION, UnreadableFileWarning, compact, list_run_files,
                                 read_attempts, read_runs, row_from_config, write_run, write_sweep_manifest)
from ocr_cluster.results import store as store_mod
from ocr_cluster.results.reconcile import ManifestError, reconcile

FORK = mp.get_context("fork")  # children inherit the imported modules: 32 writers start in milliseconds


def cell(backbone="hrnetv2_w18", iters=40000, **overrides) -> config.Config:
    sets = [f"model.backbone={backbone}", "data.dataset=cityscapes", "data.crop_size=512x1024",
            f"schedule.iters={iters}"] + [f"{k}={v}" for k, v in overrides.items()]
    return config.load(None, sets)


def row(i: int = 0, **fields) -> dict:
    return row_from_config(cell(**{"run.seed": i}), status="completed", miou=70.0 + i / 10, **fields)


# ---------------------------------------------------------------------------------------------
# rows and layout


def test_round_trip_layout_and_config(tmp_path):
    cfg = cell(**{"run.sweep": "ablation a/b"})
    uri = write_run(str(tmp_path), row_from_config(cfg, status="completed", miou=77.72, miou_msflip=79.49,
                                                   iou_per_class={"road": 98.0, "sky": 94.5}, mem_gb=4.7))
    rel = os.path.relpath(uri, tmp_path)
    parts = rel.split(os.sep)
    assert parts[:3] == ["dataset=cityscapes", "sweep=ablation%20a%2Fb", f"run_id={cfg.run_id}"]
    assert parts[3].startswith("attempt-000-") and parts[3].endswith(".parquet")
    assert pq.read_schema(uri).metadata[b"ocr_cluster.schema_version"] == str(SCHEMA_VERSION).encode()

    (got,) = read_runs(str(tmp_path)).to_pylist()
    assert got["run_id"] == cfg.run_id and got["sweep"] == "ablation a/b" and got["file"] == "/".join(parts)
    assert (got["method"], got["backbone"], got["head"], got["crop_size"], got["batch_size"], got["iters"]) == \
        ("OCRNet", "hrnetv2_w18", "ocr", "512x1024", 8, 40000)
    assert got["iou_per_class"] == [{"name": "road", "iou": 98.0}, {"name": "sky", "iou": 94.5}]
    assert got["written_at"].tzinfo is not None and got["torch_version"] and got["ray_version"]
    assert config.loads_yaml(got["config_yaml"]) == cfg  # the stored config rebuilds the run


def test_filters_and_dataset_sweep_narrowing(tmp_path):
    store = str(tmp_path)
    write_run(store, row_from_config(cell(), status="completed", miou=77.0))
    write_run(store, row_from_config(cell("hrnetv2_w48"), status="completed", miou=80.0))
    write_run(store, row_from_config(cell(**{"run.sweep": "s1", "run.seed": 1}), status="completed", miou=78.0))
    write_run(store, row_from_config(cell(**{"data.dataset": "ade20k", "data.crop_size": "512x512"}),
                                     status="completed", miou=40.0))
    assert read_runs(store, dataset="ade20k")["miou"].to_pylist() == [40.0]
    assert read_runs(store, sweep="s1")["miou"].to_pylist() == [78.0]
    assert sorted(read_attempts(store, sweep="")["miou"].to_pylist()) == [40.0, 77.0, 80.0]
    assert read_runs(store, backbone="hrnetv2_w48")["miou"].to_pylist() == [80.0]
    assert sorted(read_runs(store, dataset="cityscapes", miou=[77.0, 80.0])["miou"].to_pylist()) == [77.0, 80.0]
    with pytest.raises(ValueError, match="unknown filter column 'backbon'"):
        read_runs(store, backbon="x")
    # The sweep name is not part of the run id: the same cell run again in another sweep is the same
    # run, and its newer attempt is the one shown.
    write_run(store, row_from_config(cell(**{"run.sweep": "s2"}), status="completed", miou=77.5))
    assert sorted(read_runs(store, dataset="cityscapes")["miou"].to_pylist()) == [77.5, 78.0, 80.0]
    assert sorted(read_runs(store, sweep="")["miou"].to_pylist()) == [40.0, 77.0, 80.0]  # narrowed first


def test_latest_attempt_wins_and_completed_beats_failed(tmp_path):
    store = str(tmp_path)
    cfg = cell()
    write_run(store, row_from_config(cfg, status="failed", error="CUDA OOM", attempt=0))
    write_run(store, row_from_config(cfg, status="completed", miou=77.0, attempt=1))
    write_run(store, row_from_config(cfg, status="failed", error="preempted", attempt=2))  # a needless rerun
    other = cell("hrnetv2_w48")
    write_run(store, row_from_config(other, status="completed", miou=79.0, attempt=0))
    write_run(store, row_from_config(other, status="completed", miou=80.0, attempt=1))
    only_failed = cell("resnet50_d8")
    write_run(store, row_from_config(only_failed, status="failed", error="one", attempt=0))
    write_run(store, row_from_config(only_failed, status="failed", error="two", attempt=1))

    runs = {r["run_id"]: r for r in read_runs(store).to_pylist()}
    assert len(runs) == 3 and read_attempts(store).num_rows == 7
    assert (runs[cfg.run_id]["status"], runs[cfg.run_id]["miou"]) == ("completed", 77.0)
    assert runs[other.run_id]["miou"] == 80.0
    assert (runs[only_failed.run_id]["status"], runs[only_failed.run_id]["error"]) == ("failed", "two")
    assert read_runs(store, status="failed")["run_id"].to_pylist() == [only_failed.run_id]


def test_bad_rows_are_one_line_errors_and_write_nothing(tmp_path):
    store = str(tmp_path)
    cases = [
        ({"mIoU": 77.0}, r"unknown result columns: mIoU \(did you mean 'miou'\?\)"),
        ({"status": "done"}, "status: expected one of completed, failed, stopped, got 'done'"),
        ({"miou": 0.7772 * 1000}, r"miou: expected a percentage in \[0, 100\]"),
        ({"batch_size": "eight"}, "batch_size: 'eight' is not a valid int32"),
        ({"started_at": "yesterday"}, "started_at: expected a datetime"),
        ({"run_id": ""}, "run_id: required"),
    ]
    for change, message in cases:
        with pytest.raises(RowError, match=message):
            write_run(store, {**row(), **change})
    assert list(tmp_path.iterdir()) == []


def test_no_credentials_in_any_column(tmp_path, monkeypatch):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = cell(**{"storage.checkpoint_uri": "s3://AKIAIOSFODNN7EXAMPLE:hunter2hunter2@bucket/runs",
                  "data.uri": "https://data.example.com/cs?X-Amz-Signature=deadbeef"
                              "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&token=abc123&part=1"})
    uri = write_run(str(tmp_path), row_from_config(
        cfg, status="failed", error=f"botocore: SignatureDoesNotMatch for key {secret} (AKIAIOSFODNN7EXAMPLE)"))
    stored = str(pq.read_table(uri).to_pylist())  # every column of the file as written
    for leaked in (secret, "AKIAIOSFODNN7EXAMPLE", "hunter2", "deadbeef", "abc123"):
        assert leaked not in stored, leaked
    got = read_runs(str(tmp_path)).to_pylist()[0]
    assert got["checkpoint_uri"].startswith("s3://bucket/runs/")
    assert "part=1" in got["config_yaml"] and "X-Amz-Signature=***" in got["config_yaml"]


# ---------------------------------------------------------------------------------------------
# robustness of reading


def test_old_file_missing_new_columns_still_reads(tmp_path):
    store = str(tmp_path)
    write_run(store, row(1))
    # A file as an older writer made it: fewer columns, int64 where we now say int32.
    old = pa.table({"schema_version": pa.array([0], pa.int16()), "run_id": ["rold"], "dataset": ["cityscapes"],
                    "backbone": ["hrnetv2_w48"], "head": ["ocr"], "crop_size": ["512x1024"],
                    "batch_size": pa.array([8], pa.int64()), "iters": [80000], "miou": [80.7], "status": ["completed"]})
    path = tmp_path / "dataset=cityscapes" / "sweep=__HIVE_DEFAULT_PARTITION__" / "run_id=rold" / "attempt-0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(old, path)
    # ... and one from a newer writer, with a column this version does not know.
    newer = pa.table({"run_id": ["rnew"], "dataset": ["cityscapes"], "status": ["completed"], "miou": [81.0],
                      "added_in_v9": ["x"]})
    pq.write_table(newer, tmp_path / "dataset=cityscapes" / "rnew.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = {r["run_id"]: r for r in read_runs(store).to_pylist()}
    assert set(runs) == {row(1)["run_id"], "rold", "rnew"}
    assert runs["rold"]["miou"] == 80.7 and runs["rold"]["batch_size"] == 8
    assert runs["rold"]["aacc"] is None and runs["rold"]["iou_per_class"] is None and runs["rold"]["attempt"] is None
    assert runs["rold"]["skipped_samples"] is None  # a column added in schema version 2
    assert runs["rold"]["total_time_s"] is None  # and one of version 3
    assert runs["rold"]["launcher"] is None and runs["rold"]["restart_count"] is None  # and of version 4
    assert read_runs(store).schema.names == SCHEMA.names + ["file"]


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path):
    store = str(tmp_path)
    good = write_run(store, row(1))
    bad_dir = tmp_path / "dataset=cityscapes" / "sweep=__HIVE_DEFAULT_PARTITION__" / "run_id=rbad"
    bad_dir.mkdir(parents=True)
    (bad_dir / "truncated.parquet").write_bytes(open(good, "rb").read()[:200])
    (bad_dir / "foreign.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"x": [1]}), bad_dir / "other.parquet")
    pq.write_table(pa.table({"run_id": ["rtype"], "status": ["completed"], "miou": ["high"]}),
                   bad_dir / "wrongtype.parquet")
    with pytest.warns(UnreadableFileWarning) as caught:
        runs = read_runs(store)
    assert runs["run_id"].to_pylist() == [row(1)["run_id"]]
    messages = " ".join(str(w.message) for w in caught)
    for name in ("truncated.parquet", "foreign.parquet", "other.parquet", "wrongtype.parquet"):
        assert f"{bad_dir}/{name}" in messages


def test_temp_and_underscore_files_are_not_rows(tmp_path):
    store = str(tmp_path)
    uri = write_run(store, row(1))
    data = open(uri, "rb").read()
    (tmp_path / "dataset=cityscapes" / ".attempt-x.parquet.abc.tmp").write_bytes(data[:100])
    (tmp_path / "dataset=cityscapes" / ".hidden.parquet").write_bytes(data)
    (tmp_path / "_scratch").mkdir()
    (tmp_path / "_scratch" / "copy.parquet").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_attempts(store).num_rows == 1


def test_index_is_a_cache_the_listing_is_the_truth(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "AUTO_INDEX_MIN", 3)
    store = str(tmp_path)
    uris = [write_run(store, row(i)) for i in range(4)]
    assert read_runs(store).num_rows == 4  # parsed 4 files: writes an index
    (index,) = (tmp_path / "_index").iterdir()
    assert pq.read_table(index).num_rows == 4
    write_run(store, row(10))
    os.remove(uris[0])  # a run removed by hand: its index row must not come back
    runs = read_runs(store)
    assert sorted(runs["miou"].to_pylist()) == [70.1, 70.2, 70.3, 71.0]
    assert [p.name for p in (tmp_path / "_index").iterdir()] == [index.name]  # 1 unindexed file: no new index
    for _ in range(3):
        compact(store)
    indexes = sorted((tmp_path / "_index").iterdir())
    assert len(indexes) == store_mod.INDEXES_KEPT and pq.read_table(indexes[-1]).num_rows == 4
    assert read_runs(store).equals(read_runs(store, use_index=False).sort_by("run_id"))


# ---------------------------------------------------------------------------------------------
# 32 concurrent writers; SIGKILL in the middle of a write


def _writer(store: str, i: int, barrier) -> None:
    barrier.wait(timeout=60)  # all 32 write at the same moment
    write_run(store, row(i, attempt=i % 3, error=None))


def _concurrent_writes(store: str, n: int = 32) -> None:
    barrier = FORK.Barrier(n)
    procs = [FORK.Process(target=_writer, args=(store, i, barrier)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    files = list_run_files(store)
    assert len(files) == n
    fs, root = storage.filesystem(store)
    for rel in files:  # every file is whole: it parses on its own
        assert pq.read_table(pa.BufferReader(fs.cat_file(f"{root}/{rel}"))).num_rows == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = read_runs(store)
    assert runs.num_rows == n
    assert sorted(runs["miou"].to_pylist()) == [70.0 + i / 10 for i in range(n)]


def test_32_concurrent_writers_local(tmp_path):
    _concurrent_writes(str(tmp_path / "store"))


@pytest.mark.s3
def test_32_concurrent_writers_s3(s3):
    _concurrent_writes(s3.url("concurrent"))


def _die_at(name: str):
    def hook(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _killed_writer_local(store: str, where: str) -> None:
    setattr(os, where, _die_at(where))  # only in this child
    write_run(store, row(1, error="x" * 5_000_000))  # a big row: several MB on disk before the kill


@pytest.mark.parametrize("where", ["fsync", "replace"])  # data written, not synced / synced, not renamed
def test_sigkill_mid_write_leaves_nothing_visible_local(tmp_path, where):
    store = str(tmp_path)
    proc = FORK.Process(target=_killed_writer_local, args=(store, where))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    (leftover,) = [p for p in tmp_path.rglob("*") if p.is_file()]  # the killed writer's temp file ...
    assert leftover.name.startswith(".attempt-") and leftover.stat().st_size > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_run_files(store) == [] and read_runs(store).num_rows == 0  # ... which no reader sees
    write_run(store, row(2))
    assert read_runs(store)["miou"].to_pylist() == [70.2]


def _killed_writer_s3(store: str, sent) -> None:
    """Send the first half of the real, signed PutObject request to the server, then SIGKILL ourselves."""
    fs, _ = storage.filesystem(store)
    fs.ls(store.split("/")[2])  # connect, so that fs.s3 (the botocore client) exists

    def half_then_die(request, **kwargs):
        url = urllib.parse.urlsplit(request.url)
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        head = f"{request.method} {url.path}{'?' + url.query if url.query else ''} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        head += "".join(f"{k}: {v.decode() if isinstance(v, bytes) else v}\r\n"
                        for k, v in request.headers.items() if k.lower() != "host")
        sock = socket.create_connection((url.hostname, url.port))
        sock.sendall(head.encode() + b"\r\n" + body[:len(body) // 2])
        sent.set()
        time.sleep(0.5)  # let the server take in the partial body
        os.kill(os.getpid(), signal.SIGKILL)

    fs.s3.meta.events.register("before-send.s3.PutObject", half_then_die)
    write_run(store, row(1, error=os.urandom(200_000).hex()))


@pytest.mark.s3
def test_sigkill_mid_put_leaves_nothing_visible_s3(s3):
    store = s3.url("killed")
    sent = FORK.Event()
    proc = FORK.Process(target=_killed_writer_s3, args=(store, sent))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL and sent.is_set()  # died with half an object on the wire
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_run_files(store) == [] and read_runs(store).num_rows == 0
    write_run(store, row(2))
    assert read_runs(store)["miou"].to_pylist() == [70.2]


# ---------------------------------------------------------------------------------------------
# reconcile


def test_reconcile_missing_failed_duplicated_unexpected(tmp_path):
    store = str(tmp_path)
    sweep = {"run.sweep": "grid"}
    backbones = ("hrnetv2_w18", "hrnetv2_w48", "resnet50_d8", "resnet101_d8", "resnet50_d16")
    done, failed, twice, missing, stray = (cell(b, **sweep) for b in backbones)
    write_run(store, row_from_config(done, status="completed", miou=77.0))
    write_run(store, row_from_config(failed, status="failed", error="Traceback ...\nRuntimeError: CUDA OOM"))
    write_run(store, row_from_config(twice, status="completed", miou=78.0, attempt=0))
    write_run(store, row_from_config(twice, status="completed", miou=78.1, attempt=1))
    write_run(store, row_from_config(stray, status="completed", miou=70.0))
    with pytest.raises(ManifestError, match="no manifest for sweep 'grid'"):
        reconcile(store, "grid")
    write_sweep_manifest(store, "grid", [{"run_id": c.run_id, "backbone": c.model.backbone}
                                   for c in (done, failed, twice, missing)])
    report = reconcile(store, "grid")
    assert report.expected == 4 and not report.complete
    assert report.completed == [done.run_id, twice.run_id]
    assert report.missing == [missing.run_id]
    assert [(r["run_id"], r["status"]) for r in report.failed] == [(failed.run_id, "failed")]
    assert [(d["run_id"], d["completed_attempts"]) for d in report.duplicated] == [(twice.run_id, 2)]
    assert report.unexpected == [stray.run_id]
    # a plain-text manifest given as a file
    text = tmp_path.parent / f"{tmp_path.name}-manifest.txt"
    text.write_text(f"# expected\n{done.run_id}\n{twice.run_id}\n")
    assert reconcile(store, "grid", str(text)).complete


def test_stopped_rows_are_their_own_status_never_completed(tmp_path):
    """A cell stopped early (a Tune sweep's ASHA) has a stopped row: read as the run's row until a completed
    attempt exists, listed by reconcile as stopped, never as completed (and not as failed)."""
    store = str(tmp_path)
    stopped, resumed = cell("hrnetv2_w18", **{"run.sweep": "grid"}), cell("hrnetv2_w48", **{"run.sweep": "grid"})
    write_run(store, row_from_config(stopped, status="stopped", attempt=1, miou=3.5, iters_done=4000,
                                     error="stopped early by ASHA at iteration 4000 of 40000"))
    write_run(store, row_from_config(resumed, status="stopped", attempt=1, miou=30.0, iters_done=4000))
    write_run(store, row_from_config(resumed, status="completed", attempt=2, miou=77.0, iters_done=40000))
    runs = {r["run_id"]: r for r in read_runs(store).to_pylist()}
    assert (runs[stopped.run_id]["status"], runs[stopped.run_id]["iters_done"]) == ("stopped", 4000)
    assert runs[resumed.run_id]["status"] == "completed"
    assert read_runs(store, status="completed")["run_id"].to_pylist() == [resumed.run_id]
    write_sweep_manifest(store, "grid", [stopped.run_id, resumed.run_id])
    report = reconcile(store, "grid")
    assert report.completed == [resumed.run_id] and not report.failed
    assert [(r["run_id"], r["iters_done"], r["miou"]) for r in report.stopped] == [(stopped.run_id, 4000, 3.5)]
    assert report.complete  # nothing left to run: the stopped cell ended by the sweep's decision
    with pytest.raises(RowError, match="status: expected one of completed, failed, stopped"):
        write_run(store, row_from_config(stopped, status="halted"))


@pytest.mark.s3
def test_reconcile_on_s3(s3):
    store = s3.url("reconcile")
    cfg = cell(**{"run.sweep": "g"})
    write_run(store, row_from_config(cfg, status="completed", miou=77.0))
    write_sweep_manifest(store, "g", [cfg.run_id, cell("hrnetv2_w48", **{"run.sweep": "g"}).run_id])
    report = reconcile(store, "g")
    assert report.completed == [cfg.run_id] and len(report.missing) == 1


def test_launch_columns_come_from_the_launcher_environment(tmp_path, monkeypatch):
    cfg = config.load(None)
    for var in ("OCR_CLUSTER_LAUNCHER", "OCR_CLUSTER_JOB_ID", "OCR_CLUSTER_RESTART_COUNT",
                "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)
    plain = row_from_config(cfg, status="completed")
    assert (plain["launcher"], plain["scheduler_job_id"], plain["restart_count"]) == (None, None, None)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_X"}}')
    assert row_from_config(cfg, status="failed")["launcher"] == "ray-job"
    assert row_from_config(cfg, status="failed")["scheduler_job_id"] == "raysubmit_X"
    monkeypatch.setenv("OCR_CLUSTER_LAUNCHER", "slurm")
    monkeypatch.setenv("OCR_CLUSTER_JOB_ID", "41_3")
    monkeypatch.setenv("OCR_CLUSTER_RESTART_COUNT", "2")
    uri = write_run(str(tmp_path), row_from_config(cfg, status="completed", miou=50.0))
    got = read_attempts(str(tmp_path)).to_pylist()[0]
    assert (got["launcher"], got["scheduler_job_id"], got["restart_count"]) == ("slurm", "41_3", 2)
    assert pq.read_schema(uri).field("restart_count").type == pa.int32()
