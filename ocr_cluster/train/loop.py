"""The per-worker training function that Ray Train runs on every worker (one per GPU).

Reads top to bottom: model -> optimizer -> resume -> iterations (accumulated micro-batches, AMP, poly
LR) -> periodic evaluation and checkpoint -> final evaluation, fps, memory -> rank 0 writes the row.
Every rank calls `ray.train.report` at each checkpoint; only rank 0 attaches the checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from ocr_cluster import config as config_mod, logs
from ocr_cluster.data.pipeline import iter_eval, open_dataset, torch_batches
from ocr_cluster.models import build_model, convert_sync_batchnorm
from ocr_cluster.models.convert import load_checkpoint
from ocr_cluster.train import checkpoint
from ocr_cluster.train.inference import InferenceSettings, evaluate, measure_fps
from ocr_cluster.train.losses import segmentation_loss
from ocr_cluster.train.metrics import IoUMetric
from ocr_cluster.train.progress import Progress, say
from ocr_cluster.train.schedule import build_optimizer, set_lr


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def intervals(cfg: config_mod.Config) -> tuple[int, int]:
    """(checkpoint, evaluation) intervals in iterations; 0 in the config = a tenth of the run."""
    tenth = max(1, cfg.schedule.iters // 10)
    return cfg.schedule.checkpoint_interval or tenth, cfg.evaluation.interval or tenth


def micro_batch(cfg: config_mod.Config, world: int) -> tuple[int, int]:
    """(samples per worker per forward, accumulation steps) reaching data.batch_size per optimizer step."""
    per_worker = cfg.data.batch_size // max(world, 1)
    micro = cfg.cluster.micro_batch or per_worker
    return micro, per_worker // micro


def run_evaluation(model, cfg, manifest, rank, world, device, dtype, ms_flip=False) -> dict:
    """mIoU over the whole val split, each worker taking every world-th image, confusion all-reduced."""
    bare = getattr(model, "module", model)
    if world > 1:  # evaluate rank 0's BN statistics everywhere: the checkpoint's model, whatever the norm
        for buffer in bare.buffers():
            torch.distributed.broadcast(buffer, src=0)
    metric = IoUMetric(manifest.num_classes)
    settings = InferenceSettings.from_config(cfg.evaluation, bare.final_head.align_corners, ms_flip=ms_flip)
    evaluate(bare, iter_eval(cfg.data, rank=rank, world_size=world, manifest=manifest), metric, settings, device,
             dtype)
    metric.all_reduce()
    return metric.compute()


def train_fn_per_worker(loop_config: dict) -> None:
    logs.train_worker()
    cfg = config_mod.loads_yaml(loop_config["config_yaml"])
    run_id = cfg.run_id
    manifest = open_dataset(cfg.data)  # read once: classes for the model, the evaluations and the row
    num_classes = manifest.num_classes
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = amp_dtype(cfg.cluster.amp, device)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)

    # Model: SyncBN under DDP when asked; pretrained weights only for a fresh start.
    model = build_model(cfg.model.backbone, cfg.model.head, num_classes, align_corners=cfg.model.align_corners,
                        dropout_ratio=cfg.model.dropout_ratio, norm=cfg.model.norm, aux_weight=cfg.loss.aux_weight)
    if cfg.model.norm == "syncbn" and world > 1:
        if device.type == "cuda":
            model = convert_sync_batchnorm(model)
        elif rank == 0:  # torch's SyncBatchNorm runs on CUDA only
            say(f"[{run_id}] model.norm syncbn: CPU workers use per-worker BatchNorm")
    resume = ray.train.get_checkpoint()
    if resume is None and cfg.model.pretrained:
        load_checkpoint(model, cfg.model.pretrained)
    elif resume is None and cfg.model.pretrained_backbone:
        load_checkpoint(model, cfg.model.pretrained_backbone, backbone_only=True)
    loss_weights = dict(model.loss_weights)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(getattr(model, "module", model), cfg.optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start_iter = 0
    if resume is not None:
        with resume.as_directory() as directory:
            start_iter = checkpoint.load(directory, model, optimizer, scaler, restore_rng=rank == 0)
        if rank != 0:
            torch.manual_seed(cfg.run.seed * 1000003 + rank * 7919 + start_iter)
        else:
            say(f"[{run_id}] resumed from the checkpoint at iteration {start_iter}")
    else:
        torch.manual_seed(cfg.run.seed + rank)  # dropout differs per rank, as in mmseg

    class_weight = torch.tensor(cfg.loss.class_weight, device=device) if cfg.loss.class_weight else None
    ohem = (cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept) if cfg.loss.ohem else None
    micro, accum = micro_batch(cfg, world)
    ckpt_every, eval_every = intervals(cfg)
    batches = torch_batches(ray.train.get_dataset_shard("train"), micro, device=device)
    progress = Progress(cfg, run_id, start_iter, rank, images_per_iter=cfg.data.batch_size)
    meta = {"run_id": run_id, "backbone": cfg.model.backbone, "head": cfg.model.head, "num_classes": num_classes,
            "align_corners": cfg.model.align_corners, "config_yaml": cfg.to_yaml()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    model.train()

    for it in range(start_iter, cfg.schedule.iters):
        lr = set_lr(optimizer, it, cfg.optimizer.lr, cfg.schedule)
        for step in range(accum):
            wait_start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(f"the training data stream ended at iteration {it}; "
                                   "the dataset is too small for this many iterations")
            progress.data_wait(time.perf_counter() - wait_start)
            last = step == accum - 1
            no_sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                outputs = model(batch["image"])
                loss, parts = segmentation_loss(outputs, batch["label"], loss_weights,
                                                reduction=cfg.loss.reduction, class_weight=class_weight,
                                                align_corners=cfg.model.align_corners, ohem=ohem)
            scaler.scale(loss / accum).backward()
            progress.add_loss(loss.detach(), parts, accum)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(progress.last_loss):
            raise FloatingPointError(f"the loss became {progress.last_loss} at iteration {it + 1}")

        done = it + 1
        final = done == cfg.schedule.iters
        due_eval, due_ckpt = final or done % eval_every == 0, final or done % ckpt_every == 0
        metrics = {"iter": done, "lr": lr, **progress.losses()} if due_ckpt else {}  # before step() resets it
        progress.step(done, lr)
        if due_eval:
            scores = run_evaluation(model, cfg, manifest, rank, world, device, dtype)
            metrics.update({"mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"]})
            progress.evaluated(done, scores)
        if due_ckpt:
            report(model, optimizer, scaler, done, metrics, meta, rank)

    # End of the run: ms+flip, speed and memory as mmseg's README columns, then the result row.
    train_time = time.time() - started
    scores = progress.last_scores or run_evaluation(model, cfg, manifest, rank, world, device, dtype)
    ms_scores = run_evaluation(model, cfg, manifest, rank, world, device, dtype, ms_flip=True) \
        if cfg.evaluation.ms_flip else None
    if rank == 0:
        from ocr_cluster.train.results import write_completed

        fps = fps_on_val(model, cfg, manifest, device, dtype)
        mem_gb = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
        write_completed(cfg, run_id, list(manifest.classes), scores, ms_scores, fps=fps, mem_gb=mem_gb, train_time_s=train_time,
                        started_at=dt.datetime.fromtimestamp(started, dt.timezone.utc),
                        world=world, num_nodes=max(1, world // max(1, context.get_local_world_size())))
    progress.close()


def report(model, optimizer, scaler, done: int, metrics: dict, meta: dict, rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint, uploaded before this returns."""
    directory = None
    if rank == 0:
        directory = Path(tempfile.mkdtemp(prefix="ocr_ckpt_"))
        checkpoint.save(directory, model, optimizer, done, meta, scaler)
    try:
        ckpt = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint.dir_name(done))
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def fps_on_val(model, cfg: config_mod.Config, manifest, device: torch.device, dtype) -> float | None:
    images = []
    for sample in iter_eval(cfg.data, rank=0, world_size=1, manifest=manifest):
        images.append(torch.as_tensor(sample["image"]))
        if len(images) >= cfg.evaluation.fps_images:
            break
    if images:  # a val split smaller than fps_images is timed round and round
        images = [images[i % len(images)] for i in range(cfg.evaluation.fps_images)]
    return measure_fps(getattr(model, "module", model), images, device, autocast_dtype=dtype)

