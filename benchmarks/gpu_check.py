#!/usr/bin/env python3
"""The GPU paths of the training loop, checked in one go on one CUDA device (under 5 minutes; --quick less).

    .venv/bin/python benchmarks/gpu_check.py [--quick]

  a  cluster.amp auto picks bf16 where the device has it natively (compute capability >= 8.0), else fp16
  b  a few training steps of hrnetv2_w18_small + OCR at 512x1024 (the Cityscapes crop), amp auto dtype,
     channels_last: the losses are finite
  c  SyncBN (DDP, broadcast_buffers off, as loop.py) in one process on a world-size-1 NCCL group under the
     amp dtype (torch takes the plain BN path at world size 1: the sync kernels need >= 2 GPUs)
  d  the training peak memory (loop.TrainingPeak) leaves out an evaluation at 1024x2048
  e  img/s, labelled: training (crop 512x1024, batch 2) and inference (1024x2048, batch 1, with mmseg's
     post-processing: loop.measure_fps) for hrnetv2_w18_small / hrnetv2_w48 + OCR, fp32 and the amp dtype
  f  the fast path, all of it (cluster.amp auto, channels_last, compile, optimizer_impl fused, cuDNN benchmark):
     hrnetv2_w48 + OCR at 512x1024, batch 2, through the Trainer's own _prepare and train_step: losses finite,
     no host sync inside a step (CUDA's sync debug mode set to error), training img/s against fp32 eager
     (the default options) in alternating rounds, and the compile time (estimated 1-3 minutes)
  g  SyncBN's real sync path under compile: two gloo ranks on this one GPU, a small conv-BN net with
     SyncBatchNorm, channels_last and fused SGD, eager and compiled: the same losses (fp32, 1e-4), and how
     often dynamo breaks the graph at a SyncBatchNorm (pytorch#161302)
  h  (run after d) the training input's host-to-device path (data/batches.TrainCollate + Ray Data's finalize
     step): pinned host tensors, uint8 labels across, int64 on the device, values unchanged; uint8 crops
     normalised on the GPU (cluster.normalize_on device) without a host sync, equal to the CPU's values

Each check prints PASS or FAIL with its numbers; the exit status is 1 when any failed. Without a CUDA device
it prints "no CUDA device: nothing to check" and exits 0. Results: benchmarks/README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

from ocr_cluster import config
from ocr_cluster.models import build_model, convert_sync_batchnorm
from ocr_cluster.train.inference import measure_fps
from ocr_cluster.train.fastpath import amp_dtype, ddp_options
from ocr_cluster.train.loop import Trainer, TrainingPeak
from ocr_cluster.train.losses import segmentation_loss
from ocr_cluster.train.progress import Progress
from ocr_cluster.train.trace import StepTrace

NUM_CLASSES = 19
CROP, FULL = (512, 1024), (1024, 2048)
GiB = 1024**3


def _model(backbone: str, device: torch.device, syncbn: bool = False) -> torch.nn.Module:
    model = build_model(backbone, "ocr", NUM_CLASSES, align_corners=False)
    if syncbn:
        model = convert_sync_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last).train()


def _train_steps(model, device, dtype, steps: int, batch: int = 2, size=CROP) -> list[float]:
    """`steps` SGD steps on random images; the loss of each (read back after each step: this is a check)."""
    bare = getattr(model, "module", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    losses = []
    for _ in range(steps):
        image = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
        label = torch.randint(0, NUM_CLASSES, (batch, *size), device=device)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss, _ = segmentation_loss(model(image), label, bare.loss_weights)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def check_input_copy(device) -> str:
    """The training input as Ray Data hands it over on a GPU worker (batches.TrainCollate, then Ray's
    finalize step, as iter_torch_batches runs both on its fetch thread): host tensors in page-locked memory,
    labels crossing as uint8, on the device as int64 after torch_batches' widening, values unchanged."""
    from ray.data._internal.utils.torch_utils import DefaultFinalizeFn

    from ocr_cluster.data.batches import TrainCollate
    from ocr_cluster.data.constants import MEAN_RGB, STD_RGB
    from ocr_cluster.data.transforms import normalize_batch

    images = torch.randn(2, 3, *CROP).numpy()
    labels = torch.randint(0, 256, (2, *CROP), dtype=torch.uint8).numpy()
    images.flags.writeable = labels.flags.writeable = False
    host = TrainCollate("cuda")({"image": images, "label": labels, "key": ["a", "b"]})
    assert host["image"].is_pinned() and host["label"].is_pinned(), "host tensors not page-locked"
    assert host["label"].dtype == torch.uint8, f"labels cross as {host['label'].dtype}"
    moved = DefaultFinalizeFn(device)(host).data
    label = moved["label"].long()
    assert moved["image"].device == device and label.device == device
    assert torch.equal(moved["image"].cpu(), torch.from_numpy(images.copy()))
    assert torch.equal(label.cpu(), torch.from_numpy(labels.astype("int64")))
    # cluster.normalize_on device: uint8 crops (the second one padded) normalised on the GPU without a host
    # sync once the constants are there, to the same float32 values as on the CPU
    crops = torch.randint(0, 256, (2, *CROP, 3), dtype=torch.uint8).numpy()
    valid = np.array([CROP, (CROP[0] - 100, CROP[1] - 300)], np.int32)
    moved = DefaultFinalizeFn(device)(TrainCollate("cuda")({"image": crops, "label": labels, "valid_hw": valid,
                                                            "key": ["a", "b"]})).data
    normalize_batch(moved["image"], moved["valid_hw"], MEAN_RGB, STD_RGB)  # first call: the constants copied
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = normalize_batch(moved["image"], moved["valid_hw"], MEAN_RGB, STD_RGB).contiguous()
        moved["label"].long()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    on_cpu = normalize_batch(torch.from_numpy(crops), valid, MEAN_RGB, STD_RGB)
    assert torch.equal(on_gpu.cpu(), on_cpu), "uint8 crops normalised on the GPU differ from the CPU's values"
    return ("pinned host tensors, uint8 labels across, int64 on the device, values equal; uint8 crops "
            "normalised on the GPU without a host sync, equal to the CPU's")


