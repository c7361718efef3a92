"""Ray's overhead: the same training loop under torchrun and under TorchTrainer + Ray Data (a benchmark, not a test).

    .venv/bin/python benchmarks/bench_overhead.py --steps --repeats 3    # step time, Ray / torchrun, interleaved
    .venv/bin/python benchmarks/bench_overhead.py --startup --repeats 5  # ray job submit -> first logged step

--steps    One cell (jobs/quickstart.yaml: hrnetv2_w18_small + OCR, 128x128 crops, batch 8 over 2 CPU workers,
           synthetic data) trained two ways, alternately, --repeats times each:
             ray       `ray job submit` of `python -m ocr_cluster.train CELL` on a warm Ray head (4 logical
                       CPUs): TorchTrainer, 2 workers of 1 CPU, the stream from Ray Data (read and decode tasks
                       in their own processes, the split coordinator, the object store);
             torchrun  `torchrun --standalone --nproc-per-node 2` of this file's --plain-worker: the same
                       Trainer.train_step (model, loss, optimizer, poly schedule, Progress, StepTrace) over a
                       PyTorch DDP model (gloo), fed by pipeline.iter_train for the rank in one DataLoader worker
                       process per rank (decode off the training thread, as Ray Data's tasks are).
           Both sides: 1 torch thread per rank (Ray sets OMP_NUM_THREADS from the worker's 1 CPU, torchrun to 1),
           OCR_CLUSTER_STEP_TRACE on (its SHA-256 of each batch costs both sides the same ~ms), no evaluation or
           checkpoint inside the measured window. Step time = wall time between the step-trace lines of
           iterations --warmup and --iters on rank 0, divided by the steps; CPU = the rank processes' own CPU
           seconds (time.process_time, all threads: for Ray also its core-worker threads) over the same steps.
           The whole machine's CPU split by process group (training ranks, data, Ray system) comes from /proc
           over the same window. --workers 1 trains one rank on each side (the same global batch), leaving one
           core of a 2-core machine to Ray's other processes, as a GPU node's spare cores do.
--startup  One tiny cell (as --steps, log_interval 1) submitted --repeats times to the warm head; the driver
           and the workers mark each start-up phase (ocr_cluster.train.phases, OCR_CLUSTER_STARTUP_TRACE): the
           table says where the time from `ray job submit` to the first logged step goes.

--lean     Start the head with ocr_cluster.ray_defaults.NODE_ENV and submit every job with its JOB_ENV, as the
           clusters ocr_cluster starts itself run (--head-env / --job-env add or override single variables).

The Ray head comes from scripts/services.py, started here and stopped by its PID. Everything else lives in a
temp dir, removed at the end. `uptime` is printed with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ocr_cluster import ray_defaults  # noqa: E402
BIN = Path(sys.executable).parent
ITER_LINE = re.compile(r"\] iter (\d+)/\d+ \|")


def uptime() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"


def cell(tmp: Path, data: Path, name: str, iters: int, log_interval: int, workers: int = 2) -> Path:
    """The quickstart cell with its own storage, no evaluation or checkpoint before the last iteration."""
    where = tmp / name
    body = {"base": str(REPO / "jobs/quickstart.yaml"), "cluster": {"num_workers": workers},
            "data": {"uri": str(data)},
            "schedule": {"iters": iters, "log_interval": log_interval, "checkpoint_interval": iters},
            "evaluation": {"interval": iters},
            "storage": {"checkpoint_uri": str(where / "runs")}, "results": {"store_uri": str(where / "store")}}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(body))  # YAML is a superset of JSON
    return path


# ---------------------------------------------------------------------------------------------
# CPU seconds of process trees, from /proc


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, CPU seconds, command line) of every process we may read."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    return table


def _rank(cmd: str) -> bool:
    """A torchrun rank (this file with --plain-worker), not torchrun's agent, whose command line has it too."""
    return "--plain-worker" in cmd and "torch.distributed.run" not in cmd


def _group(cmd: str) -> str:
    if "RayTrainWorker" in cmd or _rank(cmd):
        return "training ranks"
    if any(s in cmd for s in ("ReadShards", "MapBatches", "SplitCoordinator", "ray::_train_batch",
                              "ray::IDLE", "DataLoader", "ray::ReadDatasource")):
        return "data"
    return "other (Ray system, driver, launcher)"


