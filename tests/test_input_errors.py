"""Deterministic input errors on the real services: found once, never retried, exit 2 with one line.

A truncated shard and a `model.pretrained` that is no loadable checkpoint are found by preflight,
before any worker starts. A bad label inside a shard whose size and checksum match the manifest can
only be found by a worker: the run then ends after that one attempt (Ray Train does not retry it),
with the line naming shard and key as the job's last line and in the failed row.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest
import torch
from test_train_job import SPEC_ARGS, _s3_env, store_rows, submit, tiny_job, write_synth

from ocr_cluster import storage

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]

BAD_LABEL_KEY = "train_000005"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _fresh(service, name: str) -> str:
    return f"s3://{service.info['bucket']}/input-errors-{uuid.uuid4().hex[:8]}/{name}"


@pytest.fixture(scope="module")
def good_uri(_s3_service):
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    uri = _fresh(_s3_service, "synth")
    with _s3_env(_s3_service):
        write_synthetic(uri, SynthSpec(**SPEC_ARGS))
    return uri


@pytest.fixture(scope="module")
def truncated_uri(_s3_service):
    """The tiny synthetic dataset with its train shard cut to half its size (the manifest unchanged)."""
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    uri = _fresh(_s3_service, "truncated")
    with _s3_env(_s3_service):
        manifest = write_synthetic(uri, SynthSpec(**SPEC_ARGS))
        shard = storage.join(uri, manifest.split("train").shards[0].path)
        data = storage.read_bytes(shard)
        storage.write_bytes_atomic(shard, data[: len(data) // 2])
    return uri, shard, len(data)


@pytest.fixture(scope="module")
def bad_label_uri(_s3_service):
    """The tiny dataset with one label (BAD_LABEL_KEY) holding class 9 of 4; the writer computed sizes and
    checksums of what it wrote, so only the content is bad."""
    import numpy as np

    from ocr_cluster.data import codec

    def class_9(key, data, encoded, label):
        return data, codec.encode_label(np.full_like(label, 9)) if key == BAD_LABEL_KEY else encoded

    uri = _fresh(_s3_service, "bad-label")
    manifest = write_synth(_s3_service, uri, class_9)
    return uri, storage.join(uri, manifest.split("train").shards[0].path)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_truncated_shard_fails_in_preflight(ray_cluster, s3, truncated_uri, tmp_path, cli):
    uri, shard, size = truncated_uri
    job, root = tiny_job(tmp_path, s3, uri)
    started = time.monotonic()
    result = cli("train", str(job), env={**s3.env, "RAY_ADDRESS": ray_cluster.address}, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    line = _one_error_line(result.stderr)
    assert f"shard {shard} is truncated: {size // 2} bytes, the manifest says {size}" in line
    assert "RayTrainWorker" not in output and "Traceback" not in output
    assert time.monotonic() - started < 60
    assert not store_rows(f"{root}/results")  # nothing started, nothing recorded


@pytest.mark.parametrize("content", ["random bytes", "unrelated keys"])
def test_pretrained_that_is_no_checkpoint_fails_in_preflight(content, ray_cluster, s3, good_uri, tmp_path, cli):
    import io

    pretrained = f"{s3.url('pretrained')}/weights.pth"
    if content == "random bytes":
        data = os.urandom(4096)
    else:
        buffer = io.BytesIO()
        torch.save({"encoder.weight": torch.zeros(3, 3), "step": torch.tensor(7)}, buffer)
        data = buffer.getvalue()
    storage.write_bytes_atomic(pretrained, data)
    job, root = tiny_job(tmp_path, s3, good_uri, model={"pretrained": pretrained})
    started = time.monotonic()
    result = cli("train", str(job), env={**s3.env, "RAY_ADDRESS": ray_cluster.address}, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    line = _one_error_line(result.stderr)
    assert line.startswith("ocr-cluster train: error: model.pretrained: ") and pretrained in line, line
    assert "not a checkpoint this project, mmseg or HRNet-OCR can load" in line, line
    assert "weights_only` set to `False`" not in output and "weights_only=False" not in output
    assert "Re-running" not in output and "RayTrainWorker" not in output and "Traceback" not in output
    assert time.monotonic() - started < 60
    assert not store_rows(f"{root}/results")


def test_bad_label_found_by_a_worker_ends_the_run_at_once(ray_cluster, s3, bad_label_uri, tmp_path):
    from ray.job_submission import JobSubmissionClient

    uri, shard = bad_label_uri
    # Two workers, max_failures 3 (tiny_job's): before the fix Ray Train ran this four times.
    job, root = tiny_job(tmp_path, s3, uri)
    started = time.monotonic()
    result = submit(ray_cluster, s3, job, "--verbose")  # verbose: Ray Train's failure decisions in the log
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    (submission_id,) = set(re.findall(r"raysubmit_\w+", output))
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    assert client.get_job_info(submission_id).driver_exit_code == 2, output[-4000:]
    log = client.get_job_logs(submission_id)
    expected = f"shard {shard}: sample '{BAD_LABEL_KEY}': label has values outside [0, 4) and 255: 9"
    last = [line for line in log.splitlines() if line.strip()][-1]
    assert last == f"python -m ocr_cluster.train: error: {expected}", log[-4000:]
    # One attempt: Ray Train's failure policy raised at once, with no retry before.
    assert "[FailurePolicy] RETRY" not in log and "[FailurePolicy] RAISE" in log, log[-6000:]

    (row,) = store_rows(f"{root}/results")
    assert row["status"] == "failed" and row["error"] == expected, row["error"]
    assert not ANSI.search(row["error"]) and "\x1b" not in row["error"]
    print(f"the job ended after {elapsed:.0f} s")
