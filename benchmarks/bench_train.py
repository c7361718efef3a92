#!/usr/bin/env python3
"""Training and inference speed of ocr_cluster's models against mmsegmentation 1.2.2, side by side.

For each model it measures, on one device with the same shapes, batch, threads and weights:

  train   img/s of one training step: forward in train mode, the loss of every head (the aux /
          soft-region head included), backward, SGD step (lr 0.01, momentum 0.9, wd 5e-4, as the
          configs), zero_grad. Ours: `build_model` + `train.losses.segmentation_loss` + the trainer's
          `schedule.build_optimizer`, exactly the calls of `train/loop.py` (AMP scaler off). mmseg:
          `model.loss(inputs, data_samples)` + `parse_losses` + backward + SGD: what its
          `train_step` does after the data preprocessor (both sides start from a normalised float
          batch; neither side's data pipeline is timed).
  infer   s/img of whole-image inference at the eval size, batch 1: ours `model(x).argmax(1)` (eval
          mode: logits resized to the input), mmseg `encode_decode(x, metas).argmax(1)`; no grad.
  memory  CPU: the peak RSS (VmHWM, reset through /proc/self/clear_refs before each request) of the
          worker process while it ran that phase: imports and model included, `rss_base` is its RSS at
          the reset. CUDA: torch.cuda.max_memory_allocated over the request.

Each side of each model is one long-lived worker subprocess (imports and model built once): ours in
the project venv with PYTHONPATH = this checkout, mmseg in the throwaway env of
scripts/mmseg_parity.py (its docstring has the recipe; its `_mmseg_model` builds each model from its
mmseg config). The driver sends the two workers one phase request at a time, alternating (ours,
mmseg, ours, mmseg, ...) `--pairs` times per model and phase; a phase's first request runs the
untimed warm-up first. The table gives medians and min–max spreads, and the ratio ours ÷ mmseg per
pair (median and range). Wall-time and CPU-time (process, all threads) ratios are both printed: on a
shared machine CPU time is distorted less. Training batch 1 cannot run DeepLabV3+ (its image-pool BN
sees one value per channel): use --batch 2 for dlv3p.

malloc: CPU tensors come from glibc's malloc, whose settings move CPU times by 10-30 % (page faults;
ocr_cluster/train/host.py). By default each side runs as it ships: ours with the thresholds our training
ranks and `ocr-cluster eval` set, mmseg with glibc's defaults. `--malloc both-tuned` / `both-default`
give both sides the same settings, which compares the model code alone.

Weights: mmseg's own constructor init under torch.manual_seed(0), saved once per model to
--cache/<model>.pth and loaded into ours with `convert.load_checkpoint` (strict), so both sides
compute on the same values. Inputs: N(0, 1) images and uniform labels over the classes with 5 %
ignore (255), from a seeded generator (the same bytes on both sides).

    .venv/bin/python benchmarks/bench_train.py                              # CPU, every model
    .venv/bin/python benchmarks/bench_train.py --models hr18s hr48 --pairs 3 --json /tmp/bt.json
    .venv/bin/python benchmarks/bench_train.py --malloc both-tuned                # the model code alone
    .venv/bin/python benchmarks/bench_train.py --device cuda [--amp bf16] --crop 512 1024 --eval-size 1024 2048

Results: benchmarks/README.md, section "Training and inference vs mmseg 1.2.2".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS_PYTHON = os.environ.get("OURS_PYTHON", "/work/main/.venv/bin/python")
MMSEG_PYTHON = os.environ.get("MMSEG_PYTHON", "/tmp/mmseg_env/bin/python")
sys.path.insert(0, str(REPO / "scripts"))

# short name -> model name of scripts/mmseg_parity.py (its MODELS maps it to our backbone / head)
MODELS = {
    "hr18s": "ocrnet_hr18s_cityscapes",
    "hr18": "ocrnet_hr18_cityscapes",
    "hr48": "ocrnet_hr48_cityscapes",
    "r101": "ocrnet_r101-d8_cityscapes",
    "dlv3p": "deeplabv3plus_r101-d8_cityscapes",
}
HEAVY = {"hr48", "r101", "dlv3p"}  # a CPU train step takes seconds: fewer timed iterations by default
IGNORE = 255


# ----------------------------------------------------------------------------- worker (one side)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _inputs(batch: int, size, num_classes: int, device):
    import torch

    gen = torch.Generator().manual_seed(1234)
    x = torch.randn((batch, 3, *size), generator=gen)
    label = torch.randint(0, num_classes, (batch, *size), generator=gen)
    label[torch.rand((batch, *size), generator=gen) < 0.05] = IGNORE
    return x.to(device), label.to(device)


def _build(side: str, name: str, cache: Path):
    """The model of `side` with the shared init weights (written by the first mmseg build)."""
    import torch

    import mmseg_parity

    weights = cache / f"{name}.pth"
    if side == "mmseg":
        if not mmseg_parity.SPEC_JSON.exists():
            raise SystemExit(f"missing {mmseg_parity.SPEC_JSON}")
        torch.manual_seed(0)
        model, _, _ = mmseg_parity._mmseg_model(name)
        if weights.exists():
            model.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
        else:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": model.state_dict(), "meta": {"init": "mmseg constructor, seed 0"}}, weights)
        return model, model.decode_head[-1].num_classes if isinstance(model.decode_head, torch.nn.ModuleList) \
            else model.decode_head.num_classes
    from ocr_cluster.models import build_model
    from ocr_cluster.models.convert import load_checkpoint

    backbone, head, num_classes = mmseg_parity.MODELS[name]
    model = build_model(backbone, head, num_classes)
    load_checkpoint(model, str(weights), strict=True)
    return model, num_classes


def _train_step_fn(side: str, model, x, label, amp):
    """A closure running one training step of `side`, as its trainer does it."""
    import torch

    device_type = x.device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if amp == "bf16" else \
        (lambda: torch.autocast(device_type, enabled=False))
    if side == "ours":
        from ocr_cluster.config import OptimizerSection
        from ocr_cluster.train.losses import segmentation_loss
        from ocr_cluster.train.schedule import build_optimizer

        optimizer = build_optimizer(model, OptimizerSection())
        weights = dict(model.loss_weights)

        def step():
            with autocast():
                outputs = model(x)
                loss, _ = segmentation_loss(outputs, label, weights, reduction="mmseg",
                                            align_corners=model.align_corners)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    samples = []
    for i in range(x.shape[0]):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=label[i][None])
        sample.set_metainfo(dict(img_shape=tuple(x.shape[2:]), pad_shape=tuple(x.shape[2:]),
                                 ori_shape=tuple(x.shape[2:])))
        samples.append(sample)

    def step():
        with autocast():
            losses = model.loss(x, samples)
            loss, _ = model.parse_losses(losses)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _infer_fn(side: str, model, x, amp):
    import torch

    device_type = x.device.type
    metas = [dict(img_shape=tuple(x.shape[2:]), pad_shape=tuple(x.shape[2:]), ori_shape=tuple(x.shape[2:]))]

    @torch.no_grad()
    def infer():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(x) if side == "ours" else model.encode_decode(x, metas * x.shape[0])
        return logits.argmax(1)
    return infer


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak RSS, so each phase gets its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def worker(args) -> int:
    """One side, one model, kept alive: reads a phase name per stdin line ('train' / 'infer'), runs
    the untimed warm-up on a phase's first request, then the timed iterations, and answers one JSON
    line with per-iteration wall and CPU times and the peak memory of that request."""
    import torch

    if args.malloc == "both-tuned" or (args.malloc == "shipped" and args.side == "ours"):
        sys.path.insert(0, str(REPO))  # host.py needs only the standard library, also in mmseg's env
        from ocr_cluster.train import host

        host.keep_freed_memory()  # what our training ranks and `ocr-cluster eval` do
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = MODELS[args.model]
    model, num_classes = _build(args.side, name, Path(args.cache))
    model.to(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fns = {}
    print(json.dumps({"ready": args.side}), flush=True)
    for line in sys.stdin:
        phase = line.strip()
        if phase == "train":
            model.train()
            if phase not in fns:
                x, label = _inputs(args.batch, args.crop, num_classes, device)
                fns[phase] = (_train_step_fn(args.side, model, x, label, args.amp), args.batch, args.warmup, args.iters)
        elif phase == "infer":
            model.eval()
            if phase not in fns:
                x, _ = _inputs(1, args.eval_size, num_classes, device)
                fns[phase] = (_infer_fn(args.side, model, x, args.amp), 1, args.infer_warmup, args.infer_iters)
        else:
            break
        fn, images, warmup, iters = fns[phase]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _reset_peak_rss()
        rss_base = _rss_mib()
        for _ in range(warmup):  # not timed; only on the phase's first request
            fn()
        fns[phase] = (fn, images, 0, iters)
        sync()
        walls, cpus = [], []
        for _ in range(iters):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        out = dict(side=args.side, model=args.model, phase=phase, images=images, walls=walls, cpus=cpus,
                   threads=torch.get_num_threads(), torch=torch.__version__, rss_base_mib=rss_base)
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib()
        print(json.dumps(out), flush=True)
    return 0


# ----------------------------------------------------------------------------- driver (both sides)


class Side:
    """A live worker subprocess of one side for one model."""

    def __init__(self, side: str, model: str, args) -> None:
        python = OURS_PYTHON if side == "ours" else MMSEG_PYTHON
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        if side == "ours":
            env["PYTHONPATH"] = str(REPO)
        else:
            env.pop("PYTHONPATH", None)
        iters = args.iters or (1 if model in HEAVY else 2)
        infer_iters = args.infer_iters or 1
        cmd = [python, str(Path(__file__).resolve()), "--worker", "--side", side, "--models", model,
               "--device", args.device, "--threads", str(args.threads), "--batch", str(args.batch),
               "--crop", *map(str, args.crop), "--eval-size", *map(str, args.eval_size), "--cache", args.cache,
               "--amp", args.amp, "--warmup", str(args.warmup), "--infer-warmup", str(args.infer_warmup),
               "--iters", str(iters), "--infer-iters", str(infer_iters), "--malloc", args.malloc]
        self.name = f"{side} {model}"
        self.stderr = open(Path(args.cache) / f"{side}_{model}.stderr", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self._read()  # ready: imports done, model built and loaded

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = Path(self.stderr.name).read_text()[-3000:]
            raise SystemExit(f"{self.name} worker died (exit {self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def run(self, phase: str) -> dict:
        load0 = os.getloadavg()[0]
        self.proc.stdin.write(phase + "\n")
        self.proc.stdin.flush()
        result = self._read()
        result.update(load_before=load0, load_after=os.getloadavg()[0])
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


def bench_model(model: str, args, report) -> list[dict]:
    """Both sides of one model, alternating ours, mmseg, ours, mmseg ... per phase."""
    if not (Path(args.cache) / f"{MODELS[model]}.pth").exists():
        Side("mmseg", model, args).close()  # writes the shared init weights
    sides = [Side("ours", model, args), Side("mmseg", model, args)]
    runs = []
    try:
        for phase in args.phases:
            for _ in range(args.pairs):
                for side in sides:
                    run = side.run(phase)
                    runs.append(run)
                    report(run, runs)
    finally:
        for side in sides:
            side.close()
    return runs


def _rate(run: dict, key: str) -> float:
    """img/s (train) or s/img (infer) of one run: the median iteration."""
    per_iter = statistics.median(run[key])
    return run["images"] / per_iter if run["phase"] == "train" else per_iter / run["images"]


def _spread(values) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def summarise(runs: list[dict]) -> list[str]:
    """Markdown rows: per model and phase, each side's median (min–max) and the per-pair ratios."""
    lines = ["| model | phase | ours | mmseg | ours ÷ mmseg (wall) | ours ÷ mmseg (CPU time) | peak MiB ours / mmseg "
             "(ratio) |", "|---|---|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["model"], r["phase"]) for r in runs}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
    for model, phase in keys:
        ours = [r for r in runs if (r["model"], r["phase"], r["side"]) == (model, phase, "ours")]
        mm = [r for r in runs if (r["model"], r["phase"], r["side"]) == (model, phase, "mmseg")]
        ratios = {}
        for key in ("walls", "cpus"):
            a, b = [_rate(r, key) for r in ours], [_rate(r, key) for r in mm]
            # train: img/s ours / mmseg; infer: fps ours / fps mmseg = s/img mmseg / s/img ours (>1 = ours faster)
            pairs = [x / y if phase == "train" else y / x for x, y in zip(a, b)]
            ratios[key] = _spread(pairs) if pairs else "–"
        unit = "img/s" if phase == "train" else "s/img"
        mem_o = statistics.median(r["peak_mib"] for r in ours) if ours else float("nan")
        mem_m = statistics.median(r["peak_mib"] for r in mm) if mm else float("nan")
        lines.append(f"| {model} | {phase} | {_spread([_rate(r, 'walls') for r in ours])} {unit} | "
                     f"{_spread([_rate(r, 'walls') for r in mm])} {unit} | {ratios['walls']} | {ratios['cpus']} | "
                     f"{mem_o:.0f} / {mem_m:.0f} ({mem_o / mem_m:.2f}) |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--phases", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype (default fp32)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--batch", type=int, default=2, help="training batch (mmseg's per-GPU Cityscapes batch)")
    parser.add_argument("--crop", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--eval-size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--pairs", type=int, default=3, help="alternating (ours, mmseg) runs per model and phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps (first train request of a worker)")
    parser.add_argument("--iters", type=int, default=0, help="timed training steps per run (0: 2, heavy 1)")
    parser.add_argument("--infer-warmup", type=int, default=1, help="untimed inferences (first infer request)")
    parser.add_argument("--infer-iters", type=int, default=0, help="timed inferences per run (0: 1)")
    parser.add_argument("--cache", default="/tmp/bench_train", help="the shared init weights")
    parser.add_argument("--malloc", default="shipped", choices=["shipped", "both-tuned", "both-default"],
                        help="glibc malloc settings: as each side ships (ours: train/host.py's thresholds, mmseg: "
                             "glibc's defaults), ours' on both sides, or glibc's defaults on both")
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--parallel", type=int, default=1,
                        help="models benchmarked at once (each alternates its own two workers; CPU-time "
                             "ratios stay comparable on a loaded machine, wall times do not)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "mmseg"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.model = args.models[0]
        return worker(args)

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    print(f"# bench_train: device {args.device}, amp {args.amp}, threads {args.threads}, malloc {args.malloc}, "
          f"train batch {args.batch} "
          f"crop {args.crop[0]}x{args.crop[1]}, eval {args.eval_size[0]}x{args.eval_size[1]}, {args.pairs} pairs; "
          f"load {os.getloadavg()}", flush=True)
    lock = threading.Lock()
    runs: list[dict] = []

    def report(run, _):
        with lock:
            runs.append(run)
            print(f"{run['model']:6s} {run['phase']:5s} {run['side']:5s} {_rate(run, 'walls'):8.3g} "
                  f"{'img/s' if run['phase'] == 'train' else 's/img'} (cpu-time {_rate(run, 'cpus'):.3g}), "
                  f"peak {run['peak_mib']:.0f} MiB, load {run['load_before']:.1f}->{run['load_after']:.1f}",
                  flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(dict(args=vars(args), runs=runs), indent=1))

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in [pool.submit(bench_model, model, args, report) for model in args.models]:
            future.result()
    print(f"# load after: {os.getloadavg()}")
    print("\n".join(summarise(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