def kind(cmd: str) -> str:
    """A short name for a process of the Ray head's tree: its Ray title (ray::RayTrainWorker) or program."""
    first = cmd.split(" ", 1)[0]
    if first.startswith("ray::"):
        return first.split(".")[0]
    if "ocr_cluster.train" in cmd:
        return "job driver (python -m ocr_cluster.train)"
    for name in ("raylet", "gcs_server", "dashboard.py", "log_monitor", "runtime_env", "dashboard_agent",
                 "ray.util.client", "forkserver", "monitor.py", "ray start"):
        if name in cmd:
            return name
    return os.path.basename(first)


def tree_cpu(roots: list[int], label=None) -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds) of `roots` and all their descendants; `label(cmd)` names the group."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        ppid, cpu, cmd = table[pid]
        # A DataLoader worker is a fork of its rank: the same command line, a rank for a parent.
        loader = _rank(cmd) and _rank(table.get(ppid, (0, 0, ""))[2])
        out[pid] = ("data" if loader and label is None else (label or _group)(cmd), cpu)
        todo += children.get(pid, [])
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per group between two tree_cpu snapshots (a process new in `after` counts whole)."""
    groups: dict[str, float] = {}
    for pid, (group, cpu) in after.items():
        groups[group] = groups.get(group, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    return groups


# ---------------------------------------------------------------------------------------------
# The torchrun side: this file run by torchrun with --plain-worker


def plain_worker(cell_path: str, loader_workers: int) -> None:
    """One torchrun rank: Trainer.train_step over a plain DDP model and iter_train; no Ray anywhere."""
    import torch
    import torch.distributed as dist

    from ocr_cluster import config
    from ocr_cluster.data.pipeline import iter_train, open_dataset
    from ocr_cluster.train import host
    from ocr_cluster.train.layout import RunLayout
    from ocr_cluster.train.fastpath import amp_dtype, ddp_options
    from ocr_cluster.train.loop import Trainer, intervals, worker_seed
    from ocr_cluster.train.progress import Progress
    from ocr_cluster.train.trace import StepTrace

    class Batches(torch.utils.data.IterableDataset):
        """This rank's batches as torch_batches makes them (image float32, label int64, key)."""

        def __init__(self, cfg, manifest, rank, world, micro):
            self.args = cfg, manifest, rank, world, micro

        def __iter__(self):
            cfg, manifest, rank, world, micro = self.args
            for batch in iter_train(cfg.data, seed=cfg.run.seed, rank=rank, world_size=world, batch_size=micro,
                                    manifest=manifest):
                if len(batch["key"]) == micro:
                    yield {"image": torch.from_numpy(batch["image"]),
                           "label": torch.from_numpy(batch["label"].astype("int64")), "key": batch["key"]}

    class PlainTrainer(Trainer):
        """Trainer.__init__ without Ray: what it builds, built by hand (prepare_model on CPU is DDP(model))."""

        def __init__(self, cfg, manifest, rank: int, world: int):
            self.cfg, self.skip_counter, self.launch = cfg, None, None
            self.layout = layout = RunLayout.from_config(cfg)
            self.manifest, self.rank, self.world, self.num_nodes = manifest, rank, world, 1
            self.device = torch.device("cpu")
            self.dtype = amp_dtype(cfg.cluster.amp, self.device)
            torch.manual_seed(cfg.run.seed)
            self.resumed_clock = None
            model = self._build_model(fresh=True)
            # fast-path options, DDP, optimizer and scaler exactly as the Ray Trainer (its wrap is DDP on CPU)
            # (with one worker prepare_model leaves the model unwrapped, so this does too)
            self._prepare(model, wrap=lambda m: m if world == 1 else
                          torch.nn.parallel.DistributedDataParallel(m, **ddp_options(m)))
            self.start_iter = 0
            torch.manual_seed(worker_seed(cfg.run.seed, rank))
            self.class_weight = torch.tensor(cfg.loss.class_weight) if cfg.loss.class_weight else None
            self.ohem = (cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept) if cfg.loss.ohem else None
            self.ckpt_every, self.eval_every = intervals(cfg)
            loader = torch.utils.data.DataLoader(Batches(cfg, manifest, rank, world, layout.micro_batch),
                                                 batch_size=None, num_workers=loader_workers)
            self.batches = iter(loader)
            self.trace = StepTrace(rank)
            self.progress = Progress(cfg, layout, 0, rank, images_per_iter=cfg.data.batch_size)

    host.keep_freed_memory()  # as train_fn_per_worker does
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config.load(cell_path)
    manifest = open_dataset(cfg.data)
    cfg = config.with_dataset(cfg, manifest.fingerprint)
    trainer = PlainTrainer(cfg, manifest, rank, world)
    if rank == 0:
        print(f"torchrun rank 0: torch threads {torch.get_num_threads()}, world {world}", flush=True)
    with trainer.progress:
        trainer.start()
        for it in range(cfg.schedule.iters):
            lr = trainer.train_step(it)
            trainer.progress.step(it + 1, lr)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The two sides, run from here


