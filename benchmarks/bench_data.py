#!/usr/bin/env python3
"""Input-pipeline throughput: decode + augment from Parquet shards vs the pure decode rate (the ceiling).

For each preset it writes a synthetic dataset with the preset's image size and encoding, then measures,
on this machine, in samples/s:

  decode      the ceiling: decode image + label from bytes already in memory with the decoder the
              pipeline uses (cv2.imdecode), nothing else
  local       iter_train from shards on local disk: read + checksum + decode + mmseg-parity augment
              (random resize, cat_max_ratio crop, flip, photometric, normalise, pad)
  s3          the same from the S3 endpoint (a moto server on 127.0.0.1 started here, or --s3-uri)
  ray-local   Ray Data train_dataset from local shards, consumed with iter_batches (with --ray)
  ray-s3      the same from S3 (with --ray)

The single-process rows are compared with one decoding process; the Ray rows (--ray-cpus decode tasks
at a time, plus the read tasks on one more logical CPU) with --ray-cpus decoding processes. Each
measurement is repeated --trials times, interleaved, and the best run is kept (the machine may be
shared). Single-process rows are also given by CPU time (`cpu_*`), which a busy machine distorts
less than wall time. Results: benchmarks/README.md, section "Data".

Per core: the single-process rows by CPU time are images per second per CPU core (median and range
over the trials), printed as a table: decode only, transform (decode + mmseg augmentation from bytes
in memory) and local (the whole in-process pipeline: shard read, CRC-32, decode, augmentation).

Cores per GPU: a GPU training at R images/s needs R / (local img/s per core) cores of decoding so
that data never waits. R per model comes from --gpu-rates: benchmarks/gpu_rates.json by default (an
ASSUMED table, each rate with its basis; replace it by measured rates), or the output of
benchmarks/gpu_check.py saved to a file (its "training ... img/s (crop 512x1024 ...)" lines, the
measured rates). Rates are for 512x1024 crops; a preset with another crop scales them by pixels
(R x 512*1024 / crop pixels: the step's cost taken as proportional to pixels, an assumption).
--from-json recomputes the tables from an earlier --json without measuring again.

Before/after: --compare-transforms OTHER_CHECKOUT loads OTHER_CHECKOUT/ocr_cluster/data/transforms.py
next to this checkout's and runs both train_transform chains on the same encoded samples (in memory,
no shards) in one process, alternating for --trials rounds: CPU img/s of each and their ratio, median
and range (a busy machine slows both sides alike).

    .venv/bin/python benchmarks/bench_data.py                       # all presets, local + S3
    .venv/bin/python benchmarks/bench_data.py --preset cityscapes --ray --json out.json
    .venv/bin/python benchmarks/bench_data.py --no-s3 --trials 5 --json data.json
    .venv/bin/python benchmarks/gpu_check.py > gpu.txt              # on a GPU machine
    .venv/bin/python benchmarks/bench_data.py --from-json data.json --gpu-rates gpu.txt
    .venv/bin/python benchmarks/bench_data.py --compare-transforms ../main --trials 9
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from ocr_cluster import storage  # noqa: E402
from ocr_cluster.config import DataSection  # noqa: E402
from ocr_cluster.data import pipeline  # noqa: E402
from ocr_cluster.data.shards import read_manifest, read_shard  # noqa: E402
from ocr_cluster.data.synth import SynthSpec, write_synthetic  # noqa: E402

# name: (image HxW, format, mmseg img_scale WxH, crop HxW, samples)
PRESETS = {
    "cityscapes": ((1024, 2048), "png", "2048x1024", "512x1024", 24),
    "ade20k": ((512, 683), "jpeg", "2048x512", "512x512", 96),
    "synthetic": ((256, 256), "png", "256x256", "128x128", 256),
}


COLOR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
cv2.setNumThreads(1)  # one core per process, as in the Ray tasks: a fair comparison with one decoder


def decode_all(pairs: list[tuple[bytes, bytes]]) -> int:
    for image, label in pairs:
        cv2.imdecode(np.frombuffer(image, np.uint8), COLOR)
        cv2.imdecode(np.frombuffer(label, np.uint8), cv2.IMREAD_UNCHANGED)
    return len(pairs)


def _decode_chunk(path: str, start: int, stop: int) -> float:
    pairs = load_pairs(path)[start:stop]
    t = time.process_time()
    decode_all(pairs)
    return time.process_time() - t


def load_pairs(uri: str) -> list[tuple[bytes, bytes]]:
    manifest = read_manifest(uri)
    pairs = []
    for shard in manifest.split("train").shards:
        table = read_shard(manifest, shard, columns=["image", "label"])
        pairs += list(zip(table.column("image").to_pylist(), table.column("label").to_pylist()))
    return pairs


def _timed(fn) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - wall, time.process_time() - cpu


def rate_decode(pairs) -> tuple[float, float]:
    """(samples/s by wall time, samples/s by this process's CPU time)."""
    n, wall, cpu = _timed(lambda: decode_all(pairs))
    return n / wall, n / cpu


def rate_transform(pairs, params, uint8: bool = False) -> tuple[float, float]:
    """decode + augment from bytes in memory, no shard I/O: (wall, CPU) samples/s. train_transform (float32
    normalised output), or with `uint8` train_crop_uint8 (the option that leaves normalising to the GPU)."""
    from ocr_cluster.data import transforms

    fn = transforms.train_crop_uint8 if uint8 else transforms.train_transform

    def run() -> int:
        for i, (image, label) in enumerate(pairs):
            fn(image, label, params, transforms.sample_rng(0, 0, str(i)))
        return len(pairs)
    n, wall, cpu = _timed(run)
    return n / wall, n / cpu


def rate_decode_parallel(uri: str, n: int, procs: int) -> tuple[float, float]:
    """Decode with `procs` processes, each on its share; wall time of the slowest."""
    bounds = np.linspace(0, n, procs + 1).astype(int)
    with cf.ProcessPoolExecutor(procs) as pool:
        list(pool.map(_decode_chunk, [uri] * procs, [0] * procs, [1] * procs))  # warm the workers
        t = time.perf_counter()
        cpu = sum(pool.map(_decode_chunk, [uri] * procs, bounds[:-1], bounds[1:]))
        return n / (time.perf_counter() - t), n / cpu * procs


def rate_iter(data: DataSection, n: int) -> tuple[float, float]:
    def run() -> int:
        return sum(1 for _ in pipeline.iter_train(data, seed=0, num_epochs=1))
    count, wall, cpu = _timed(run)
    assert count == n, (count, n)
    return n / wall, n / cpu


def rate_ray(data: DataSection, n: int, epochs: int) -> tuple[float, float]:
    ds = pipeline.train_dataset(data, seed=0, num_epochs=epochs)
    t = time.perf_counter()
    count = sum(len(b["key"]) for b in ds.iter_batches(batch_size=8, batch_format="numpy", prefetch_batches=2))
    assert count == n * epochs, (count, n)
    rate = count / (time.perf_counter() - t)
    return rate, rate


def profile_stages(pairs, data: DataSection, uri: str) -> dict[str, float]:
    """CPU milliseconds per sample: decode only, and the train transform (decode included)."""
    from ocr_cluster.data.transforms import sample_rng, train_transform

    manifest = read_manifest(uri)
    params = pipeline.train_params(data, manifest)
    t = time.process_time()
    decode_all(pairs)
    decode_ms = (time.process_time() - t) / len(pairs) * 1e3
    t = time.process_time()
    for i, (image, label) in enumerate(pairs):
        train_transform(image, label, params, sample_rng(0, 0, str(i)))
    return {"decode_cpu_ms": round(decode_ms, 2),
            "decode_augment_cpu_ms": round((time.process_time() - t) / len(pairs) * 1e3, 2)}


DEFAULT_GPU_RATES = Path(__file__).with_name("gpu_rates.json")
GPU_CHECK_LINE = re.compile(r"^\s*(\S+)\s+\+ ocr\s+(\S+)\s+training\s+([\d.]+) img/s \(crop (\d+)x(\d+)")


def load_gpu_rates(path: str | Path) -> dict:
    """{"source", "device", "models": {name: {"img_per_s", "crop_hw", "basis"}}} from gpu_rates.json's format
    or from benchmarks/gpu_check.py's printed output (its training lines: measured)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("{"):
        table = json.loads(text)
        for row in table["models"].values():
            row.setdefault("crop_hw", table.get("crop_hw", [512, 1024]))
        return table
    device = next((line.split(":", 1)[1].split(",")[0].strip() for line in text.splitlines()
                   if line.startswith("device:")), "GPU")
    models = {f"{m[1]}+ocr {m[2]}": {"img_per_s": float(m[3]), "crop_hw": [int(m[4]), int(m[5])],
                                     "basis": "measured by benchmarks/gpu_check.py"}
              for m in map(GPU_CHECK_LINE.match, text.splitlines()) if m}
    if not models:
        raise SystemExit(f"{path}: no gpu_check.py training lines and not JSON")
    return {"source": f"measured: {path}", "device": device, "models": models}


def cores_per_gpu(per_core: dict[str, float], crops: dict[str, list[int]], gpu: dict) -> dict[str, dict[str, float]]:
    """{model: {preset: cores}}: the GPU's img/s at the preset's crop over one core's img/s."""
    out = {}
    for model, row in gpu["models"].items():
        pixels = row["crop_hw"][0] * row["crop_hw"][1]
        out[model] = {preset: row["img_per_s"] * pixels / (crops[preset][0] * crops[preset][1]) / rate
                      for preset, rate in per_core.items()}
    return out


def print_tables(results: dict, gpu: dict) -> None:
    presets = results["presets"]
    print("\nImages per second per CPU core (CPU time, one process; median [min-max] of "
          f"{results.get('trials', '?')} trials):\n")
    print("| preset | image | crop | decode | transform (decode + augment) | same, uint8 out (GPU normalises) "
          "| local (read + decode + augment) | local / decode |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, row in presets.items():
        per = row["per_core"]
        cells = [f"{per[k]['median']:.1f} [{per[k]['min']:.0f}-{per[k]['max']:.0f}]" if k in per else "-"
                 for k in ("decode", "transform", "transform_uint8", "local")]
        print(f"| {name} | {row['image']} | {row['crop']} | {' | '.join(cells)} | "
              f"{per['local']['median'] / per['decode']['median']:.2f} |")
    per_core = {name: row["per_core"]["local"]["median"] for name, row in presets.items()}
    crops = {name: [int(v) for v in row["crop"].split("x")] for name, row in presets.items()}
    table = cores_per_gpu(per_core, crops, gpu)
    print(f"\nCPU cores per GPU so that data never waits ({gpu['device']}; GPU rates: {gpu['source']}):\n")
    print("| model | GPU img/s (crop) | " + " | ".join(f"{n} cores" for n in presets) + " |")
    print("|---|---:|" + "---:|" * len(presets))
    for model, cores in table.items():
        row = gpu["models"][model]
        print(f"| {model} | {row['img_per_s']:g} ({row['crop_hw'][0]}x{row['crop_hw'][1]}) | "
              + " | ".join(f"{c:.1f}" for c in cores.values()) + " |")
    print("\ncores = GPU img/s x (GPU crop pixels / preset crop pixels) / (local img/s per core); one core "
          "decodes one sample at a time (cv2.setNumThreads(1), as the Ray decode tasks)\n", flush=True)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


def compare_transforms(other: str, presets: list[str], rounds: int) -> dict:
    """This checkout's train_transform against OTHER's, alternating on the same samples: CPU img/s and ratio."""
    import importlib.util

    from ocr_cluster.data import codec, transforms
    from ocr_cluster.data.synth import SynthSpec, render

    spec = importlib.util.spec_from_file_location("baseline_transforms",
                                                  Path(other) / "ocr_cluster/data/transforms.py")
    baseline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = baseline  # its dataclasses look their module up
    spec.loader.exec_module(baseline)
    out = {}
    for name in presets:
        size_hw, fmt, scale, crop, count = PRESETS[name]
        synth = SynthSpec(classes=8, num_train=count, num_val=1, size_hw=size_hw, image_format=fmt)
        pairs = []
        for i in range(min(count, 48)):
            image, label = render(synth, "train", i)
            pairs.append((codec.encode_image(image, fmt), codec.encode_label(label)))
        kwargs = dict(crop_hw=tuple(int(v) for v in crop.split("x")),
                      scale_wh=tuple(int(v) for v in scale.split("x")), num_classes=8)
        sides = {"before": (baseline, baseline.TrainParams(**kwargs)),
                 "after": (transforms, transforms.TrainParams(**kwargs))}
        rates: dict[str, list[float]] = {"before": [], "after": [], "decode": []}
        for _ in range(rounds):
            rates["decode"].append(rate_decode(pairs)[1])
            for side, (module, params) in sides.items():
                start = time.process_time()
                for i, (image, label) in enumerate(pairs):
                    module.train_transform(image, label, params, module.sample_rng(0, 0, str(i)))
                rates[side].append(len(pairs) / (time.process_time() - start))
        ratios = [a / b for a, b in zip(rates["after"], rates["before"])]
        out[name] = {**{k: _spread(v) for k, v in rates.items()},
                     "after_over_before": {"median": round(statistics.median(ratios), 3),
                                           "min": round(min(ratios), 3), "max": round(max(ratios), 3)}}
        print(json.dumps({name: out[name]}), flush=True)
    print(f"\ntrain_transform, CPU img/s per core, {rounds} alternating rounds (median [min-max]); before = {other}\n")
    print("| preset | decode only | before | after | after / before |")
    print("|---|---:|---:|---:|---:|")
    for name, row in out.items():
        cells = [f"{row[k]['median']:.1f} [{row[k]['min']:.0f}-{row[k]['max']:.0f}]"
                 for k in ("decode", "before", "after")]
        r = row["after_over_before"]
        print(f"| {name} | {' | '.join(cells)} | {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}] |", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: all")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 rows")
    parser.add_argument("--s3-uri", default=None, help="an s3:// prefix on your endpoint (default: a local moto)")
    parser.add_argument("--ray", action="store_true", help="also measure the Ray Data pipeline")
    parser.add_argument("--ray-cpus", type=int, default=2,
                        help="decode tasks in parallel; Ray gets one more logical CPU for the read tasks (0.25 each)")
    parser.add_argument("--ray-epochs", type=int, default=6, help="epochs per Ray measurement (amortises start-up)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--gpu-rates", default=str(DEFAULT_GPU_RATES),
                        help="GPU img/s per model: a gpu_rates.json-style file (default: the ASSUMED table) or "
                             "benchmarks/gpu_check.py's saved output (measured)")
    parser.add_argument("--from-json", default=None, help="print the tables from an earlier --json, measure nothing")
    parser.add_argument("--compare-transforms", default=None, metavar="OTHER_CHECKOUT",
                        help="only compare train_transform with OTHER_CHECKOUT's (before/after), alternating")
    args = parser.parse_args()
    if args.compare_transforms:
        result = compare_transforms(args.compare_transforms, args.preset or list(PRESETS), args.trials)
        if args.json:
            Path(args.json).write_text(json.dumps({"compare_transforms": result, "load_avg": os.getloadavg(),
                                                   "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                                   "before": args.compare_transforms}, indent=1) + "\n")
        return 0
    gpu = load_gpu_rates(args.gpu_rates)
    if args.from_json:
        print_tables(json.loads(Path(args.from_json).read_text()), gpu)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    s3_service = None
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "opencv": cv2.__version__, "cpus": os.cpu_count(),
                           "load_avg_at_start": os.getloadavg()},
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "trials": args.trials, "presets": {}}
    try:
        s3_root = None
        if not args.no_s3:
            if args.s3_uri:
                s3_root = args.s3_uri.rstrip("/")
            else:
                import services

                s3_service = services.start_s3()
                os.environ.update(s3_service.env)
                s3_root = f"s3://{s3_service.info['bucket']}/bench"
        if args.ray:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            import ray

            ray.init(num_cpus=args.ray_cpus + 1, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": dict(s3_service.env)} if s3_service else None)
            ray.data.DataContext.get_current().enable_progress_bars = False
        for name in args.preset or list(PRESETS):
            size_hw, fmt, scale, crop, count = PRESETS[name]
            local = str(work / name)
            write_synthetic(local, SynthSpec(classes=8, num_train=count, num_val=1, size_hw=size_hw, image_format=fmt),
                            shard_mb=64)
            uris = {"local": local}
            if s3_root:
                remote = f"{s3_root}/{name}"
                fs, path = storage.filesystem(remote)
                fs.put(local, path, recursive=True)
                uris["s3"] = remote
            data = {where: DataSection(uri=uri, scale=scale, crop_size=crop) for where, uri in uris.items()}
            pairs = load_pairs(local)
            mb = sum(len(a) + len(b) for a, b in pairs) / len(pairs) / 1e6
            best: dict[str, float] = {}
            best_cpu: dict[str, float] = {}
            cpu_runs: dict[str, list[float]] = {}
            params = pipeline.train_params(data["local"], read_manifest(local))
            for _ in range(args.trials):
                runs = {"decode": lambda: rate_decode(pairs), "transform": lambda: rate_transform(pairs, params),
                        "transform_uint8": lambda: rate_transform(pairs, params, uint8=True),
                        **{where: (lambda d=d: rate_iter(d, count)) for where, d in data.items()}}
                if args.ray:
                    runs[f"decode_x{args.ray_cpus}"] = lambda: rate_decode_parallel(local, count, args.ray_cpus)
                    runs.update({f"ray-{where}": (lambda d=d: rate_ray(d, count, args.ray_epochs))
                                 for where, d in data.items()})
                for key, fn in runs.items():
                    wall, cpu = fn()
                    best[key] = max(best.get(key, 0.0), wall)
                    best_cpu[key] = max(best_cpu.get(key, 0.0), cpu)
                    cpu_runs.setdefault(key, []).append(cpu)
            single = ["decode", "transform", "transform_uint8", "local"]
            row = {"image": f"{size_hw[0]}x{size_hw[1]} {fmt}", "scale": scale, "crop": crop, "samples": count,
                   "mb_per_sample": round(mb, 3), "samples_per_s": {k: round(v, 1) for k, v in best.items()},
                   "vs_decode": {k: round(v / best["decode"], 3) for k, v in best.items() if k in data},
                   "per_core": {k: _spread(cpu_runs[k]) for k in single},
                   "cpu_samples_per_s": {k: round(best_cpu[k], 1) for k in single},
                   "cpu_vs_decode": round(best_cpu["local"] / best_cpu["decode"], 3),
                   "stages": profile_stages(pairs[: min(32, count)], data["local"], local)}
            if args.ray:
                row["ray_vs_parallel_decode"] = {k: round(v / best[f"decode_x{args.ray_cpus}"], 3)
                                                 for k, v in best.items() if k.startswith("ray-")}
            results["presets"][name] = row
            print(json.dumps({name: row}), flush=True)
        results["machine"]["load_avg_at_end"] = os.getloadavg()
        print_tables(results, gpu)
    finally:
        if args.ray:
            import ray

            ray.shutdown()
        if s3_service is not None:
            s3_service.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
