"""Cost of the sweep commands and of the SLURM path per cell (a benchmark, not a test).

    .venv/bin/python benchmarks/bench_sweep.py --plan                 # `sweep plan` of the largest grid
    .venv/bin/python benchmarks/bench_sweep.py --launch 100           # `sweep launch` of a 100-cell grid
    .venv/bin/python benchmarks/bench_sweep.py --overhead --repeats 3 # task start -> first step, vs ray job submit
    .venv/bin/python benchmarks/bench_sweep.py --overhead --ways ray,tune --repeats 3   # Tune trial vs ray job submit
    .venv/bin/python benchmarks/bench_sweep.py --multinode --repeats 2 # a nodes: 2 cell: start -> joined -> step

--plan      wall time of `ocr-cluster sweep plan` as a fresh process on the grid of sweeps/ with the most
            runs, with --no-store and with an empty local store (median of --repeats).
--launch N  a grid of N cells (jobs/quickstart.yaml, one axis of N schedule.iters values) whose data.uri is
            missing, so a task that ran would fail its preflight at once; times `sweep launch` (it returns
            once the array is queued), then `sweep cancel`s it.
--overhead  one tiny cell (hrnetv2_w18_small, 64x64 crop, 16 synthetic samples, log_interval 1), run
            --repeats times each way, interleaved:
              slurm  `sweep launch` of a one-cell grid; the task log is polled every 50 ms: submit -> task
                     start (submitit's first log line) -> first "iter" line;
              ray    `ray job submit` of `python -m ocr_cluster.train CELL` with the README's runtime env
                     on a warm Ray head: submit -> the driver's "run <id> (...)" line (driver start) ->
                     first "iter" line of the followed job log.
              tune   `sweep launch --backend ray` of the one-cell grid on the same head (one Ray job running
                     Tune, one trial): submit -> the trial's "run <id> (...)" line (driver.run starting in
                     the trial) -> first "iter" line, from the job's log polled every 200 ms.
            --ways picks which (default slurm,ray).
            Each run is stopped (sweep cancel / ray job stop) once its first iteration is logged.
--multinode the same tiny cell with backend.slurm.nodes 2 (2 CPU workers, one per node) on the two-node
            test SLURM: submit -> job start (task 0's first log line) -> head up -> all nodes joined ->
            first "iter" line, from the task logs polled every 50 ms; cancelled after the first iteration.

SLURM and Ray come from scripts/services.py, started here and stopped by PID; with SLURM_CONF already set
the benchmark uses that SLURM instead. Everything else lives in a temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import services  # noqa: E402

from ocr_cluster.sweep.grid import load  # noqa: E402

BIN = Path(sys.executable).parent
CLI = [str(BIN / "ocr-cluster")]
ITER_LINE = re.compile(r"\] iter \d+/\d+ \|")
RUN_LINE = re.compile(r"\brun \S+ \(.*\): .* iterations, batch")  # driver.run's first line


def run(cmd: list[str], env: dict | None = None, check: bool = True) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return took, proc.stdout + proc.stderr


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def machine() -> None:
    load_avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load_avg}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)


# ---------------------------------------------------------------------------------------------


def bench_plan(repeats: int, tmp: Path) -> None:
    grids = {path: len(load(path).cells()) for path in sorted((REPO / "sweeps").glob("*.yaml"))}
    largest = max(grids, key=grids.get)
    print("runs per grid: " + ", ".join(f"{p.stem} {n}" for p, n in grids.items()))
    grid = str(largest.relative_to(REPO))
    store = tmp / "empty_store"
    store.mkdir()
    for label, extra in (("--no-store", ["--no-store"]), ("empty local store", ["--store", str(store)])):
        times = [run([*CLI, "sweep", "plan", grid, *extra])[0] for _ in range(repeats)]
        print(f"sweep plan {grid} ({grids[largest]} runs), {label}: {spread(times)}", flush=True)


def slurm_env(stack: list) -> dict[str, str]:
    if os.environ.get("SLURM_CONF"):
        return dict(os.environ)
    service = services.start_slurm()
    stack.append(service)
    print(f"started SLURM: {service.env['SLURM_CONF']}", flush=True)
    return {**os.environ, **service.env}


def write_grid(path: Path, name: str, base: str, sets: dict, axes: dict | None = None, seeds=None,
               nodes: int = 0) -> Path:
    body: dict = {"name": name, "base": base, "set": sets,
                  "backend": {"slurm": {"gpus_per_node": 0, "time": "10:00", "nodes": nodes}}}
    if axes:
        body["axes"] = axes
    if seeds is not None:
        body["seeds"] = seeds
    path.write_text(json.dumps(body, indent=1))  # YAML is a superset of JSON
    return path


def bench_launch(cells: int, tmp: Path, env: dict) -> None:
    grid = write_grid(tmp / "launch_grid.yaml", f"bench_launch_{os.getpid()}", str(REPO / "jobs/quickstart.yaml"),
                      {"data.uri": str(tmp / "missing_data"), "storage.checkpoint_uri": str(tmp / "runs"),
                       "results.store_uri": str(tmp / "launch_store")},
                      axes={"schedule.iters": list(range(100, 100 + cells))})
    try:
        took, out = run([*CLI, "sweep", "launch", str(grid), "--folder", str(tmp / "folder")], env=env)
        print(f"sweep launch of {cells} cells: {took:.2f} s ({out.splitlines()[0]})", flush=True)
    finally:
        took, out = run([*CLI, "sweep", "cancel", str(grid)], env=env, check=False)
        print(f"sweep cancel: {took:.2f} s ({out.strip().splitlines()[0] if out.strip() else ''})", flush=True)


# ---------------------------------------------------------------------------------------------


def tiny_cell(tmp: Path, data: Path, seed: int) -> dict:
    where = tmp / f"cell{seed}"
    return {"model.backbone": "hrnetv2_w18_small", "model.head": "ocr", "data.dataset": "synthetic",
            "data.uri": str(data), "data.crop_size": "64x64", "data.scale": "64x64", "data.batch_size": 2,
            "schedule.iters": 20, "schedule.log_interval": 1, "schedule.checkpoint_interval": 20,
            "evaluation.interval": 20, "evaluation.fps_images": 6, "cluster.num_workers": 2,
            "storage.checkpoint_uri": str(where / "runs"), "results.store_uri": str(where / "store"),
            "run.seed": seed}


def wait_for(lines, pattern: re.Pattern, timeout: float) -> float | None:
    """perf_counter time at which a line matching `pattern` came out of `lines()` (called repeatedly)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if any(pattern.search(line) for line in lines()):
            return time.perf_counter()
        time.sleep(0.05)
    return None


