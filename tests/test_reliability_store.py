"""A store that is not there, an endpoint that does not answer, credentials that are refused: one line,
exit 2, from the `results` and `data` commands; and a killed writer's temp file removed by the next write.

Everything runs against the real local services (moto's S3 server, the real CLI in a subprocess).
"""

from __future__ import annotations

import os
import time

import pytest

from ocr_cluster import config
from ocr_cluster.results import row_from_config, write_sweep_manifest, write_run


def _row() -> dict:
    cfg = config.load(None, ["data.dataset=cityscapes", "schedule.iters=40000"])
    return row_from_config(cfg, status="completed", miou=70.0)


def one_error_line(result) -> str:
    """The only stderr line of a command that must fail with exit 2 and no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# a store that does not exist


def test_missing_local_store_is_exit_2_and_not_created(cli, tmp_path):
    store = tmp_path / "typo"
    line = one_error_line(cli("results", "table", "--store", str(store)))
    assert f"results store {store} does not exist" in line
    line = one_error_line(cli("results", "compact", "--store", str(store)))
    assert "does not exist" in line
    assert not store.exists()  # compact did not write an index into the typo'd path


def test_existing_empty_local_store_is_a_warning(cli, tmp_path):
    result = cli("results", "table", "--store", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"warning: no runs in {tmp_path} match" in result.stderr


@pytest.mark.s3
@pytest.mark.parametrize("case", ["missing bucket", "never-written prefix"])
def test_missing_s3_store_is_exit_2(case, cli, s3):
    store = "s3://ocr-no-such-bucket/results" if case == "missing bucket" else s3.url("never-written")
    line = one_error_line(cli("results", "table", "--store", store))
    assert f"results store {store} does not exist" in line
    assert ("no bucket 'ocr-no-such-bucket'" if case == "missing bucket" else "no object under that prefix") in line


@pytest.mark.s3
def test_existing_s3_store_without_runs_is_a_warning(cli, s3):
    store = s3.url("launched")
    write_sweep_manifest(store, "grid", ["a", "b"])  # a sweep was launched; no run has finished yet
    result = cli("results", "table", "--store", store, "--sweep", "grid")
    assert result.returncode == 0, result.stderr
    assert f"warning: no runs in {store} match" in result.stderr


_NATIVE_THREADS_AFTER_TABLE = """
import os, sys, threading
from ocr_cluster import cli, config
from ocr_cluster.results import compact, row_from_config, write_run, write_sweep_manifest
store = sys.argv[1]
cfg = config.load(None, ["data.dataset=cityscapes", "schedule.iters=40000"])
row = row_from_config(cfg, status="completed", miou=70.0)
write_run(store, row); compact(store); write_run(store, dict(row, miou=71.0))  # an index and a loose row
write_sweep_manifest(store, "grid", [row["run_id"]])
native = lambda: len(os.listdir("/proc/self/task")) - threading.active_count()
before = native()
assert cli.main(["results", "table", "--store", store, "--sweep", "grid"]) == 0
print("native threads started:", native() - before)
"""


def test_results_table_starts_no_arrow_thread_pool(tmp_path):
    """Arrow's C++ pools, once started, can abort a short process at exit (apache/arrow#34314): seen
    once in CI as `results table` dying of SIGABRT after printing its answer. Reading the index, the
    rows and the sweep manifest must not start them."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _NATIVE_THREADS_AFTER_TABLE, str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "native threads started: 0" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# endpoints and credentials


def _closed_endpoint() -> str:
    import services  # scripts/services.py, on sys.path through conftest

    return f"http://127.0.0.1:{services.free_port()}"  # nothing listens there


@pytest.mark.s3
@pytest.mark.parametrize("command", ["results table", "data inspect", "data synth"])
def test_closed_endpoint_is_one_line(command, cli, s3):
    store = s3.url("closed")
    args = {"results table": ["results", "table", "--store", store], "data inspect": ["data", "inspect", store],
            "data synth": ["data", "synth", store, "--num-train", "2", "--num-val", "2"]}[command]
    line = one_error_line(cli(*args, env={"AWS_ENDPOINT_URL": _closed_endpoint()}))
    assert store in line and "EndpointConnectionError" in line


@pytest.mark.s3
def test_wrong_credentials_are_one_line(cli, s3):
    import services

    store = s3.url("auth")
    server = services.start_s3(bucket=s3.bucket, enforce_auth=True)
    env = {"AWS_ENDPOINT_URL": server.info["endpoint_url"], "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG0",
           "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    try:
        results = cli("results", "table", "--store", store, env=env)
        inspect = cli("data", "inspect", store, env=env)
    finally:
        server.stop()
    assert f"cannot reach results store {store}: PermissionError" in one_error_line(results)
    assert f"cannot read the dataset at {store}: PermissionError" in one_error_line(inspect)
    assert "wrong-secret" not in results.stderr + inspect.stderr


# ---------------------------------------------------------------------------------------------
# a killed writer's temp file


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path):
    first = write_run(str(tmp_path), _row())
    folder = os.path.dirname(first)
    old, fresh = (os.path.join(folder, f".attempt-000-x.parquet.{tag}.tmp") for tag in ("old", "fresh"))
    for path in (old, fresh):
        with open(path, "wb") as handle:
            handle.write(b"half a parquet file")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(old, (two_hours_ago, two_hours_ago))
    write_run(str(tmp_path), _row())
    assert not os.path.exists(old)  # a killed writer's, long dead
    assert os.path.exists(fresh)  # may be a live writer's
    assert len([n for n in os.listdir(folder) if n.endswith(".parquet")]) == 2
