"""Runs on a real cluster: a failed run keeps its TensorBoard events, and a driver that joins a running
cluster itself (RAY_ADDRESS, not `ray job submit`) checks that the nodes can read the data before any
worker starts, and trains when they can.

The shared head (`ray_cluster`) has no S3 credentials of its own; `bare_ray_node` has its own, as a
cluster node with an instance role or profile would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_job import staged_tensorboard, store_rows, submit, tensorboard_events, tiny_job, write_synth_with_bad

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def synth(_s3_service):
    return write_synth_with_bad(_s3_service, f"s3://{_s3_service.info['bucket']}/cluster-runs/synth", ())


@pytest.fixture(scope="module")
def bad_val_synth(_s3_service):
    """The tiny dataset with one undecodable val image: a run fails at its first evaluation."""
    return write_synth_with_bad(_s3_service, f"s3://{_s3_service.info['bucket']}/cluster-runs/bad-val",
                                ("val_000001",))


def test_a_run_that_fails_still_uploads_its_tensorboard_events(ray_cluster, s3, bad_val_synth, tmp_path):
    # One worker (rank 0 is the one that fails), logging every iteration; the evaluation at iteration 4
    # meets the bad val image, before any checkpoint.
    job, root = tiny_job(tmp_path, s3, bad_val_synth, cluster={"num_workers": 1, "max_failures": 0},
                         schedule={"iters": 8, "checkpoint_interval": 8, "log_interval": 1},
                         evaluation={"interval": 4, "fps_images": 2})
    result = submit(ray_cluster, s3, job)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-4000:]
    (row,) = store_rows(f"{root}/results")
    assert row["status"] == "failed" and "val_000001" in row["error"], row["error"]
    events = tensorboard_events(f"{root}/runs/{row['run_id']}/tensorboard")
    assert len(events) == 1, sorted(events)
    (data,) = events.values()
    assert b"train/loss" in data and b"train/lr" in data  # iterations 1-4, written before the failure
    assert staged_tensorboard(row["run_id"]) == []


def _join(cluster, env: dict[str, str], job: Path) -> subprocess.CompletedProcess:
    """`python -m ocr_cluster.train JOB` with RAY_ADDRESS set to `cluster`, as a user's shell runs it."""
    env = {**os.environ, **cluster.env, **env, "RAY_ADDRESS": cluster.address}
    env.pop("RAY_JOB_CONFIG_JSON_ENV_VAR", None)
    return subprocess.run([sys.executable, "-m", "ocr_cluster.train", str(job)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_joining_a_cluster_whose_nodes_cannot_read_the_data_fails_in_one_line(ray_cluster, s3, synth, tmp_path):
    job, root = tiny_job(tmp_path, s3, synth)
    started = time.monotonic()
    result = _join(ray_cluster, s3.env, job)  # the driver has credentials; the head's nodes have none
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"the cluster's nodes cannot read {synth}" in lines[0] and "NoCredentialsError" in lines[0]
    assert "ray start" in lines[0] and "--with-secrets" in lines[0]  # how to fix it
    assert "Traceback" not in result.stdout + result.stderr and "ActorDiedError" not in result.stderr
    assert store_rows(f"{root}/results") == []  # no failed row: nothing ran
    assert time.monotonic() - started < 180


def test_joining_a_cluster_whose_nodes_have_credentials_trains(bare_ray_node, s3, synth, tmp_path):
    job, root = tiny_job(tmp_path, s3, synth, cluster={"num_workers": 1, "max_failures": 0},
                         schedule={"iters": 4, "checkpoint_interval": 2, "log_interval": 2},
                         evaluation={"interval": 4, "fps_images": 2})
    result = _join(bare_ray_node, bare_ray_node.node_env, job)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "completed: mIoU" in log
    assert [r["status"] for r in store_rows(f"{root}/results")] == ["completed"]
    # The package came with the driver (the node has none), and the endpoint setting, not the credentials.
    assert list(bare_ray_node.temp_dir.glob("session_*/runtime_resources/py_modules_files/*"))
    agent_logs = [p.read_bytes() for p in bare_ray_node.temp_dir.rglob("runtime_env_agent.log")]
    assert any(bare_ray_node.node_env["AWS_ENDPOINT_URL"].encode() in data for data in agent_logs)
    assert not any(bare_ray_node.secret.encode() in data for data in agent_logs)
