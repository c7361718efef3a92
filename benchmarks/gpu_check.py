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

import torch

from ocr_cluster.models import build_model, convert_sync_batchnorm
from ocr_cluster.train.inference import measure_fps
from ocr_cluster.train.loop import TrainingPeak, amp_dtype, ddp_options
from ocr_cluster.train.losses import segmentation_loss

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
    failed = 0
    checks = [("a amp auto", lambda: check_amp(device, dtype)),
              ("b training steps", lambda: check_training(device, dtype, steps)),
              ("c syncbn", lambda: check_syncbn(device, dtype, steps)),
              ("d training peak", lambda: check_memory(device, dtype, steps))]
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
    print(f"{'all checks passed' if not failed else f'{failed} check(s) failed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main())