def slurm_once(tmp: Path, data: Path, seed: int, env: dict) -> dict:
    grid = write_grid(tmp / f"slurm_{seed}.yaml", f"bench_cell_{os.getpid()}_{seed}", str(REPO / "jobs/quickstart.yaml"),
                      tiny_cell(tmp, data, seed))
    folder = tmp / f"folder_{seed}"
    start = time.perf_counter()
    try:
        run([*CLI, "sweep", "launch", str(grid), "--folder", str(folder)], env=env)

        def lines() -> list[str]:
            text = "".join(p.read_text(errors="replace") for p in folder.glob("*/*/*_log.*"))
            return text.splitlines()

        started = wait_for(lines, re.compile(r"Starting with JobEnvironment"), 600)
        first = wait_for(lines, re.compile(ITER_LINE.pattern + r"|submitit ERROR"), 600)
        if started is None or first is None or not any(ITER_LINE.search(line) for line in lines()):
            raise RuntimeError("no task start or iter line:\n" + "\n".join(lines()[-20:]))
        return {"submit_to_start": started - start, "start_to_iter": first - started, "submit_to_iter": first - start}
    finally:
        run([*CLI, "sweep", "cancel", str(grid)], env=env, check=False)


def multinode_once(tmp: Path, data: Path, seed: int, env: dict) -> dict:
    grid = write_grid(tmp / f"multi_{seed}.yaml", f"bench_multi_{os.getpid()}_{seed}", str(REPO / "jobs/quickstart.yaml"),
                      tiny_cell(tmp, data, seed), nodes=2)
    folder = tmp / f"mfolder_{seed}"
    start = time.perf_counter()
    try:
        run([*CLI, "sweep", "launch", str(grid), "--folder", str(folder)], env=env)

        def lines() -> list[str]:
            text = "".join(p.read_text(errors="replace") for p in folder.glob("*/*/*_0_log.*"))
            return text.splitlines()

        started = wait_for(lines, re.compile(r"Starting with JobEnvironment"), 600)
        joined_re = re.compile(r"all 2 nodes joined the cell's Ray cluster \(([\d.]+)s after the head\)|submitit ERROR")
        joined = wait_for(lines, joined_re, 600)
        first = wait_for(lines, re.compile(ITER_LINE.pattern + r"|submitit ERROR"), 600)
        after_head = [float(m.group(1)) for m in map(joined_re.search, lines()) if m and m.group(1)]
        if None in (started, joined, first) or not after_head or not any(ITER_LINE.search(x) for x in lines()):
            raise RuntimeError("no task start, join or iter line:\n" + "\n".join(lines()[-20:]))
        head_up = joined - after_head[0]
        return {"submit_to_start": started - start, "start_to_head_up": head_up - started,
                "head_up_to_all_joined": after_head[0], "all_joined_to_iter": first - joined,
                "start_to_iter": first - started}
    finally:
        run([*CLI, "sweep", "cancel", str(grid)], env=env, check=False)


