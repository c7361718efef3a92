"""The per-worker training function that Ray Train runs on every worker (one per GPU).

`train_fn_per_worker` reads top to bottom: a `Trainer` is set up (model, optimizer, resume), then each
iteration is one `train_step` (one optimizer step over the accumulated micro-batches, AMP, poly LR)
followed by `after_step` (log; evaluate and checkpoint when due), and `finish` evaluates once more
(ms+flip), times fps, and has rank 0 write the result row. Every rank calls `ray.train.report` at each
checkpoint; only rank 0 attaches the checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray.train
import ray.train.torch
from ray.train.collective import broadcast_from_rank_zero
import torch

from ocr_cluster import config as config_mod, logs
from ocr_cluster.data.batches import torch_batches
from ocr_cluster.data.pipeline import (Stats, epochs_for, iter_eval, open_dataset, stream_position,
                                       train_dataset)
from ocr_cluster.models import build_model, convert_sync_batchnorm
from ocr_cluster.models.convert import load_checkpoint
from ocr_cluster.train import checkpoint, fastpath, host, phases, trace
from ocr_cluster.train.clock import RunClock
from ocr_cluster.train.inference import InferenceSettings, evaluate, measure_fps
from ocr_cluster.train.input_errors import bad_input_ends_the_run
from ocr_cluster.train.layout import RunLayout, checkpoint_dir
from ocr_cluster.train.losses import segmentation_loss
from ocr_cluster.train.metrics import IoUMetric
from ocr_cluster.train.progress import Progress, say
from ocr_cluster.train.schedule import build_optimizer, set_lr


def intervals(cfg: config_mod.Config) -> tuple[int, int]:
    """(checkpoint, evaluation) intervals in iterations; 0 in the config = a tenth of the run."""
    tenth = max(1, cfg.schedule.iters // 10)
    return cfg.schedule.checkpoint_interval or tenth, cfg.evaluation.interval or tenth


def worker_seed(seed: int, rank: int, resumed_at: int | None = None) -> int:
    """A rank's torch seed for training. From scratch: seed + rank, so dropout differs per rank as in mmseg.
    Resumed at an iteration from a checkpoint without this rank's RNG state (another world size): a fresh
    stream per rank and resume point."""
    if resumed_at is None:
        return seed + rank
    return seed * 1000003 + rank * 7919 + resumed_at


def reseed_resumed(seed: int, rank: int, start_iter: int, cpu_restored: bool) -> None:
    """After a resume from a checkpoint that lacks this rank's RNG states (or its CUDA ones), a fresh stream
    per rank and resume point, so that no rank replays the dropout masks of the iterations it trained
    already. With cpu_restored only the CUDA generators are reseeded."""
    value = worker_seed(seed, rank, resumed_at=start_iter)
    if not cpu_restored:
        torch.manual_seed(value)  # the CPU generator and every CUDA device's
    elif torch.cuda.is_available():
        torch.cuda.manual_seed_all(value)


def _over_ranks(value, dtype: torch.dtype, device: torch.device, op=torch.distributed.ReduceOp.SUM):
    """`value` reduced over the ranks (itself outside torch.distributed); on `device` under NCCL."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=dtype, device=on)
    torch.distributed.all_reduce(total, op=op)
    return total.item()