def check_amp(device, dtype) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    expected = torch.bfloat16 if major >= 8 else torch.float16
    assert dtype == expected, f"amp auto gave {dtype} on compute capability {major}.{minor}, expected {expected}"
    return f"compute capability {major}.{minor}: amp auto = {dtype}"


def check_training(device, dtype, steps: int) -> str:
    losses = _train_steps(_model("hrnetv2_w18_small", device), device, dtype, steps)
    assert all(torch.isfinite(torch.tensor(losses))), f"losses not finite: {losses}"
    return f"{steps} steps, {dtype}, channels_last, losses {', '.join(f'{v:.3f}' for v in losses)}"


def check_syncbn(device, dtype, steps: int) -> str:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        return "SKIP: this torch has no NCCL"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device)
    try:
        model = _model("hrnetv2_w18_small", device, syncbn=True)
        options = ddp_options(model)
        assert options == {"broadcast_buffers": False}, f"ddp_options gave {options} for a SyncBN model"
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device], **options)
        losses = _train_steps(ddp, device, dtype, steps)
        assert all(torch.isfinite(torch.tensor(losses))), f"losses not finite: {losses}"
    finally:
        dist.destroy_process_group()
    return f"DDP + SyncBN, world size 1, {dtype}: losses {', '.join(f'{v:.3f}' for v in losses)}"


def check_memory(device, dtype, steps: int) -> str:
    model = _model("hrnetv2_w18_small", device)
    memory = TrainingPeak(device)
    torch.cuda.empty_cache()
    memory.restart()
    _train_steps(model, device, dtype, steps)
    training = torch.cuda.max_memory_allocated(device)
    memory.note()  # before the evaluation, as Trainer.evaluate
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        for _ in range(2):
            model(torch.randn(4, 3, *FULL, device=device).contiguous(memory_format=torch.channels_last))
    evaluation = torch.cuda.max_memory_allocated(device)
    memory.restart()
    model.train()
    reported = memory.gb_over_ranks()
    assert abs(reported - training / GiB) < 1e-9, \
        f"reported {reported:.3f} GiB where training peaked at {training / GiB:.3f} GiB"
    return (f"training peak {training / GiB:.2f} GiB reported as {reported:.2f} GiB; the evaluation's own "
            f"peak ({evaluation / GiB:.2f} GiB) left out")


