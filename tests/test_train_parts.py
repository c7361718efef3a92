"""IoUMetric, losses and the optimizer against independent brute-force computations (the LR schedule, OHEM,
loss weights and inference against mmseg: tests/test_fidelity_*.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ocr_cluster.config import OptimizerSection, ScheduleSection
from ocr_cluster.train import losses, schedule
from ocr_cluster.train.metrics import IoUMetric


def brute_force_miou(preds, labels, k, ignore=255):
    """mmseg's definitions, per image then summed, written plainly."""
    inter, union, lab = np.zeros(k), np.zeros(k), np.zeros(k)
    for p, t in zip(preds, labels):
        p, t = p[t != ignore], t[t != ignore]
        for c in range(k):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
            lab[c] += np.sum(t == c)
    iou = [inter[c] / union[c] if union[c] else math.nan for c in range(k)]
    acc = [inter[c] / lab[c] if lab[c] else math.nan for c in range(k)]
    return np.nanmean(iou) * 100, np.nanmean(acc) * 100, inter.sum() / lab.sum() * 100, iou


def test_iou_metric_matches_brute_force():
    gen = np.random.default_rng(0)
    k = 6
    preds = [gen.integers(0, k, (17, 23)) for _ in range(4)]
    labels = [np.where(gen.random((17, 23)) < 0.1, 255, gen.integers(0, k - 1, (17, 23))) for _ in range(4)]
    # class 5 never appears in labels; class 4 disappears from predictions too in one image only
    metric = IoUMetric(k)
    for p, t in zip(preds, labels):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    got = metric.compute()
    miou, macc, aacc, iou = brute_force_miou(preds, labels, k)
    assert got["mIoU"] == round(miou, 2) and got["mAcc"] == round(macc, 2) and got["aAcc"] == round(aacc, 2)
    assert got["IoU"][5] == 0.0  # predicted but never labelled: IoU 0 counts in the mean
    assert math.isnan(got["Acc"][5])  # ... while its accuracy is undefined and left out


def test_class_absent_from_both_is_excluded():
    metric = IoUMetric(3)
    metric.update(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0, 1], [1, 1]]))
    got = metric.compute()
    assert math.isnan(got["IoU"][2])
    assert got["mIoU"] == round((1 / 2 + 2 / 3) / 2 * 100, 2)  # mean over classes 0 and 1 only
    assert got["aAcc"] == 75.0


def test_reduce_zero_label():
    metric = IoUMetric(2, reduce_zero_label=True)
    # labels 0 (other) -> ignored, 1 -> class 0, 2 -> class 1
    metric.update(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 2, 2]))
    got = metric.compute()
    assert got["aAcc"] == round(2 / 3 * 100, 2)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        IoUMetric(2).update(torch.tensor([0]), torch.tensor([7]))


def _all_reduce_worker(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metric = IoUMetric(3)
    metric.update(torch.tensor([rank, 1]), torch.tensor([rank, 2]))
    metric.all_reduce()
    out[rank] = metric.compute()["mIoU"]
    dist.destroy_process_group()


def test_all_reduce_sums_confusion_across_ranks():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_all_reduce_worker, args=(port, out), nprocs=2, join=True)
    single = IoUMetric(3)
    single.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 2, 1, 2]))
    assert out[0] == out[1] == single.compute()["mIoU"]


def test_mmseg_reduction_divides_by_all_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    label = torch.randint(0, 4, (2, 8, 8))
    label[:, :2] = 255
    per_pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    assert torch.allclose(losses.cross_entropy(logits, label), per_pixel.sum() / label.numel())
    assert torch.allclose(losses.cross_entropy(logits, label, reduction="valid"),
                          F.cross_entropy(logits, label, ignore_index=255))
    w = torch.tensor([0.5, 1.0, 2.0, 1.5])
    assert torch.allclose(losses.cross_entropy(logits, label, reduction="valid", class_weight=w),
                          F.cross_entropy(logits, label, weight=w, ignore_index=255))
    weighted = F.cross_entropy(logits, label, weight=w, ignore_index=255, reduction="none")
    assert torch.allclose(losses.cross_entropy(logits, label, class_weight=w), weighted.mean())


def test_logits_are_resized_to_the_label():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1] = 5.0
    label = torch.ones(1, 16, 16, dtype=torch.long)
    loss = losses.cross_entropy(logits, label)
    assert loss.item() == pytest.approx(-math.log(math.exp(5) / (1 + math.exp(5))), rel=1e-5)