class TrainingPeak:
    """The peak GPU memory of training, as mmseg reports it: evaluations, ms+flip and the fps run left out.
    The peak so far is read before each evaluation and at the end of training, and the counter reset after
    each evaluation. None on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def note(self) -> None:
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))

    def restart(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def gb_over_ranks(self) -> float | None:
        """The largest peak over the ranks in GiB (mmseg: the max over GPUs); every rank calls it."""
        if self.device.type != "cuda":
            return None
        peak = _over_ranks(self.peak, torch.int64, self.device, op=torch.distributed.ReduceOp.MAX)
        return peak / 1024**3


def run_evaluation(model, cfg, manifest, rank, world, device, dtype, ms_flip=False) -> dict:
    """mIoU over the whole val split, each worker taking every world-th image, confusion all-reduced.
    With data.skip_bad_samples, 'skipped' is the number of val samples skipped (all ranks)."""
    bare = getattr(model, "module", model)
    if world > 1:  # evaluate rank 0's BN statistics everywhere: the checkpoint's model, whatever the norm
        for buffer in bare.buffers():
            torch.distributed.broadcast(buffer, src=0)
    metric = IoUMetric(manifest.num_classes)
    settings = InferenceSettings.from_config(cfg.evaluation, bare.final_head.align_corners, ms_flip=ms_flip,
                                             scale=cfg.data.scale)
    stats = Stats()
    evaluate(bare, iter_eval(cfg.data, rank=rank, world_size=world, manifest=manifest, stats=stats), metric,
             settings, device, dtype)
    metric.all_reduce(device)
    skipped = int(_over_ranks(stats.skipped, torch.int64, device)) if cfg.data.skip_bad_samples else 0
    return {**metric.compute(), "skipped": skipped}


def _gather(value, world: int) -> list:
    """`value` of every rank, in rank order (a collective: every rank calls it)."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def train_fn_per_worker(loop_config: dict) -> None:
    phases.mark("worker_fn", rank=ray.train.get_context().get_world_rank())
    logs.train_worker()
    host.keep_freed_memory()  # CPU steps reuse freed activations instead of page-faulting them in again
    with bad_input_ends_the_run():  # a retry would meet the same bad sample or weights again
        trainer = Trainer(config_mod.loads_yaml(loop_config["config_yaml"]), loop_config.get("skip_counter"),
                          loop_config.get("launch"))
        with trainer.progress:  # rank 0's TensorBoard events are uploaded at the end, also when the run fails
            clock = trainer.start()
            for it in range(trainer.start_iter, trainer.cfg.schedule.iters):
                lr = trainer.train_step(it)
                trainer.after_step(it + 1, lr)
                if it == trainer.start_iter:
                    phases.mark("first_step", rank=trainer.rank)
            trainer.finish(clock)


class FirstInBackground:
    """An iterator whose first item is fetched on a thread of its own from the start, so that what the first
    item waits for (Ray Data's coordinator, read and decode tasks starting) runs while the caller does other
    work (building the model, DDP's broadcast). Items after the first come from the caller's thread. An
    exception of the first fetch is raised at the first next()."""

    _END = object()

    def __init__(self, iterator):
        self._iterator, self._first, self._error = iterator, self._END, None
        self._thread = threading.Thread(target=self._fetch, name="first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._iterator, self._END)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread, at its first next()
            self._error = exc

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._iterator)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        if self._first is self._END:
            raise StopIteration
        first, self._first = self._first, None
        return first


