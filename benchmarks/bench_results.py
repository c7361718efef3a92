"""Query time of the results store with many runs (default 10,000), on a local path or s3://.

    .venv/bin/python benchmarks/bench_results.py                       # 10,000 runs in a temp dir
    .venv/bin/python benchmarks/bench_results.py --runs 2000 --store s3://bucket/bench   # AWS_ENDPOINT_URL etc.

Writes N realistic rows (full config YAML, 19 per-class IoUs) with `write_run` from a few processes,
then times, each on a fresh read:
  cold     read_runs without the index: list + parse every file
  indexing the first read_runs: parses every file and writes the index
  warm     read_runs with an up-to-date index (median of 5)
  warm+new the same after 100 more runs were written (they are read directly)
  table    `results table` end to end on the warm store (read + seeds layout + markdown)
  pivot    `results table --cols iters` end to end
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time

from ocr_cluster import config
from ocr_cluster.models.names import BACKBONES, HEADS
from ocr_cluster.results import read_runs, row_from_config, write_run
from ocr_cluster.results import tables
from ocr_cluster.results.store import _index_files
from ocr_cluster import storage

CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def make_row(i: int) -> dict:
    backbone = BACKBONES[i % len(BACKBONES)]
    head = HEADS[(i // len(BACKBONES)) % len(HEADS)]
    iters = (20000, 40000, 80000, 160000)[(i // 98) % 4]
    cfg = config.load(None, [f"model.backbone={backbone}", f"model.head={head}", "data.dataset=cityscapes",
                             "data.crop_size=512x1024", f"schedule.iters={iters}", f"run.seed={i}",
                             "run.sweep=bench"])
    miou = 60 + (i * 7919) % 2000 / 100
    return row_from_config(cfg, status="completed", miou=miou, miou_msflip=miou + 1.5, aacc=95.0, macc=miou + 8,
                           iou_per_class={c: miou + k % 5 for k, c in enumerate(CLASSES)}, mem_gb=4.7, fps=7.5,
                           train_time_s=36000.0, num_nodes=1, device="NVIDIA H100 80GB HBM3",
                           started_at=1.7e9, finished_at=1.7e9 + 36000)


def _write(args: tuple[str, int, int]) -> int:
    store, start, stop = args
    for i in range(start, stop):
        write_run(store, make_row(i))
    return stop - start


def populate(store: str, start: int, stop: int, procs: int) -> float:
    t0 = time.perf_counter()
    step = max(1, (stop - start) // (procs * 8))
    chunks = [(store, a, min(a + step, stop)) for a in range(start, stop, step)]
    with mp.get_context("fork").Pool(procs) as pool:
        assert sum(pool.map(_write, chunks)) == stop - start
    return time.perf_counter() - t0


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def table_md(store: str, **pivot) -> str:
    runs = read_runs(store, status="completed").drop_columns(["config_yaml", "iou_per_class"]).to_pylist()
    if pivot:
        return tables.render([tables.pivot(runs, ["backbone", "head"], "iters", "miou")])
    return tables.render(tables.seeds_tables(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--store", help="store URI (default: a new temp dir, removed afterwards)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="writer processes")
    args = parser.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="ocr_bench_")
    n = args.runs
    try:
        write_s = populate(store, 0, n, args.procs)
        files = len(storage.list_files(store, ".parquet"))
        cold, table = timed(lambda: read_runs(store, use_index=False))
        assert table.num_rows == n, table.num_rows
        indexing, _ = timed(lambda: read_runs(store))
        assert _index_files(*storage.filesystem(store)), "no index written"
        warm = statistics.median(timed(lambda: read_runs(store))[0] for _ in range(5))
        populate(store, n, n + 100, args.procs)
        fresh, table = timed(lambda: read_runs(store))
        assert table.num_rows == n + 100
        table_s, md = timed(lambda: table_md(store))
        pivot_s, _ = timed(lambda: table_md(store, pivot=True))
        print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")
        print(f"store: {store}  ({files} files written in {write_s:.1f} s with {args.procs} processes, "
              f"{n / write_s:.0f} runs/s)")
        print(f"| query ({n} runs) | seconds |\n|---|---:|")
        for name, sec in [("cold (no index, parse every file)", cold), ("first read (parse + write index)", indexing),
                          ("warm (index up to date, median of 5)", warm),
                          ("warm + 100 unindexed runs", fresh), ("`results table` end to end", table_s),
                          ("`results table --cols iters` end to end", pivot_s)]:
            print(f"| {name} | {sec:.2f} |")
        print(f"({md.count(chr(10)) - 2} table rows)")
    finally:
        if not args.store:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