def throughput(device, dtype, quick: bool) -> list[str]:
    warmup, timed = (2, 5) if quick else (3, 15)
    lines = []
    for backbone in ("hrnetv2_w18_small", "hrnetv2_w48"):
        for name, run_dtype in (("fp32", None), (str(dtype).removeprefix("torch."), dtype)):
            torch.backends.cudnn.benchmark = True  # training, as loop.py
            model = _model(backbone, device)
            _train_steps(model, device, run_dtype, warmup)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            _train_steps(model, device, run_dtype, timed)  # its float(loss) syncs each step
            train_ips = timed * 2 / (time.perf_counter() - start)
            torch.backends.cudnn.benchmark = False  # the fps run, as loop.py and mmseg
            images = [torch.randn(3, *FULL)] * (warmup + timed)
            fps = measure_fps(model, images, device, warmup=warmup, autocast_dtype=run_dtype)
            lines.append(f"{backbone:18s} + ocr  {name:8s} training {train_ips:6.1f} img/s "
                         f"(crop 512x1024, batch 2) | inference {fps:6.2f} img/s "
                         "(1024x2048, batch 1, resize + argmax included)")
            del model
            torch.cuda.empty_cache()
    return lines


FAST = ["cluster.amp=auto", "cluster.channels_last=true", "cluster.compile=true", "cluster.optimizer_impl=fused"]
EAGER_FP32 = ["cluster.amp=none"]


def _trainer(options: list[str], device, batch: dict):
    """The Trainer's own `_prepare` and `train_step` on hrnetv2_w48 + OCR without Ray (as
    tests/test_fastpath.py): `options` on top of a one-GPU config, the same device batch at every step, the
    losses summed on the device by Progress (rank 1: no TensorBoard) and read back only by the caller."""
    cfg = config.load(overrides=["model.backbone=hrnetv2_w48", "data.batch_size=2", "cluster.num_workers=1",
                                 "cluster.use_gpu=true", "schedule.iters=100000", "schedule.log_interval=100000",
                                 *options])
    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.device, trainer.rank, trainer.world = cfg, device, 0, 1
    trainer.start_iter = 0  # train_step marks the first batch of an attempt
    trainer.dtype = amp_dtype(cfg.cluster.amp, device)
    trainer.layout = SimpleNamespace(accum_steps=1, run_id="gpu-check")
    torch.manual_seed(0)
    trainer._prepare(build_model("hrnetv2_w48", "ocr", NUM_CLASSES, align_corners=False),
                     wrap=lambda model: model.to(device))
    trainer.class_weight = trainer.ohem = None
    trainer.batches = iter(lambda: batch, None)
    trainer.trace = StepTrace(0)
    trainer.progress = Progress(SimpleNamespace(schedule=cfg.schedule), trainer.layout, 0, rank=1,
                                images_per_iter=2)
    trainer.model.train()
    return trainer


