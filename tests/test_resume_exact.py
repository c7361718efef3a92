"""Exact resume at the level of the real loop: a run whose worker is SIGKILLed and restarted by Ray Train
inside the same fit() goes on from its last checkpoint with the step the uninterrupted run took next: the
same samples (keys and augmented pixels), the same loss to the bit, the same parameters at the end.

Dropout (model.dropout_ratio) makes the torch RNG matter, SGD momentum the optimizer state, the poly
schedule the LR, and 16 samples at batch 4 over 8 iterations put checkpoints 2 and 6 mid-epoch, where the
stream must start inside an epoch. One CPU worker with data.preserve_order makes the order deterministic.
The loop records each step through OCR_CLUSTER_STEP_TRACE (ocr_cluster/train/trace.py). The interrupted
run normalises its crops on the device (cluster.normalize_on: device, uint8 crops from the decode tasks,
some padded), the uninterrupted one in the decode tasks: the same values to the bit, so the same steps.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ocr_cluster import config as config_mod
from ocr_cluster.train.trace import TRACE_ENV
from test_train_job import registered_checkpoint, store_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ITERS = 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    from ocr_cluster.data.synth import SynthSpec, write_synthetic

    uri = str(tmp_path_factory.mktemp("resume") / "synth")
    manifest = write_synthetic(uri, SynthSpec(classes=4, num_train=16, num_val=2, size_hw=(64, 64)), shard_mb=0.02)
    assert len(manifest.split("train").shards) >= 3  # a resume skips whole shards and part of one
    return uri


def job(root: Path, synth: str, **cluster) -> config_mod.Config:
    body = {
        "model": {"backbone": "hrnetv2_w18_small", "head": "ocr", "dropout_ratio": 0.1},
        "data": {"dataset": "synthetic", "uri": synth, "crop_size": "64x64", "scale": "64x64", "batch_size": 4,
                 "preserve_order": True},
        "schedule": {"iters": ITERS, "checkpoint_interval": 2, "log_interval": 2},
        "evaluation": {"interval": ITERS, "fps_images": 1},
        "cluster": {"num_workers": 1, "max_failures": 0, **cluster},
        "storage": {"checkpoint_uri": str(root / "runs"), "num_to_keep": 20},
        "results": {"store_uri": str(root / "results")},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return config_mod.load(str(path), [])


def train(ray_cluster, cfg: config_mod.Config, trace: Path) -> None:
    """driver.run in this process, joined to the test head, with the step trace on in the workers."""
    import ray

    from ocr_cluster.train import driver

    trace.mkdir(parents=True)
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": {TRACE_ENV: str(trace)}}, log_to_driver=False)
    try:
        assert driver.run(cfg) == 0
    finally:
        ray.shutdown()


def kill_after_first_checkpoint(runs: Path, trace: Path, out: dict, stop: threading.Event) -> None:
    """SIGKILL the training worker (its pid from the step trace) once Ray Train has registered a checkpoint
    (its checkpoint manager's snapshot appears); then out['registered'] = the latest registered checkpoint's
    iteration as of the kill, read once the worker is gone."""
    while not stop.is_set():
        if list(runs.glob("*/checkpoint_manager_snapshot.json")) and (trace / "rank0.jsonl").exists():
            break
        time.sleep(0.1)
    else:
        return
    out["killed"] = steps(trace)[-1]["pid"]
    os.kill(out["killed"], signal.SIGKILL)
    time.sleep(2)  # a report the worker sent before it died is registered by now; no new one can come
    out["registered"] = registered_checkpoint(str(runs))


def steps(trace: Path) -> list[dict]:
    return [json.loads(line) for line in (trace / "rank0.jsonl").read_text().splitlines()]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    (path,) = root.glob(f"runs/*/checkpoint_iter={ITERS:07d}/model.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_restarted_worker_goes_on_with_the_uninterrupted_runs_next_step(ray_cluster, synth, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir(), resumed.mkdir()
    train(ray_cluster, job(straight, synth), straight / "trace")

    kill: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=kill_after_first_checkpoint,
                              args=(resumed / "runs", resumed / "trace", kill, stop), daemon=True)
    killer.start()
    try:
        train(ray_cluster, job(resumed, synth, max_failures=1, normalize_on="device"), resumed / "trace")
    finally:
        stop.set()
        killer.join(timeout=10)
    assert "registered" in kill, f"no worker was killed: {kill}"

    reference = {s["iter"]: s for s in steps(straight / "trace")}
    assert sorted(reference) == list(range(1, ITERS + 1))
    trace = steps(resumed / "trace")
    first = [s for s in trace if s["pid"] == kill["killed"]]
    second = [s for s in trace if s["pid"] != kill["killed"]]
    assert first and first == trace[:len(first)]
    assert second, "the killed attempt finished the run"
    resumed_at = second[0]["iter"] - 1
    # From the checkpoint registered when the worker died (not 0, not another): every iteration after it once.
    assert resumed_at == kill["registered"], (resumed_at, kill)
    assert 2 <= resumed_at <= first[-1]["iter"], (resumed_at, first[-1]["iter"])
    assert [s["iter"] for s in second] == list(range(resumed_at + 1, ITERS + 1))
    for step in first + second:  # both attempts: the uninterrupted run's steps, bit for bit
        ref = reference[step["iter"]]
        assert step["keys"] == ref["keys"], step["iter"]
        assert step["images_sha256"] == ref["images_sha256"], step["iter"]
        assert (step["loss"], step["lr"]) == (ref["loss"], ref["lr"]), step["iter"]

    ours, theirs = final_weights(resumed), final_weights(straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    for root in (straight, resumed):
        (row,) = store_rows(str(root / "results"))
        assert row["status"] == "completed" and row["iters"] == ITERS


# --------------------------------------------------------------------------------------------- the parts


def test_a_resumed_stream_starts_inside_the_epoch_where_the_checkpoint_left_it(synth):
    """The read tasks of a stream resumed at (epoch, consumed) yield the uninterrupted stream's rows from
    there on, also when `consumed` ends inside a shard (no cluster: the read tasks run in this process)."""
    from ocr_cluster.data import pipeline
    from ocr_cluster.data.plan import block_rows_for

    manifest = pipeline.open_dataset(config_mod.DataSection(uri=synth))

    def keys(start_epoch: int, skip: int) -> list[tuple[int, str]]:
        source = pipeline._ShardSource(manifest, "train", epochs=[start_epoch, start_epoch + 1], seed=3, shuffle=True,
                                       rank=0, world_size=1, verify=True, skip_bad=False, counter=None,
                                       block_rows=block_rows_for(manifest, "train"), skip=skip)
        return [(int(e), str(k)) for task in source.get_read_tasks(1) for block in task()
                for e, k in zip(block.column("epoch").to_pylist(), block.column("key").to_pylist())]

    whole = keys(0, 0)
    assert len(whole) == 32 and len({k for _, k in whole}) == 16
    for iteration in (1, 2, 3, 5, 6):  # batch 4 of 16 samples: inside epoch 0 and epoch 1, shard cuts too
        epoch, consumed = pipeline.stream_position(iteration, 4, manifest)
        assert keys(epoch, consumed) == (whole + keys(2, 0))[iteration * 4:][:32 - consumed], iteration


def test_a_checkpoint_restores_momentum_scaler_and_each_ranks_generators(tmp_path):
    """checkpoint.save/load: the optimizer's momentum buffers, an enabled GradScaler's state, and rank r's
    torch / numpy / Python generators, as they were at the save, on rank r."""
    import random

    import numpy as np

    from ocr_cluster.train import checkpoint

    def setup():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)

    model, optimizer, scaler = setup()
    for _ in range(2):  # momentum buffers, and the scaler's growth tracker at 2
        scaler.scale(model(torch.ones(1, 3)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    ranks = []
    for rank in range(2):  # what each rank's generators would be at the checkpoint
        torch.manual_seed(100 + rank), np.random.seed(100 + rank), random.seed(100 + rank)
        np.random.standard_normal(), random.gauss(0, 1)  # Gaussian caches in use
        ranks.append(checkpoint.rng_state())
    checkpoint.save(tmp_path, model, optimizer, 6, {}, scaler, rng=ranks)

    for rank in range(2):
        torch.manual_seed(100 + rank), np.random.seed(100 + rank), random.seed(100 + rank)
        np.random.standard_normal(), random.gauss(0, 1)
        want = (torch.rand(3), np.random.standard_normal(), random.random(), random.gauss(0, 1))
        fresh_model, fresh_optimizer, fresh_scaler = setup()
        torch.manual_seed(7), np.random.seed(7), random.seed(7)
        iteration, _, rng = checkpoint.load(tmp_path, fresh_model, fresh_optimizer, fresh_scaler, rank=rank, world=2)
        assert iteration == 6 and rng is not None
        got = (torch.rand(3), np.random.standard_normal(), random.random(), random.gauss(0, 1))
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:], rank
        ours, theirs = fresh_optimizer.state_dict()["state"], optimizer.state_dict()["state"]
        assert all(torch.equal(ours[i]["momentum_buffer"], theirs[i]["momentum_buffer"]) for i in theirs)
        assert fresh_scaler.state_dict() == scaler.state_dict() != setup()[2].state_dict()
    # A resume on another number of workers has no generators for its ranks: the loop reseeds them.
    assert checkpoint.load(tmp_path, *setup(), rank=0, world=3)[2] is None
