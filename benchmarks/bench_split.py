"""CPU time of Ray Data's split coordinator with and without pacing (ocr_cluster/data/pacing.py).

    python benchmarks/bench_split.py DATA_URI [--rounds 2] [--batches 60] [--step-s 0.5]

The quickstart's training stream (300 iterations of data.batch_size 8, 128x128 crops) split over 2 consumers as in
train/loop.py (streaming_split, equal, locality hints), each consumer taking a batch of 4 every
--step-s seconds, as a CPU training worker does, without spending CPU itself; measured after each
consumer's first 5 batches (start-up left out). Each side runs in a fresh
process with its own local Ray cluster (OCR_CLUSTER_DATA_PACING=1 or 0 for the whole job); the sides
alternate for --rounds rounds. Printed per run: wall seconds and the coordinator actor's CPU seconds
(from /proc, user + system), and the median per side. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _coordinator_cpu_s() -> float:
    """CPU seconds of the `ray::SplitCoordinator` processes below this one (its local cluster's workers)."""
    procs = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        procs[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), title)
    ours, grew = {os.getpid()}, True
    while grew:
        new = {pid for pid, (ppid, _, _) in procs.items() if ppid in ours} - ours
        ours |= new
        grew = bool(new)
    return sum(cpu for pid, (_, cpu, title) in procs.items() if pid in ours and title.startswith("ray::SplitCoord"))


def one_side(uri: str, batches: int, step_s: float) -> dict:
    """Runs in its own process: one local cluster, one split stream, two slow consumers."""
    import ray

    from ocr_cluster import config
    from ocr_cluster.data.pipeline import epochs_for, open_dataset, train_dataset

    cfg = config.load(None, [f"data.uri={uri}"])
    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OCR_CLUSTER_DATA_PACING": os.environ["OCR_CLUSTER_DATA_PACING"]}})
    manifest = open_dataset(cfg.data)
    ds = train_dataset(cfg.data, manifest=manifest, num_epochs=epochs_for(300, 8, manifest))  # the quickstart's
    node = ray.get_runtime_context().get_node_id()
    splits = ds.streaming_split(2, equal=True, locality_hints=[node, node])

    @ray.remote(num_cpus=1)
    class Consumer:
        """Takes batches of 4 (its half of the global batch 8) and 'trains' step seconds on each."""

        def take(self, split, n: int, step: float) -> int:
            if not hasattr(self, "batches"):
                self.batches = iter(split.iter_batches(batch_size=4, batch_format="numpy", drop_last=True))
            for taken in range(n):
                if next(self.batches, None) is None:
                    return taken
                time.sleep(step)  # the training step, as far as the data pipeline can tell
            return n

    consumers = [Consumer.remote() for _ in range(2)]
    # Warm-up (workers starting, the first blocks) left out: the steady state is what training lives in.
    ray.get([c.take.remote(s, 5, step_s) for c, s in zip(consumers, splits)])
    cpu_before, began = _coordinator_cpu_s(), time.time()
    taken = ray.get([c.take.remote(s, batches, step_s) for c, s in zip(consumers, splits)])
    wall = time.time() - began
    cpu = _coordinator_cpu_s() - cpu_before
    ray.shutdown()
    return {"wall_s": wall, "coordinator_cpu_s": cpu, "batches": taken}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--step-s", type=float, default=0.5)
    parser.add_argument("--one-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_side:
        print(json.dumps(one_side(args.uri, args.batches, args.step_s)))
        return 0
    results: dict[str, list] = {"paced": [], "unpaced": []}
    for r in range(args.rounds):
        for side in ("unpaced", "paced") if r % 2 == 0 else ("paced", "unpaced"):
            env = {**os.environ, "OCR_CLUSTER_DATA_PACING": "1" if side == "paced" else "0"}
            out = subprocess.run([sys.executable, __file__, args.uri, "--one-side", "--batches", str(args.batches),
                                  "--step-s", str(args.step_s)], env=env, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["load"] = os.getloadavg()[0]
            results[side].append(run)
            print(f"{side:8s} wall {run['wall_s']:6.1f} s  coordinator CPU {run['coordinator_cpu_s']:6.1f} s  "
                  f"load {run['load']:.1f}", flush=True)
    for side, runs in results.items():
        cpu = [r["coordinator_cpu_s"] for r in runs]
        print(f"{side:8s} median coordinator CPU {statistics.median(cpu):.1f} s (range {min(cpu):.1f}-{max(cpu):.1f}), "
              f"median wall {statistics.median(r['wall_s'] for r in runs):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