def test_ohem_keeps_hard_pixels():
    # 10 pixels; ground-truth probabilities rise with the index
    label = torch.zeros(1, 1, 10, dtype=torch.long)
    logits = torch.zeros(1, 2, 1, 10)
    logits[0, 0, 0] = torch.linspace(-3, 3, 10)
    probs = logits.softmax(1)[0, 0, 0]
    kept = losses.ohem_weights(logits, label, thresh=0.7, min_kept=2)[0, 0]
    assert kept.tolist() == (probs < 0.7).float().tolist()  # threshold = max(0.7, 3rd smallest prob)
    kept = losses.ohem_weights(logits, label, thresh=0.1, min_kept=4)[0, 0]
    assert kept.sum() == 4  # min_kept raises the threshold to the 5th smallest probability
    label[0, 0, :3] = 255
    kept = losses.ohem_weights(logits, label, thresh=0.1, min_kept=4)[0, 0]
    assert kept[:3].sum() == 0 and kept.sum() == 4


def test_optimizer_groups_and_head_lr_mult():
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(2, 2)
    opt = schedule.build_optimizer(model, OptimizerSection(lr=0.01, head_lr_mult=10.0))
    schedule.set_lr(opt, 0, 0.01, ScheduleSection(iters=10, min_lr=0.0))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.01, 0.1])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("overrides, world, micro, accum", [
    (["data.batch_size=16", "cluster.num_workers=4"], 4, 4, 1),
    (["data.batch_size=16", "cluster.num_workers=2", "cluster.micro_batch=2"], 2, 2, 4),  # 2 x 2 x 4 steps = 16
    (["data.batch_size=6", "cluster.num_workers=0"], 1, 6, 1),  # Ray's local mode: one worker
    (["data.batch_size=8", "cluster.num_workers=1", "cluster.micro_batch=8"], 1, 8, 1),
])
def test_layout_splits_the_global_batch(overrides, world, micro, accum):
    from ocr_cluster import config
    from ocr_cluster.train.layout import RunLayout

    layout = RunLayout.from_config(config.load(overrides=overrides))
    assert (layout.world, layout.micro_batch, layout.accum_steps) == (world, micro, accum)
    assert layout.world * layout.micro_batch * layout.accum_steps == config.load(overrides=overrides).data.batch_size


def test_layout_paths_and_gpus():
    from ocr_cluster import config
    from ocr_cluster.train.layout import RunLayout, checkpoint_dir, checkpoint_iteration

    cfg = config.load(overrides=["storage.checkpoint_uri=s3://bucket/runs/", "schedule.iters=80000",
                                 "cluster.num_workers=4", "cluster.use_gpu=true", "data.batch_size=8"])
    layout = RunLayout.from_config(cfg)
    run = f"s3://bucket/runs/{cfg.run_id}"
    assert layout.run_id == cfg.run_id and layout.run_uri == run and layout.num_gpus == 4
    assert layout.tensorboard_uri == f"{run}/tensorboard"
    assert layout.checkpoint_uri(2000) == f"{run}/checkpoint_iter=0002000"
    assert layout.final_model_uri == f"{run}/checkpoint_iter=0080000/model.pt"
    assert checkpoint_iteration(checkpoint_dir(123)) == 123
    assert checkpoint_iteration("checkpoint_iter=12x") is None and checkpoint_iteration("tensorboard") is None
    assert RunLayout.from_config(config.load(overrides=["cluster.num_workers=4", "data.batch_size=8"])).num_gpus == 0
    with pytest.raises(AttributeError):
        layout.world = 8  # frozen: derived once


def test_layout_imports_without_ray_or_torch():
    import subprocess
    import sys

    code = ("import sys; import ocr_cluster.train.layout, ocr_cluster.config; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_worker_seed_formulas():
    from ocr_cluster.train.loop import worker_seed

    assert [worker_seed(5, rank) for rank in range(3)] == [5, 6, 7]  # from scratch: seed + rank
    assert worker_seed(5, 1, resumed_at=40) == 5 * 1000003 + 7919 + 40  # resumed: per rank and resume point
    assert worker_seed(5, 1, resumed_at=40) != worker_seed(5, 1, resumed_at=44)


def test_skip_counter_counts_a_sample_met_every_epoch_once():
    from ocr_cluster.data.plan import _CounterActor  # the counter's state, without starting its Ray actor

    counter = _CounterActor()
    for _epoch in range(3):
        counter.add("shard a.parquet: sample 's2': image cannot be decoded", 1)
        counter.add("shard b.parquet is truncated (its 6 samples skipped)", 6)
    assert counter.total() == 21 and counter.distinct() == 7
