"""`ocr-cluster sweep launch | status | cancel GRID`: the SLURM side of a sweep.

    sweep launch GRID [--dry-run] [--wait] [--folder DIR]   submit the missing cells as one job array
    sweep status GRID [--watch [S]] [--json]                one line per cell; exit 0 only when all completed
                                                            (or stopped early, while the grid's early stopping
                                                            keeps them so)
    sweep cancel GRID                                       scancel the sweep's live jobs

With --backend ray (or `backend: {default: ray}` in the grid) launch submits one Ray job running Ray Tune
instead (ocr_cluster.sweep.ray_backend), with --backend slurm-ray one SLURM job hosting a Ray cluster that
runs Ray Tune (ocr_cluster.sweep.allocation); status and cancel follow each cell's launch record, any kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

# Imported by the parser for every `sweep` action: the SLURM, store and status modules (pyarrow) load
# only when an action runs.
if TYPE_CHECKING:  # pragma: no cover
    from ocr_cluster.sweep.status import CellStatus

COMPLETED, LIVE = "completed", ("running", "pending", "requeued")  # ocr_cluster.sweep.status's names

STATE_STYLES = {"completed": "green", "failed": "red", "lost": "red", "running": "cyan", "requeued": "yellow",
                "pending": "blue", "cancelled": "magenta", "stopped": "dark_orange"}


def add_arguments(action: str, parser: argparse.ArgumentParser) -> None:
    if action == "launch":
        parser.add_argument("--backend", choices=("slurm", "ray", "slurm-ray"), default=None,
                            help="where the cells run: slurm (a job per cell), ray (Ray Tune on a Ray cluster) or "
                                 "slurm-ray (Ray Tune inside one SLURM allocation); default: the grid's "
                                 "backend.default, else slurm")
        parser.add_argument("--address", metavar="URL", default=None,
                            help="--backend ray: the Ray cluster's dashboard, e.g. http://head:8265 (default: "
                                 "backend.ray.address, else RAY_ADDRESS)")
        parser.add_argument("--with-secrets", action="store_true",
                            help="--backend ray: pass this shell's object-store credentials in the job's runtime env "
                                 "(plain text in Ray's logs and job API; by default the nodes use their own)")
        parser.add_argument("--rerun-stopped", action="store_true",
                            help="also submit the cells the early stopping stopped (they continue from their last "
                                 "checkpoint); without it they stay stopped while backend.ray.early_stopping is on")
        parser.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
        parser.add_argument("--wait", action="store_true",
                            help="after submitting, follow the sweep until no cell is queued or running")
        parser.add_argument("--folder", metavar="DIR", default=None,
                            help="submitit folders go to DIR/<sweep>/launch-<time>/ (default ./sweeps_runs); "
                                 "must be on a filesystem the nodes share")
        parser.add_argument("--interval", type=float, default=10.0, metavar="S", help="refresh of --wait (s)")
        parser.set_defaults(func=cmd_launch)
    elif action == "status":
        parser.add_argument("--watch", nargs="?", const=10.0, type=float, default=None, metavar="S",
                            help="refresh every S seconds (default 10) until no cell is queued or running")
        parser.add_argument("--json", action="store_true", help="one JSON object per cell, one per line")
        parser.set_defaults(func=cmd_status)
    else:
        parser.set_defaults(func=cmd_cancel)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 240, soft_wrap=False)


def _table(title: str, statuses: list[CellStatus]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for name in ("#", "cell", "run id", "state", "job", "detail"):
        table.add_column(name, overflow="fold")
    for i, s in enumerate(statuses, 1):
        style = STATE_STYLES.get(s.state, "")
        table.add_row(str(i), s.cell.name, s.cell.run_id, f"[{style}]{s.state}[/]" if style else s.state,
                      s.job_id or "-", escape(s.detail))
    return table


def _summary(statuses: list[CellStatus]) -> str:
    from ocr_cluster.sweep.status import counts

    return f"{len(statuses)} cells: " + ", ".join(f"{n} {state}" for state, n in sorted(counts(statuses).items()))


def all_ended(grid, statuses: list[CellStatus]) -> bool:
    """The exit status of status / launch --wait: every cell completed, or stopped early and kept so."""
    from ocr_cluster.sweep.status import ended, keeps_stopped

    keep = keeps_stopped(grid)
    return all(ended(s, keep) for s in statuses)


def _warn(notes: list[str]) -> None:
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)


def live_states(grid, store: str | None) -> dict[str, str] | None:
    """run id -> pending / running / requeued for `sweep plan`; None when SLURM or the records cannot tell."""
    from ocr_cluster.sweep import slurm
    from ocr_cluster.sweep.status import cell_states, live_map

    if not slurm.available():
        return None
    try:
        from ocr_cluster.sweep.launch import prepare

        statuses, _ = cell_states(prepare(grid, store), grid.name)
    except Exception:  # noqa: BLE001 - plan works offline; the live states are a bonus
        return None
    return live_map(statuses)


def follow(grid, cells, interval: float, only: set[str] | None = None) -> list[CellStatus]:
    """Refresh a live table until none of the cells (or of `only`) is queued or running."""
    from rich.live import Live

    from ocr_cluster.sweep.status import cell_states

    console = _console()
    statuses, notes = cell_states(cells, grid.name)
    _warn(notes)
    with Live(console=console, refresh_per_second=1, transient=False) as live:
        while True:
            shown = [s for s in statuses if only is None or s.cell.run_id in only]
            live.update(_table(f"sweep {grid.name}: {_summary(shown)}", shown))
            if not any(s.state in LIVE for s in shown):
                return statuses
            time.sleep(interval)
            statuses, _ = cell_states(cells, grid.name)


def cmd_launch(args: argparse.Namespace) -> int:
    from ocr_cluster.sweep import slurm
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import parameters, plan_launch, prepare, shape_of, submit

    grid = load(args.grid)
    backend = args.backend or grid.backend.default
    if backend == "ray":
        from ocr_cluster.sweep import ray_backend

        return ray_backend.cmd_launch(args, grid)
    if backend == "slurm-ray":
        from ocr_cluster.sweep import allocation

        return allocation.cmd_launch(args, grid)
    if args.dry_run:
        try:
            launch = plan_launch(grid, args.store, check=True, rerun_stopped=args.rerun_stopped)
        except slurm.SlurmError as exc:
            print(f"warning: {exc}; showing the store's view only", file=sys.stderr)
            launch = plan_launch(grid, args.store, check=False, rerun_stopped=args.rerun_stopped)
    else:
        launch = plan_launch(grid, args.store, rerun_stopped=args.rerun_stopped)
    _warn(launch.notes)
    done = sum(s.state == COMPLETED for s in launch.statuses)
    live = sum(s.state in LIVE for s in launch.statuses)
    if not launch.todo:
        print(f"sweep {grid.name}: nothing to submit ({launch.counts()}, {len(launch.statuses)} cells)")
        return 0
    if args.dry_run:
        shapes: dict = {}
        for s in launch.todo:
            shape = shape_of(s.cell, grid)
            shapes[shape] = shapes.get(shape, 0) + 1
        sbatch = "; ".join(json.dumps(parameters(grid, shape, count)) for shape, count in shapes.items())
        print(f"sweep {grid.name}: would submit {len(launch.todo)} of {len(launch.statuses)} cells as a SLURM job "
              f"array ({done} completed, {live} queued or running); sbatch parameters: {sbatch}")
        for s in launch.todo:
            print(f"  {s.cell.name}  {s.cell.run_id}  ({s.state}{': ' + s.detail if s.detail else ''})")
        return 0
    submit(grid, launch, args.folder)
    print(f"sweep {grid.name}: submitted {len(launch.todo)} of {len(launch.statuses)} cells as SLURM job array "
          f"{', '.join(launch.arrays)} ({done} completed, {live} already queued or running)")
    for s in launch.todo:
        print(f"  {launch.jobs[s.cell.run_id]}  {s.cell.name}  {s.cell.run_id}")
    print(f"launch record: {', '.join(launch.record_uris)}")
    print(f"submitit folder: {launch.folder}")
    print(f"follow it with: ocr-cluster sweep status {args.grid}" + (f" --store {args.store}" if args.store else ""))
    if not args.wait:
        return 0
    statuses = follow(grid, prepare(grid, args.store), args.interval, only=set(launch.jobs))
    return 0 if all_ended(grid, statuses) else 1


def cmd_status(args: argparse.Namespace) -> int:
    from ocr_cluster.sweep import slurm
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import prepare
    from ocr_cluster.sweep.status import cell_states

    grid = load(args.grid)
    resolving: list[str] = []
    cells = prepare(grid, args.store, resolving)
    _warn(resolving)
    if args.watch is not None and not args.json:
        statuses = follow(grid, cells, args.watch)
    else:
        statuses, notes = cell_states(cells, grid.name, ask_slurm=slurm.available(), ask_ray=True)
        _warn(notes)
        if args.json:
            for s in statuses:
                print(json.dumps(s.to_json(), default=str))
        else:
            console = _console()
            console.print(_table(f"sweep {grid.name} ({grid.label})", statuses))
            console.print(_summary(statuses), highlight=False)
    return 0 if all_ended(grid, statuses) else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from ocr_cluster.sweep import records, slurm
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import prepare
    from ocr_cluster.sweep.ray_backend import ray_jobs_of
    from ocr_cluster.sweep.ray_backend import stop as stop_ray
    from ocr_cluster.sweep.status import cell_states

    grid = load(args.grid)
    notes: list[str] = []
    cells = prepare(grid, args.store, notes)
    ray_jobs = ray_jobs_of(cells, grid.name)
    if not ray_jobs:  # a sweep launched on a Ray cluster needs no SLURM to be cancelled
        slurm.check_cluster()
    statuses, more = cell_states(cells, grid.name)
    _warn(notes + more)
    live = [s for s in statuses if s.state in LIVE and s.job_id]
    if not live:
        print(f"sweep {grid.name}: no queued or running job to cancel")
        return 0
    live_ray = {s.job_id: ray_jobs[s.job_id] for s in live if s.job_id in ray_jobs}
    live = [s for s in live if s.job_id not in ray_jobs]
    cancelled = slurm.scancel([s.job_id for s in live]) if live else []
    cancelled += stop_ray(live_ray)
    live += [s for s in statuses if s.job_id in live_ray and s.state in LIVE]
    for store_uri in dict.fromkeys(s.cell.config.results.store_uri for s in live):
        records.write_record(store_uri, grid.name, "cancel", {"job_ids": cancelled})
    print(f"sweep {grid.name}: cancelled {len(cancelled)} job(s): {' '.join(cancelled)}")
    missed = list(dict.fromkeys(s.job_id for s in live if s.job_id not in cancelled))
    if missed:
        print(f"scancel or the Ray job API refused: {' '.join(missed)}", file=sys.stderr)
        return 1
    return 0