class RayHead:
    def __init__(self, node_env: dict[str, str] | None = None, job_env: dict[str, str] | None = None):
        sys.path.insert(0, str(REPO / "scripts"))
        import services

        self.service = services.start_ray(num_cpus=4, object_store_mb=400, node_env=node_env)
        self.env = {**os.environ, **services.RAY_ENV, **self.service.env,
                    "RAY_ADDRESS": self.service.info["dashboard_url"]}
        base = subprocess.run([sys.executable, "-m", "ocr_cluster.runtime_env", "jobs/runtime_env.yaml"],
                              env=self.env, cwd=REPO, capture_output=True, text=True, check=True).stdout
        self.runtime_env = json.loads(base)
        self.runtime_env["env_vars"] = {**self.runtime_env.get("env_vars", {}), **(job_env or {})}

    def roots(self) -> list[int]:
        return list(self.service.pids)

    def stop(self) -> None:
        self.service.stop()


def follow(proc: subprocess.Popen, on_iter, until_iter: int, seen: list[str]) -> float | None:
    """Read proc's output; on_iter(iteration, perf_counter) for each "iter" line; returns the time the line of
    `until_iter` came, or None when the output ended first."""
    for line in proc.stdout:
        seen.append(line)
        match = ITER_LINE.search(line)
        if match:
            now = time.perf_counter()
            on_iter(int(match.group(1)), now)
            if int(match.group(1)) >= until_iter:
                return now
    return None


def submit(head: RayHead, cell_path: Path, job: str, env_vars: dict) -> tuple[subprocess.Popen, float]:
    runtime_env = {**head.runtime_env, "env_vars": {**head.runtime_env.get("env_vars", {}), **env_vars}}
    started = time.time()
    proc = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--submission-id", job, "--runtime-env-json",
                             json.dumps(runtime_env), "--", "python", "-m", "ocr_cluster.train", str(cell_path)],
                            env=head.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, started


def stop_job(head: RayHead, job: str, proc: subprocess.Popen) -> None:
    subprocess.run([str(BIN / "ray"), "job", "stop", job], env=head.env, cwd=REPO, capture_output=True)
    proc.terminate()
    proc.wait()


def read_trace(trace: Path, rank: int = 0) -> list[dict]:
    path = trace / f"rank{rank}.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]  # whole lines only


def wait_for_trace(trace: Path, last: int, world: int, timeout: float = 30.0) -> None:
    """Until every rank's step trace holds iteration `last`: rank 0 logs it, the other ranks may be a step
    behind, and the run is stopped on that line."""
    deadline = time.time() + timeout
    while time.time() < deadline and not all(any(s["iter"] >= last for s in read_trace(trace, r))
                                             for r in range(world)):
        time.sleep(0.1)


def window(trace: Path, first: int, last: int, world: int) -> dict:
    """Wall and CPU seconds per step over iterations (first, last], from the step trace of every rank."""
    out: dict = {}
    for rank in range(world):
        steps = {s["iter"]: s for s in read_trace(trace, rank)}
        a, b = steps[first], steps[last]
        n = last - first
        if rank == 0:
            out["step_s"] = (b["t"] - a["t"]) / n
            walls = [steps[i]["t"] - steps[i - 1]["t"] for i in range(first + 1, last + 1)]
            out["step_median_s"] = statistics.median(walls)
        out.setdefault("rank_cpu_s", []).append((b["cpu"] - a["cpu"]) / n)
    out["rank_cpu_s"] = sum(out["rank_cpu_s"]) / world  # mean over ranks, per step
    return out