class Trainer:
    """One worker's share of the run. Built: the model (pretrained weights on a fresh start), its
    optimizer and AMP scaler, restored from Ray Train's checkpoint on a resume."""

    def __init__(self, cfg: config_mod.Config, skip_counter=None, launch: dict | None = None):
        self.cfg, self.skip_counter, self.launch = cfg, skip_counter, launch
        self.layout = layout = RunLayout.from_config(cfg)
        self.manifest = open_dataset(cfg.data)  # read once: classes for the model, the evaluations and the row
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        phases.mark("manifest", rank=self.rank)
        if self.world != layout.world:
            raise RuntimeError(f"Ray Train started {self.world} workers; the config asks for {layout.world}")
        self.num_nodes = max(1, self.world // max(1, context.get_local_world_size()))
        self.device = ray.train.torch.get_device()
        self.dtype = fastpath.amp_dtype(cfg.cluster.amp, self.device)
        self.normalize_on_device = fastpath.normalize_on_device(cfg.cluster.normalize_on, self.device)
        if cfg.cluster.amp == "native-bf16" and self.rank == 0:
            precision = "bf16" if self.dtype is torch.bfloat16 else "fp32"  # the only two it resolves to
            say(f"[{layout.run_id}] cluster.amp native-bf16: {precision} on {self.device.type}")

        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        resume = ray.train.get_checkpoint()
        self.resumed_clock: dict | None = None  # the run's clock as of the checkpoint resumed from
        # A fresh start's stream starts at the beginning: Ray Data starts up and fetches the first batch while
        # the model is built and DDP broadcasts it. A resume knows its position once the checkpoint is loaded.
        self.start_iter = 0
        self.batches = self._batches() if resume is None else None
        model = self._build_model(fresh=resume is None)
        phases.mark("model_built", rank=self.rank)
        self._prepare(model, wrap=lambda model: ray.train.torch.prepare_model(
            model, move_to_device=self.device, parallel_strategy_kwargs=fastpath.ddp_options(model)))
        phases.mark("ddp", rank=self.rank)
        if resume is not None:
            self.start_iter = self._resume(resume)
            self.batches = self._batches()
        else:
            torch.manual_seed(worker_seed(cfg.run.seed, self.rank))

        self.class_weight = torch.tensor(cfg.loss.class_weight, device=self.device) if cfg.loss.class_weight \
            else None
        self.ohem = (cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept) if cfg.loss.ohem else None
        self.ckpt_every, self.eval_every = intervals(cfg)
        self.trace = trace.StepTrace(self.rank)
        self.progress = Progress(cfg, layout, self.start_iter, self.rank, images_per_iter=cfg.data.batch_size)
        self.meta = {"run_id": layout.run_id, "backbone": cfg.model.backbone, "head": cfg.model.head,
                     "num_classes": self.manifest.num_classes, "align_corners": cfg.model.align_corners,
                     "config_yaml": cfg.to_yaml()}

    def _build_model(self, fresh: bool) -> torch.nn.Module:
        """SyncBN under DDP when asked; pretrained weights only for a fresh start."""
        cfg = self.cfg
        model = build_model(cfg.model.backbone, cfg.model.head, self.manifest.num_classes,
                            align_corners=cfg.model.align_corners, dropout_ratio=cfg.model.dropout_ratio,
                            norm=cfg.model.norm, aux_weight=cfg.loss.aux_weight)
        if cfg.model.norm == "syncbn" and self.world > 1:
            if self.device.type == "cuda":
                model = convert_sync_batchnorm(model)
            elif self.rank == 0:  # torch's SyncBatchNorm runs on CUDA only
                say(f"[{self.layout.run_id}] model.norm syncbn: CPU workers use per-worker BatchNorm")
        if fresh and cfg.model.pretrained:
            load_checkpoint(model, cfg.model.pretrained)
        elif fresh and cfg.model.pretrained_backbone:
            load_checkpoint(model, cfg.model.pretrained_backbone, backbone_only=True)
        return model

    def _prepare(self, model: torch.nn.Module, wrap) -> None:
        """The model made ready to train with the fast-path options (fastpath.prepare: `wrap` is DDP), its
        optimizer and AMP scaler. `self.model` is what is checkpointed and evaluated, never the compiled
        wrapper; `self.forward` is what the training step calls."""
        cfg = self.cfg
        self.loss_weights = dict(model.loss_weights)
        self.model, self.forward = fastpath.prepare(model, cfg.cluster, wrap)
        impl = fastpath.optimizer_impl(cfg.cluster.optimizer_impl, cfg.optimizer.type, self.device.type)
        self.optimizer = build_optimizer(getattr(self.model, "module", self.model), cfg.optimizer, **impl)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def _resume(self, resume: ray.train.Checkpoint) -> int:
        """Model, optimizer, scaler and this rank's RNG states from the checkpoint; the iteration to continue at."""
        with resume.as_directory() as directory:
            start_iter, self.resumed_clock, rng = checkpoint.load(directory, self.model, self.optimizer,
                                                                  self.scaler, rank=self.rank, world=self.world)
        if rng is None or (torch.cuda.is_available() and rng.get("cuda") is None):
            reseed_resumed(self.cfg.run.seed, self.rank, start_iter, cpu_restored=rng is not None)
        if self.rank == 0:
            say(f"[{self.layout.run_id}] resumed from the checkpoint at iteration {start_iter}")
        return start_iter

    def _batches(self) -> FirstInBackground:
        """The training batches from self.start_iter on, the first already on its way."""
        stream = self._train_stream()
        phases.mark("stream_split", rank=self.rank)
        normalize = (tuple(self.cfg.data.mean), tuple(self.cfg.data.std)) if self.normalize_on_device else None
        return FirstInBackground(torch_batches(stream, self.layout.micro_batch, device=self.device,
                                               keys=trace.wanted(), normalize=normalize))

    def _train_stream(self):
        """This worker's share of the training stream, from where this attempt starts: the position the
        checkpoint it resumed from left the stream at (stream_position), or the start. Rank 0 builds the
        stream and splits it as Ray Train's DataConfig would (streaming_split, equal shares, locality); the
        ranks get their splits through Ray Train's broadcast. Built here, not by the driver: when Ray Train
        restarts the worker group inside one fit(), a dataset the driver built would start again where that
        fit() started."""
        cfg, manifest = self.cfg, self.manifest
        nodes = _gather(ray.get_runtime_context().get_node_id(), self.world)
        splits = None
        if self.rank == 0:
            epoch, skip = stream_position(self.start_iter, cfg.data.batch_size, manifest)
            dataset = train_dataset(cfg.data, seed=cfg.run.seed, start_epoch=epoch, skip=skip, manifest=manifest,
                                    num_epochs=epochs_for(cfg.schedule.iters, cfg.data.batch_size, manifest,
                                                          start_epoch=epoch), skip_counter=self.skip_counter,
                                    uint8=self.normalize_on_device)
            if cfg.data.preserve_order:
                dataset.context.execution_options.preserve_order = True
            if self.world == 1:
                return dataset
            splits = dataset.streaming_split(self.world, equal=True, locality_hints=nodes)
        return broadcast_from_rank_zero(splits)[self.rank]

    def start(self) -> RunClock:
        """Training mode, peak-memory counter reset; returns the run's clock, started for this attempt."""
        self.memory = TrainingPeak(self.device)
        self.memory.restart()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed-size crops; evaluate() and the fps run turn it off
        self.clock = RunClock.start(self.resumed_clock)
        self.model.train()
        return self.clock

    def _next_batch(self, it: int) -> dict:
        wait_start = time.perf_counter()
        batch = next(self.batches, None)
        if batch is None:
            raise RuntimeError(f"the training data stream ended at iteration {it}; "
                               "the dataset is too small for this many iterations")
        if it == self.start_iter:
            phases.mark("batch", rank=self.rank)
        self.progress.data_wait(time.perf_counter() - wait_start)
        return batch

    def train_step(self, it: int) -> float:
        """Iteration `it`: one optimizer step over accum_steps micro-batches, gradients synced on the last.
        Returns the learning rate used."""
        cfg, model, accum = self.cfg, self.model, self.layout.accum_steps
        lr = set_lr(self.optimizer, it, cfg.optimizer.lr, cfg.schedule)
        for step in range(accum):
            batch = self._next_batch(it)
            last = step == accum - 1
            no_sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync, torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                outputs = self.forward(fastpath.training_input(batch["image"], cfg.cluster.channels_last))
                loss, parts = segmentation_loss(outputs, batch["label"], self.loss_weights,
                                                reduction=cfg.loss.reduction, class_weight=self.class_weight,
                                                align_corners=cfg.model.align_corners, ohem=self.ohem)
            self.scaler.scale(loss / accum).backward()
            self.progress.add_loss(loss.detach(), parts, accum)
            self.trace.batch(batch, loss, accum)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.trace.step(it + 1, lr)
        return lr  # no finite check here: it would wait for the GPU; Progress.synced() checks where it reports

    def after_step(self, done: int, lr: float) -> None:
        """Log; evaluate every eval_every and checkpoint every ckpt_every iterations, and both at the end."""
        final = done == self.cfg.schedule.iters
        due_eval, due_ckpt = final or done % self.eval_every == 0, final or done % self.ckpt_every == 0
        # Before step() resets the sums; a NaN loss fails here, before it is evaluated or checkpointed.
        losses = self.progress.synced(done) if due_eval or due_ckpt else {}
        metrics = {"iter": done, "lr": lr, **losses} if due_ckpt else {}
        self.progress.step(done, lr)
        if due_eval:
            scores = self.evaluate()
            metrics.update({"mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"]})
            self.progress.evaluated(done, scores)
        if due_ckpt:
            self.progress.upload()  # first: a killed attempt keeps the events up to its last checkpoint
            report(self.model, self.optimizer, self.scaler, done, metrics, self.meta, self.rank,
                   clock=self.clock.state(), world=self.world)

    def evaluate(self, ms_flip: bool = False) -> dict:
        self.memory.note()  # training's peak so far; the evaluation's own is not counted
        try:
            with fastpath.cudnn_benchmark(False):
                return run_evaluation(self.model, self.cfg, self.manifest, self.rank, self.world, self.device,
                                      self.dtype, ms_flip=ms_flip)
        finally:
            self.memory.restart()

    def finish(self, clock: RunClock) -> None:
        """The end of the run: ms+flip, speed and memory as mmseg's README columns, then the result row."""
        cfg, device = self.cfg, self.device
        now = time.time()
        train_time, total_time = clock.attempt_s(now), clock.total_s(now)
        self.memory.note()  # the end of training
        mem_gb = self.memory.gb_over_ranks()  # a collective: every rank, before rank 0's own work below
        scores = self.progress.last_scores or self.evaluate()
        ms_scores = self.evaluate(ms_flip=True) if cfg.evaluation.ms_flip else None
        if self.rank == 0:
            from ocr_cluster.train.results import write_completed

            skipped = self.skipped_samples(scores)
            if cfg.data.skip_bad_samples:
                say(f"[{self.layout.run_id}] skipped {skipped} bad sample(s) (data.skip_bad_samples)")
            with fastpath.cudnn_benchmark(False):
                fps = fps_on_val(self.model, cfg, self.manifest, device, self.dtype)
            write_completed(cfg, self.layout, list(self.manifest.classes), scores, ms_scores, fps=fps,
                            mem_gb=mem_gb, train_time_s=train_time, total_time_s=total_time,
                            started_at=dt.datetime.fromtimestamp(clock.started_at, dt.timezone.utc),
                            num_nodes=self.num_nodes, skipped_samples=skipped, launch=self.launch)

    def skipped_samples(self, scores: dict) -> int:
        """Bad samples skipped: the training stream's (each counted once, though read every epoch) and the
        last evaluation's. Without data.skip_bad_samples a bad sample fails the run, so none."""
        train = self.skip_counter.distinct() if self.skip_counter is not None else 0
        return train + scores["skipped"]