def _timed(trainer, steps: int, start: int) -> float:
    """img/s of `steps` train_steps: one sync at the end, none inside (as a run between log lines)."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    for it in range(start, start + steps):
        trainer.train_step(it)
    torch.cuda.synchronize()
    return steps * 2 / (time.perf_counter() - began)


def check_fast_path(device, quick: bool) -> str:
    image = torch.randn(2, 3, *CROP, device=device)
    batch = {"image": image, "label": torch.randint(0, NUM_CLASSES, (2, *CROP), device=device), "key": ["x", "y"]}
    torch.backends.cudnn.benchmark = True  # training, as Trainer.start
    rounds, steps = (1, 5) if quick else (2, 8)
    eager, fast = _trainer(EAGER_FP32, device, batch), _trainer(FAST, device, batch)
    began = time.perf_counter()
    fast.train_step(0)  # compiles
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - began
    fast.train_step(1)
    eager.train_step(0)
    eager.train_step(1)
    it, speeds = 2, {"eager": [], "fast": []}
    for _ in range(rounds):  # alternating, so a clock or thermal drift hits both sides
        speeds["eager"].append(_timed(eager, steps, it))
        speeds["fast"].append(_timed(fast, steps, it))
        it += steps
    torch.cuda.set_sync_debug_mode("error")  # a host sync inside a step raises here
    try:
        fast.train_step(it)
        fast.train_step(it + 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, trainer in (("eager", eager), ("fast", fast)):
        mean = trainer.progress.losses()["loss"]
        assert torch.isfinite(torch.tensor(mean)), f"{name}: the mean loss is {mean}"
    assert fast.model is fast.forward._orig_mod and "_orig_mod" not in "".join(fast.model.state_dict())
    eager_ips, fast_ips = max(speeds["eager"]), max(speeds["fast"])
    losses = ", ".join(f"{name} {trainer.progress.losses()['loss']:.3f}" for name, trainer in
                       (("eager", eager), ("fast", fast)))
    return (f"hrnetv2_w48 + ocr, crop 512x1024, batch 2: fp32 eager {eager_ips:.1f} img/s, fast path "
            f"({fast.dtype}, channels_last, compile, fused SGD, cudnn benchmark) {fast_ips:.1f} img/s = "
            f"{fast_ips / eager_ips:.2f}x (best of {rounds} x {steps} steps each; all "
            f"{', '.join(f'{v:.1f}' for v in speeds['fast'])} vs {', '.join(f'{v:.1f}' for v in speeds['eager'])}); "
            f"compile + first step {compile_s:.0f} s; mean losses {losses}; no host sync in 2 steps")


class _SyncBNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for width in (16, 32, 32):
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width),
                       torch.nn.ReLU()]
            channels = width
        self.body = torch.nn.Sequential(*layers, torch.nn.Conv2d(channels, NUM_CLASSES, 1))

    def forward(self, x):
        return self.body(x)


def _syncbn_rank(rank: int, port: int, out) -> None:
    """One of two gloo ranks on cuda:0: 3 fused-SGD steps of a SyncBN net, eager then compiled, fp32."""
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.cuda.set_device(0)
    torch.backends.cudnn.allow_tf32 = False  # plain fp32: eager and compiled comparable at 1e-4
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(rank)
        images = torch.randn(2, 3, 64, 64, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, NUM_CLASSES, (2, 64, 64), generator=gen).cuda()
        result = {}
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            model = convert_sync_batchnorm(_SyncBNNet()).cuda().to(memory_format=torch.channels_last)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], **ddp_options(model))
            forward = torch.compile(ddp) if name == "compiled" else ddp
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
            torch._dynamo.utils.counters.clear()
            losses = []
            for _ in range(3):
                loss = F.cross_entropy(forward(images), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            result[name] = [float(v) for v in losses]
            result[f"{name}_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
            result[f"{name}_mean"] = model.body[1].running_mean.cpu().tolist()
        out[rank] = result
    finally:
        dist.destroy_process_group()


def check_syncbn_compiled() -> str:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_syncbn_rank, args=(port, out), nprocs=2, join=True)
    first, second = out[0], out[1]
    for rank, got in ((0, first), (1, second)):
        for e, c in zip(got["eager"], got["compiled"]):
            assert abs(e - c) <= 1e-4 * abs(e), f"rank {rank}: eager losses {got['eager']}, compiled {got['compiled']}"
    # SyncBN's running statistics come from both ranks' batches: equal on both ranks, eager or compiled.
    for name in ("eager", "compiled"):
        diff = max(abs(a - b) for a, b in zip(first[f"{name}_mean"], second[f"{name}_mean"]))
        assert diff < 1e-5, f"{name}: the ranks' SyncBN running means differ by {diff}"
    return (f"2 gloo ranks on one GPU, SyncBN + DDP + channels_last + fused SGD: compiled losses = eager within "
            f"1e-4 (rank 0: {', '.join(f'{v:.4f}' for v in first['compiled'])}), running means equal over the "
            f"ranks; graph breaks while compiling: {first['compiled_breaks']} (3 SyncBatchNorm layers)")


def _run_checks(checks) -> int:
    """Runs each (name, check), printing PASS/SKIP/FAIL with its line and seconds; returns the failures."""
    failed = 0
    for name, check in checks:
        start = time.perf_counter()
        try:
            result = check()
            status = "SKIP" if result.startswith("SKIP") else "PASS"
            seconds = time.perf_counter() - start
            print(f"{status} {name}: {result.removeprefix('SKIP: ')} ({seconds:.0f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - one check's failure: say it, run the others
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and timed images")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dtype = amp_dtype("auto", device)
    steps = 3 if args.quick else 5
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}", flush=True)
    failed = _run_checks([("a amp auto", lambda: check_amp(device, dtype)),
                          ("b training steps", lambda: check_training(device, dtype, steps)),
                          ("c syncbn", lambda: check_syncbn(device, dtype, steps)),
                          ("d training peak", lambda: check_memory(device, dtype, steps)),
                          ("h input copy", lambda: check_input_copy(device))])
    start = time.perf_counter()
    try:
        print("e throughput (one GPU; mmseg's fps column is inference fp32 at 1024x2048):", flush=True)
        for line in throughput(device, dtype, args.quick):
            print("  " + line, flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)")
    except Exception as exc:  # noqa: BLE001
        failed += 1
        print(f"FAIL e throughput: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=3)
    # Last: compiling takes the longest; the numbers above are out by then.
    failed += _run_checks([("f fast path", lambda: check_fast_path(device, args.quick)),
                           ("g syncbn compiled", check_syncbn_compiled)])
    print(f"{'all checks passed' if not failed else f'{failed} check(s) failed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