def bench_multinode(repeats: int, tmp: Path, env: dict) -> None:
    data = tmp / "tiny_data"
    if not data.exists():
        run([*CLI, "data", "synth", str(data), "--num-train", "16", "--num-val", "4", "--size", "64x64"])
    rows = []
    for i in range(repeats):
        try:
            got = multinode_once(tmp, data, 2000 + i, env)
        except RuntimeError as exc:
            print(f"  multinode #{i + 1}: FAILED: {str(exc)[-1500:]}", flush=True)
            continue
        rows.append(got)
        print(f"  multinode #{i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in got.items()), flush=True)
    for key in rows[0] if rows else ():
        print(f"multinode {key}: {spread([r[key] for r in rows])}", flush=True)


def ray_once(tmp: Path, data: Path, seed: int, ray) -> dict:
    cell = tmp / f"ray_{seed}.yaml"
    cell.write_text(json.dumps({"base": str(REPO / "jobs/quickstart.yaml"), **_nested(tiny_cell(tmp, data, seed))}))
    env = {**os.environ, **ray.env, "RAY_ADDRESS": ray.info["dashboard_url"]}
    runtime_env = run([sys.executable, "-m", "ocr_cluster.runtime_env", "jobs/runtime_env.yaml"], env=env)[1]
    job = f"bench_{os.getpid()}_{seed}"
    start = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "ray"), "job", "submit", "--submission-id", job, "--runtime-env-json",
                             runtime_env.strip(), "--", "python", "-m", "ocr_cluster.train", str(cell)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen: list[str] = []
        started = None
        for line in proc.stdout:
            seen.append(line)
            if started is None and RUN_LINE.search(line):
                started = time.perf_counter()
            if ITER_LINE.search(line):
                now = time.perf_counter()
                return {"submit_to_start": (started or now) - start, "start_to_iter": now - (started or now),
                        "submit_to_iter": now - start}
        raise RuntimeError("ray job ended without an iter line:\n" + "".join(seen[-20:]))
    finally:
        run([str(BIN / "ray"), "job", "stop", job], env=env, check=False)
        proc.terminate()
        proc.wait()