def measured_run(way: str, tmp: Path, data: Path, head: RayHead, args, index: int) -> dict:
    """One run of `way`; CPU snapshots at the --warmup and --iters lines."""
    name = f"{way}{index}"
    trace = tmp / f"{name}_trace"
    trace.mkdir()
    path = cell(tmp, data, name, args.iters, args.log_interval, args.workers)
    snaps: dict[int, tuple[float, dict]] = {}
    roots: list[int] = []

    by_kind: dict[int, dict] = {}

    def on_iter(it: int, now: float) -> None:
        if it in (args.warmup, args.iters):
            snaps[it] = (now, tree_cpu(roots))
            by_kind[it] = tree_cpu(roots, kind)

    seen: list[str] = []
    load_before = uptime()
    if way == "ray":
        job = f"bench_overhead_{os.getpid()}_{name}"
        proc, _ = submit(head, path, job, {"OCR_CLUSTER_STEP_TRACE": str(trace)})
        roots[:] = head.roots()
        try:
            done = follow(proc, on_iter, args.iters, seen)
            wait_for_trace(trace, args.iters, args.workers)
        finally:
            stop_job(head, job, proc)
    else:
        env = {**os.environ, "OCR_CLUSTER_STEP_TRACE": str(trace), "PYTHONPATH": str(REPO)}
        env["OMP_NUM_THREADS"] = "1"  # as Ray sets it from the worker's 1 CPU (torchrun does only for 2+ ranks)
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                                 "--nproc-per-node", str(args.workers), __file__, "--plain-worker", str(path),
                                 "--loader-workers", str(args.loader_workers)],
                                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        roots[:] = [proc.pid]
        try:
            done = follow(proc, on_iter, args.iters, seen)
            wait_for_trace(trace, args.iters, args.workers)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    if done is None or set(snaps) != {args.warmup, args.iters}:
        raise RuntimeError(f"{way}: no iter {args.iters} line:\n" + "".join(seen[-30:]))
    result = window(trace, args.warmup, args.iters, args.workers)
    (_, c0), (_, c1) = snaps[args.warmup], snaps[args.iters]
    steps = args.iters - args.warmup
    result.update({f"cpu/step {g}": v / steps for g, v in cpu_delta(c0, c1).items()})
    kinds = cpu_delta(by_kind[args.warmup], by_kind[args.iters])
    result["top processes, CPU s/step"] = ", ".join(f"{k} {v / steps:.3f}" for k, v in
                                                   sorted(kinds.items(), key=lambda kv: -kv[1])[:12])
    result["load"] = f"{load_before} -> {uptime()}"
    return result


