"""Handlers of `ocr-cluster sweep plan | launch | status | cancel` (wired by ocr_cluster/cli.py).

`plan` expands and validates a grid and prints its cells, their run ids resolved for their datasets
(read from the manifests; --no-store is fully offline and shows unresolved ids); `launch` submits the
missing cells to SLURM as a job array (ocr_cluster.sweep.launch), `status` shows each cell's state
(ocr_cluster.sweep.status) and `cancel` stops the sweep's live jobs. A bad grid, or SLURM that cannot
be used, is one line and exit 2 (SweepError is a ConfigError).
"""

from __future__ import annotations

import argparse
import json
import sys

from ocr_cluster.errors import unknown_choice

HELP = {
    "plan": "list the cells of a grid: name, run id, what the results store holds, estimated GPU-hours",
    "launch": "submit every missing cell of a grid",
    "status": "show the state of each cell",
    "cancel": "cancel a sweep's queued and running cells",
}


def add_arguments(action: str, parser: argparse.ArgumentParser) -> None:
    """The arguments and handler of `ocr-cluster sweep ACTION`."""
    if action not in HELP:
        raise unknown_choice("sweep action", action, HELP)
    parser.add_argument("grid", help="sweeps/<grid>.yaml")
    parser.add_argument("--store", metavar="URI", default=None,
                        help="results store of every cell (default: each cell's results.store_uri)")
    if action != "plan":
        from ocr_cluster.sweep import slurm_commands

        slurm_commands.add_arguments(action, parser)
        return
    parser.add_argument("--no-store", action="store_true",
                        help="read no results store and no dataset (fully offline; states and store-based estimates "
                             "show '?', run ids leave out the datasets' fingerprints)")
    parser.add_argument("--device", metavar="NAME", default=None,
                        help="estimate GPU cells from runs on this device (part of its name, e.g. H100)")
    parser.add_argument("--json", action="store_true", help="one JSON object per cell, one per line")
    parser.set_defaults(func=cmd_plan)


def _hours(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _state(row) -> str:
    from ocr_cluster.sweep.plan import COMPLETED, STOPPED, UNREAD

    if row.state in (COMPLETED, STOPPED):
        return f"{row.state} {row.miou:.2f}" if row.miou is not None else row.state
    if row.state == UNREAD:
        return "?"
    return row.state or "-"


def _footer(total: dict) -> str:
    text = (f"{total['cells']} cells: {total['completed']} completed, {total['failed']} failed, "
            + (f"{total['stopped']} stopped early, " if total["stopped"] else "")
            + f"{total['not_in_store']} not in the store")
    if total["unread"]:
        text += f", {total['unread']} unknown (store not read)"
    if total["without_estimate"] == total["cells"]:
        return text + "; no estimate: no measured run matches any cell ('?')"
    text += (f"; estimated {_hours(total['est_gpu_hours'])} GPU-h ({_hours(total['est_hours'])} h of training) "
             f"for all, {_hours(total['est_gpu_hours_todo'])} GPU-h for the {total['todo']} not completed")
    if total["without_estimate"]:
        text += f"; {total['without_estimate']} cells have no estimate ('?'), so these totals are lower bounds"
    return text


def cmd_plan(args: argparse.Namespace) -> int:
    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.plan import plan, summary

    grid = load(args.grid)
    cells = grid.cells()  # every cell validated before any store is read
    live, resolving = None, []
    if args.no_store:
        print("note: --no-store reads no dataset manifest either: the run ids shown leave out the datasets' "
              "fingerprints, so they differ from the ids the driver uses", file=sys.stderr)
    else:
        from ocr_cluster.sweep.grid import resolve
        from ocr_cluster.sweep.slurm_commands import live_states

        cells, resolving = resolve(cells)
        live = live_states(grid, args.store)
    rows, notes = plan(cells, store=args.store, read=not args.no_store, device=args.device, live=live)
    for note in resolving + notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        for row in rows:
            print(json.dumps(row.to_json()))
        return 0

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"sweep {grid.name}: {len(rows)} cells ({grid.label})")
    for name, justify in (("#", "right"), ("cell", "left"), ("run id", "left"), ("store", "left"),
                          ("hours", "right"), ("GPU-h", "right"), ("estimate from", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for i, row in enumerate(rows, 1):
        est = row.estimate
        table.add_row(str(i), row.cell.name, row.cell.run_id, _state(row), _hours(est.hours),
                      _hours(est.gpu_hours), escape(est.source or est.note or "-"))
    console = Console(width=None if sys.stdout.isatty() else 240, soft_wrap=False)
    console.print(table)
    console.print(escape(_footer(summary(rows))), highlight=False)
    return 0