def tune_once(tmp: Path, data: Path, seed: int, ray) -> dict:
    from ray.job_submission import JobSubmissionClient

    grid = write_grid(tmp / f"tune_{seed}.yaml", f"bench_tune_{os.getpid()}_{seed}", str(REPO / "jobs/quickstart.yaml"),
                      tiny_cell(tmp, data, seed))
    env = {**os.environ, **ray.env}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    try:
        out = run([*CLI, "sweep", "launch", str(grid), "--backend", "ray", "--address", ray.info["dashboard_url"]],
                  env=env)[1]
        job = next(line.split()[0] for line in out.splitlines() if line.startswith("  ocr-sweep-"))
        saved = {k: os.environ.get(k) for k in ray.env}
        os.environ.update(ray.env)
        _reload_ray_token()
        try:
            client = JobSubmissionClient(ray.info["dashboard_url"])
            lines = lambda: client.get_job_logs(job).splitlines()  # noqa: E731
            started = wait_for_poll(lines, RUN_LINE, 600)
            first = wait_for_poll(lines, ITER_LINE, 600)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        if started is None or first is None:
            raise RuntimeError("no trial start or iter line:\n" + "\n".join(lines()[-20:]))
        return {"submit_to_start": started - start, "start_to_iter": first - started, "submit_to_iter": first - start}
    finally:
        run([*CLI, "sweep", "cancel", str(grid)], env=env, check=False)


def _reload_ray_token() -> None:
    """Ray caches its auth mode and token per process at first use (as tests/conftest.py refreshes them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def wait_for_poll(lines, pattern: re.Pattern, timeout: float) -> float | None:
    """wait_for at 200 ms: each poll of a job's log is an HTTP request to the dashboard."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if any(pattern.search(line) for line in lines()):
            return time.perf_counter()
        time.sleep(0.2)
    return None


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        section, _, leaf = key.partition(".")
        out.setdefault(section, {})[leaf] = value
    return out


def bench_overhead(repeats: int, tmp: Path, env: dict, stack: list, ways: tuple[str, ...] = ("slurm", "ray")) -> None:
    data = tmp / "tiny_data"
    run([*CLI, "data", "synth", str(data), "--num-train", "16", "--num-val", "4", "--size", "64x64"])
    ray = services.start_ray()
    stack.append(ray)
    print(f"started Ray head at {ray.info['address']}", flush=True)
    results: dict[str, list[dict]] = {way: [] for way in ways}
    once = {"slurm": lambda seed: slurm_once(tmp, data, seed, env), "ray": lambda seed: ray_once(tmp, data, seed, ray),
            "tune": lambda seed: tune_once(tmp, data, seed, ray)}
    for i in range(repeats):
        for way in ways:
            seed = 1000 * ways.index(way) + i + 1
            try:
                got = once[way](seed)
            except RuntimeError as exc:  # a trial that failed is reported, not timed
                print(f"  {way} #{i + 1}: FAILED: {str(exc)[-1500:]}", flush=True)
                continue
            results[way].append(got)
            print(f"  {way} #{i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in got.items()), flush=True)
    for way, rows in results.items():
        for key in rows[0] if rows else ():
            print(f"{way} {key}: {spread([r[key] for r in rows])}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--launch", type=int, metavar="N", default=0)
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--multinode", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ways", default="slurm,ray", help="--overhead: comma-separated slurm, ray, tune")
    args = parser.parse_args()
    if not (args.plan or args.launch or args.overhead or args.multinode):
        parser.error("choose at least one of --plan, --launch N, --overhead, --multinode")
    os.environ.update(services.RAY_ENV)
    stack: list = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    machine()
    try:
        if args.plan:
            bench_plan(args.repeats, tmp)
        ways = tuple(args.ways.split(","))
        if args.launch or args.overhead or args.multinode:
            env = slurm_env(stack) if args.launch or args.multinode or "slurm" in ways else dict(os.environ)
            if args.launch:
                bench_launch(args.launch, tmp, env)
            if args.overhead:
                bench_overhead(args.repeats, tmp, env, stack, ways)
            if args.multinode:
                bench_multinode(args.repeats, tmp, env)
        machine()
    finally:
        for service in reversed(stack):
            service.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