def bench_steps(args, tmp: Path, data: Path, head: RayHead) -> None:
    rows: dict[str, list[dict]] = {"ray": [], "torchrun": []}
    order = args.ways.split(",")
    for i in range(args.repeats):
        for way in (order if i % 2 == 0 else order[::-1]):  # ABBA: neither side always first
            try:
                got = measured_run(way, tmp, data, head, args, i)
            except RuntimeError as exc:
                print(f"  {way} #{i + 1}: FAILED: {str(exc)[-2000:]}", flush=True)
                continue
            rows[way].append(got)
            print(f"  {way} #{i + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in got.items()), flush=True)
    print(f"\nsteady-state steps {args.warmup}..{args.iters}, median (min-max) over runs:")
    text = ("load", "top processes, CPU s/step")
    keys = [k for k in rows["ray"][0] if k not in text] if rows["ray"] else []
    for key in dict.fromkeys(keys + [k for r in rows["torchrun"][:1] for k in r if k not in text]):
        print(f"  {key:45s} ray {spread([r.get(key, 0.0) for r in rows['ray']])}   "
              f"torchrun {spread([r.get(key, 0.0) for r in rows['torchrun']])}")
    pairs = list(zip(rows["ray"], rows["torchrun"]))  # run i of each way: neighbours in time (ABBA)
    for key in ("step_s", "step_median_s", "rank_cpu_s"):
        ratios = [r[key] / t[key] for r, t in pairs]
        print(f"  ratio ray / torchrun, {key:20s} {spread(ratios)}")


PHASES = [  # (label, from mark, to mark); "submit" is the client's time.time() before `ray job submit`
    ("submit -> driver process start", "submit", "driver_process"),
    ("driver process start -> ocr_cluster.train runs", "driver_process", "driver_main"),
    ("config, imports -> driver.run", "driver_main", "driver_run"),
    ("preflight (manifest, shard sizes, checkpoints)", "driver_run", "preflight"),
    ("results store: completed row?", "preflight", "results_checked"),
    ("ray.init (join the cluster)", "results_checked", "ray_connected"),
    ("cluster CPUs, storage probe", "ray_connected", "cluster_checked"),
    ("build TorchTrainer", "cluster_checked", "fit"),
    ("fit -> worker processes start (controller, placement group, actors)", "fit", "worker_process"),
    ("worker process -> train fn (process group, imports)", "worker_process", "worker_fn"),
    ("train fn -> manifest read", "worker_fn", "manifest"),
    # The worker's next marks in the order they came (their order depends on the version), each timed
    # from the mark before it.
    ("-> model built", None, "model_built"),
    ("-> DDP wrapped (a collective: waits for the slower rank)", None, "ddp"),
    ("-> dataset planned and split", None, "stream_split"),
    ("-> first batch in hand (Ray Data started)", None, "batch"),
    ("-> first step done", None, "first_step"),
    ("first step -> its log line at the client", "first_step", "client_iter"),
]
WORKER_ORDERED = ("manifest", "model_built", "ddp", "stream_split", "batch", "first_step")


DRIVER_MARKS = {"driver_process", "driver_main", "driver_run", "preflight", "results_checked", "ray_connected",
                "cluster_checked", "fit"}


def startup_once(tmp: Path, data: Path, head: RayHead, index: int) -> dict:
    name = f"startup{index}"
    marks_dir = tmp / f"{name}_marks"
    marks_dir.mkdir()
    path = cell(tmp, data, name, 20, 1)
    job = f"bench_overhead_{os.getpid()}_{name}"
    load_before = uptime()
    before = tree_cpu(head.roots(), kind)
    proc, submitted = submit(head, path, job, {"OCR_CLUSTER_STARTUP_TRACE": str(marks_dir)})
    seen: list[str] = []
    client: dict = {}

    def on_iter(it: int, now: float) -> None:
        client.setdefault("iter", time.time())
        client.setdefault("cpu", tree_cpu(head.roots(), kind))

    try:
        if follow(proc, on_iter, 1, seen) is None:
            raise RuntimeError("no iter line:\n" + "".join(seen[-30:]))
    finally:
        stop_job(head, job, proc)
    lines = [json.loads(x) for x in (marks_dir / "startup.jsonl").read_text().splitlines()]
    at = {"submit": submitted, "client_iter": client["iter"]}
    cpu_at: dict[str, float] = {}  # the CPU seconds of the process that marked it (driver, or rank 0)
    for line in lines:
        rank = line.get("rank", 0)
        if rank != 0:
            continue
        at.setdefault(line["phase"], line["t"])
        cpu_at.setdefault(line["phase"], line["cpu"])
        if line["phase"] == "driver_main":
            at["driver_process"], cpu_at["driver_process"] = line["process_start"], 0.0
        if line["phase"] == "worker_fn":
            at["worker_process"], cpu_at["worker_process"] = line["process_start"], 0.0
    order = sorted((m for m in WORKER_ORDERED if m in at), key=lambda m: at[m])
    previous = {b: a for a, b in zip(order, order[1:])}
    phases = [(label, a or previous.get(b), b) for label, a, b in PHASES]
    out = {label: at[b] - at[a] for label, a, b in phases if a in at and b in at}
    out["worker order"] = " ".join(order)
    out.update({f"cpu {label}": cpu_at[b] - cpu_at[a] for label, a, b in phases if a in cpu_at and b in cpu_at
                and (a in DRIVER_MARKS) == (b in DRIVER_MARKS)})
    out.update({f"tree {k}": v for k, v in cpu_delta(before, client["cpu"]).items()})
    out["submit -> first logged step (client)"] = at["client_iter"] - submitted
    out["load"] = f"{load_before} -> {uptime()}"
    return out


def bench_startup(args, tmp: Path, data: Path, head: RayHead) -> None:
    rows = []
    for i in range(args.repeats):
        try:
            got = startup_once(tmp, data, head, i)
        except RuntimeError as exc:
            print(f"  startup #{i + 1}: FAILED: {str(exc)[-2000:]}", flush=True)
            continue
        rows.append(got)
        print(f"  startup #{i + 1}: total {got['submit -> first logged step (client)']:.2f} s, {got['load']}; "
              f"worker marks: {got['worker order']}", flush=True)
    print("\nphase | wall s, median (min-max) | CPU s of the process that ran it (driver or rank 0)")
    for label in [p[0] for p in PHASES] + ["submit -> first logged step (client)"]:
        print(f"  {label:70s} {spread([r[label] for r in rows if label in r], '{:.2f}')}   "
              f"{spread([r[f'cpu {label}'] for r in rows if f'cpu {label}' in r], '{:.2f}')}")
    print("\nCPU s from submit to the first logged step, by process of the Ray head's tree, median (min-max)")
    kinds = sorted({k for r in rows for k in r if k.startswith("tree ")},
                   key=lambda k: -statistics.median([r.get(k, 0.0) for r in rows]))
    for key in kinds:
        print(f"  {key[5:]:50s} {spread([r.get(key, 0.0) for r in rows], '{:.2f}')}")
    print(f"  {'all':50s} {spread([sum(v for k, v in r.items() if k.startswith('tree ')) for r in rows], '{:.2f}')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", action="store_true")
    parser.add_argument("--startup", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=60, help="--steps: the last measured iteration")
    parser.add_argument("--warmup", type=int, default=20, help="--steps: iterations before the window")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--loader-workers", type=int, default=1,
                        help="torchrun side: DataLoader worker processes per rank (0: decode on the training thread)")
    parser.add_argument("--workers", type=int, default=2,
                        help="--steps: training ranks on each side (1 leaves a core of a 2-core machine to the rest)")
    parser.add_argument("--ways", default="ray,torchrun", help="--steps: which sides, in the first round's order")
    parser.add_argument("--warm-jobs", type=int, default=1, help="jobs run on the fresh head before measuring")
    parser.add_argument("--lean", action="store_true",
                        help="the head and jobs with ocr_cluster.ray_defaults, as the clusters ocr_cluster starts")
    parser.add_argument("--head-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable of the Ray head (ray start), repeatable")
    parser.add_argument("--job-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an env_vars entry of every job's runtime env, repeatable")
    parser.add_argument("--plain-worker", metavar="CELL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker, args.loader_workers)
        return 0
    if not (args.steps or args.startup):
        parser.error("choose --steps and/or --startup")
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ[key] = value
    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    if args.lean:
        print(f"lean: head env {ray_defaults.NODE_ENV}, job env {ray_defaults.JOB_ENV}", flush=True)
    if args.head_env or args.job_env:
        print(f"head env {args.head_env}, job env {args.job_env}", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {uptime()}", flush=True)
    head = None
    try:
        data = tmp / "data"
        subprocess.run([str(BIN / "ocr-cluster"), "data", "synth", str(data)], cwd=REPO, check=True,
                       capture_output=True)
        node_env, job_env = (ray_defaults.NODE_ENV, ray_defaults.JOB_ENV) if args.lean else ({}, {})
        head = RayHead({**node_env, **dict(kv.split("=", 1) for kv in args.head_env)},
                       {**job_env, **dict(kv.split("=", 1) for kv in args.job_env)})
        print(f"Ray head up ({head.service.info['address']}), {uptime()}", flush=True)
        for i in range(args.warm_jobs):  # a warm cluster: one job has run on it
            startup_once(tmp, data, head, 100 + i)
        print(f"warmed, {uptime()}", flush=True)
        if args.startup:
            bench_startup(args, tmp, data, head)
        if args.steps:
            bench_steps(args, tmp, data, head)
        print(f"end: {time.strftime('%H:%M:%S')}, {uptime()}", flush=True)
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