def report(model, optimizer, scaler, done: int, metrics: dict, meta: dict, rank: int,
           clock: dict | None = None, world: int = 1) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint, with every rank's RNG states, uploaded
    before this returns."""
    directory = None
    rng = _gather(checkpoint.rng_state(), world)
    if rank == 0:
        directory = Path(tempfile.mkdtemp(prefix="ocr_ckpt_"))
        checkpoint.save(directory, model, optimizer, done, meta, scaler, clock=clock, rng=rng)
    try:
        ckpt = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir(done))
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


FPS_DISTINCT_IMAGES = 8  # held at once; ~25 MB each at Cityscapes size, where all fps_images would be ~5 GB


def fps_on_val(model, cfg: config_mod.Config, manifest, device: torch.device, dtype) -> float | None:
    """mmseg's fps over cfg.evaluation.fps_images val images, timed round and round over the first few."""
    images, sizes = [], []
    for sample in iter_eval(cfg.data, rank=0, world_size=1, manifest=manifest):
        images.append(torch.as_tensor(sample["image"]))
        sizes.append((int(sample["height"]), int(sample["width"])))  # the original size: logits resized to it
        if len(images) >= min(FPS_DISTINCT_IMAGES, cfg.evaluation.fps_images):
            break
    order = [i % len(images) for i in range(cfg.evaluation.fps_images)] if images else []
    bare = getattr(model, "module", model)
    return measure_fps(bare, [images[i] for i in order], device, autocast_dtype=dtype,
                       out_sizes=[sizes[i] for i in order], align_corners=bare.final_head.align_corners)
