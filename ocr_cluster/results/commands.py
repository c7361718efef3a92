"""`ocr-cluster results ...`: table, show, plot, reconcile, compact.

Each cmd_* takes the parsed argparse Namespace and returns an exit code; `add_arguments(action,
parser)` adds that action's arguments and handler, HELP holds each action's help. Bad input raises
ResultsError (a ValueError) or StorageError, with a one-line message, as does a store that does not
exist or cannot be reached (exit 2; an existing store with no matching runs is a warning). Unreadable
files in the store are reported as one warning line each on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ocr_cluster.errors import unknown_choice
from ocr_cluster.results import names, tables
from ocr_cluster.results.errors import ResultsError
from ocr_cluster.results.reconcile import reconcile
from ocr_cluster.results.store import READ_SCHEMA, compact, latest, read_attempts, read_runs, require_store

SUMMARY_SKIP = ("config_yaml", "iou_per_class", "error")  # shown in their own sections by `show`


def _warn_line(message: warnings.WarningMessage) -> None:
    print(f"warning: {message.message}", file=sys.stderr)


def _quietly(fn, *args, **kwargs):
    """Call fn, turning the store's warnings into one stderr line each (no Python warning banner)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    for message in caught:
        _warn_line(message)
    return result


def _typed(column: str, text: str) -> Any:
    kind = READ_SCHEMA.field(column).type
    try:
        if pa.types.is_integer(kind):
            return int(text)
        if pa.types.is_floating(kind):
            return float(text)
    except ValueError:
        raise ResultsError(f"--where {column}: expected a number, got {text!r}") from None
    return text


def parse_where(items: list[str] | None) -> dict[str, Any]:
    """['iters=40000', 'backbone=hrnetv2_w18,hrnetv2_w48'] -> {'iters': 40000, 'backbone': [...]}."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in READ_SCHEMA.names:
            raise ResultsError(f"bad --where {item!r}; expected COLUMN=VALUE[,VALUE...] with a column of: "
                               f"{', '.join(READ_SCHEMA.names)}")
        values = [_typed(key, v) for v in value.split(",")]
        out[key] = values if len(values) > 1 else values[0]
    return out


def _fields(text: str, what: str) -> list[str]:
    fields = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fields if f not in READ_SCHEMA.names]
    if bad or not fields:
        raise ResultsError(f"{what}: unknown field(s) {', '.join(bad) or repr(text)}; "
                           f"fields: {', '.join(READ_SCHEMA.names)}")
    return fields


def _runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    filters = parse_where(getattr(args, "where", None))
    if not getattr(args, "include_failed", True):
        filters.setdefault("status", "completed")
    table = _quietly(read_runs, args.store, dataset=args.dataset, sweep=args.sweep, **filters)
    return table.drop_columns(["config_yaml", "iou_per_class"]).to_pylist()


# ---------------------------------------------------------------------------------------------
# handlers


def cmd_table(args: argparse.Namespace) -> int:
    require_store(args.store)
    if args.format not in tables.FORMATS:
        raise ResultsError(f"unknown format {args.format!r}; choose one of {', '.join(tables.FORMATS)}")
    runs = _runs(args)
    by_axes = None
    if args.sweep and not args.cols and not args.compare_published:
        cell_axes = _cell_axes(args)  # the store is keyed by run id: a cell may have run in another sweep
        everywhere = _runs(argparse.Namespace(**{**vars(args), "sweep": None})) if cell_axes else []
        by_axes = tables.sweep_pivot(everywhere, cell_axes, args.metric, args.agg)
    if by_axes is not None:
        out = [by_axes]
    elif args.cols:
        if args.compare_published:
            raise ResultsError("--compare-published needs the seeds' layout; leave out --cols")
        metric = _fields(args.metric, "--metric")[0]
        out = [tables.pivot(runs, _fields(args.rows, "--rows"), _fields(args.cols, "--cols")[0], metric, args.agg)]
    else:
        out = tables.seeds_tables(runs, compare_published=args.compare_published)
    if not runs:
        print(f"warning: no runs in {args.store} match", file=sys.stderr)
    print(tables.render(out, args.format), end="")
    return 0


def _cell_axes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """run id -> the cell's axis values, from --grid or else the sweep's manifest ({} when neither has them)."""
    if getattr(args, "grid", None):
        from ocr_cluster.sweep.grid import load, resolve  # the grid format belongs to the sweep package

        cells = load(args.grid).cells()
        resolved, notes = resolve(cells)  # rows carry the ids with the datasets' fingerprints
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        # Ids from before the fingerprint was part of them (and unreadable datasets') match too.
        return {**{c.run_id: c.axes for c in cells}, **{c.run_id: c.axes for c in resolved}}

    from ocr_cluster import storage
    from ocr_cluster.results.store import sweep_manifest_uri

    uri = sweep_manifest_uri(args.store, args.sweep)
    try:
        rows = storage.parquet_table(storage.read_bytes(uri)).to_pylist()
    except Exception:  # noqa: BLE001 - no manifest (a sweep not launched by `sweep launch`): seeds' layout
        return {}
    return {r["run_id"]: json.loads(r["axes"]) for r in rows if r.get("axes")}


def _show_text(row: dict[str, Any], attempts: list[dict[str, Any]]) -> str:
    lines = [f"# {row['run_id']}: {names.method(row['head'])} {names.backbone(row['backbone'])} "
             f"{row['dataset']} {row['crop_size']} {row['iters']} iters ({row['status']})", ""]
    width = max(len(k) for k in row)
    lines += [f"{k.ljust(width)}  {v}" for k, v in row.items() if k not in SUMMARY_SKIP and v not in (None, "")]
    if row.get("error"):
        lines += ["", "## Error", "", row["error"].rstrip()]
    if row.get("iou_per_class"):
        columns = [tables.Column("name", "Class"), tables.Column("iou", "IoU", tables.decimals(2), True)]
        per_class = tables.Table(columns, row["iou_per_class"], ["name", "iou"])
        lines += ["", "## Per-class IoU", "", tables.render([per_class]).rstrip()]
    lines += ["", f"## Attempts ({len(attempts)})", ""]
    attempt_table = tables.Table([tables.Column(k, k) for k in ("attempt", "status", "written_at", "file")],
                                 attempts, [])
    lines += [tables.render([attempt_table]).rstrip()]
    if row.get("config_yaml"):
        lines += ["", "## Config", "", "```yaml", row["config_yaml"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def cmd_show(args: argparse.Namespace) -> int:
    require_store(args.store)
    attempts = _quietly(read_attempts, args.store)
    ids = sorted({r for r in attempts["run_id"].to_pylist() if r.startswith(args.run_id)})
    if not ids:
        raise ResultsError(f"no run {args.run_id!r} in {args.store}")
    if len(ids) > 1:
        raise ResultsError(f"run id prefix {args.run_id!r} is ambiguous: {', '.join(ids[:10])}")
    these = attempts.filter(pc.equal(attempts["run_id"], ids[0]))
    row = latest(these).to_pylist()[0]  # the attempt the tables show
    history = these.sort_by([("written_at", "ascending")]).select(["attempt", "status", "written_at",
                                                                   "file"]).to_pylist()
    if args.format == "json":
        print(json.dumps({"run": row, "attempts": history}, indent=2, default=str))
    else:
        print(_show_text(row, history), end="")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        from ocr_cluster.results.plots import plot
    except ImportError as exc:  # matplotlib is only needed here
        raise ResultsError(f"results plot needs matplotlib ({exc}): pip install matplotlib") from None
    x = _fields(args.x, "--x")[0]
    y = _fields(args.y, "--y")[0]
    by = _fields(args.by, "--by")[0] if args.by else None
    args.include_failed = False
    require_store(args.store)
    path = plot(_runs(args), x, y, by, args.out)
    print(f"wrote {path}")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    require_store(args.store)
    report = _quietly(reconcile, args.store, args.sweep, args.manifest)
    if args.format == "json":
        print(json.dumps({**report.__dict__, "complete": report.complete}, indent=2, default=str))
        return 0 if report.complete else 1
    print(f"sweep {report.sweep}: {len(report.completed)}/{report.expected} completed, {len(report.missing)} "
          f"missing, {len(report.failed)} failed, "
          + (f"{len(report.stopped)} stopped early, " if report.stopped else "")
          + f"{len(report.duplicated)} duplicated, {len(report.unexpected)} not in the manifest")
    for run_id in report.missing:
        print(f"missing     {run_id}")
    for row in report.failed:
        error = (row.get("error") or "").strip().splitlines()
        print(f"failed      {row['run_id']}  attempt {row['attempt']}: {error[-1] if error else 'no error recorded'}")
    for row in report.stopped:
        miou = f", eval mIoU {row['miou']:.2f}" if row.get("miou") is not None else ""
        print(f"stopped     {row['run_id']}  attempt {row['attempt']}: at iter {row.get('iters_done')}/"
              f"{row.get('iters')}{miou}")
    for dup in report.duplicated:
        print(f"duplicated  {dup['run_id']}  {dup['completed_attempts']} completed attempts")
    for run_id in report.unexpected:
        print(f"unexpected  {run_id}")
    return 0 if report.complete else 1


def cmd_compact(args: argparse.Namespace) -> int:
    require_store(args.store)  # and never create one at a typo'd URI
    uri = _quietly(compact, args.store)
    print(f"wrote {uri}" if uri else "could not write the index (see the warning above)")
    return 0 if uri else 1


HANDLERS = {"table": cmd_table, "show": cmd_show, "plot": cmd_plot, "reconcile": cmd_reconcile,
            "compact": cmd_compact}
HELP = {
    "table": "tables in the seeds' format (one row per run), or a pivot with --cols",
    "show": "one run in full: every field, per-class IoU, attempts and config",
    "plot": "plot a metric against a field, one line per group",
    "reconcile": "missing / failed / stopped / duplicated cells of a sweep (exit 1 while any is missing or failed)",
    "compact": "write a fresh read index of the store (speeds up later queries)",
}


# ---------------------------------------------------------------------------------------------
# arguments


def _store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="URI", help="results store root (path, file://, s3://, gs://)")


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", metavar="D", help="only this dataset")
    p.add_argument("--sweep", metavar="S", help="only this sweep ('' = single jobs)")
    p.add_argument("--where", action="append", metavar="COL=V[,V]", help="filter on a column (repeatable)")


def add_arguments(action: str, p: argparse.ArgumentParser) -> None:
    """Add the arguments of `ocr-cluster results <action>` and its handler to `p`."""
    if action == "table":
        _store(p)
        _selection(p)
        p.add_argument("--rows", default="backbone,head", metavar="F[,F]", help="pivot rows (with --cols)")
        p.add_argument("--cols", metavar="F", help="pivot on this field's values (e.g. iters)")
        p.add_argument("--metric", default="miou", metavar="M", help="pivot cell value (default miou)")
        p.add_argument("--agg", default="mean", choices=sorted(tables.AGGREGATES), help="pivot cell aggregate")
        p.add_argument("--format", default="md", choices=tables.FORMATS, help="output format (default md)")
        p.add_argument("--compare-published", action="store_true",
                       help="add the published number and our delta where a seed table reports the setting")
        p.add_argument("--include-failed", action="store_true", help="also list runs that never completed")
        p.add_argument("--grid", metavar="FILE", help="with --sweep: lay the table out by this grid's axes "
                       "(default: the axes `sweep launch` recorded in the sweep's manifest)")
    elif action == "show":
        p.add_argument("run_id", help="run id (a unique prefix is enough)")
        _store(p)
        p.add_argument("--format", default="text", choices=("text", "json"))
    elif action == "plot":
        _store(p)
        _selection(p)
        p.add_argument("--x", default="iters", metavar="F", help="x field (default iters)")
        p.add_argument("--y", default="miou", metavar="M", help="y metric (default miou)")
        p.add_argument("--by", metavar="F", help="one line per value of this field (e.g. backbone)")
        p.add_argument("--out", required=True, metavar="FILE", help="image file (.png, .svg, .pdf)")
    elif action == "reconcile":
        _store(p)
        p.add_argument("--sweep", required=True, metavar="S", help="sweep name")
        p.add_argument("--manifest", metavar="FILE",
                       help="expected run ids (.parquet/.csv with run_id, .json/.yaml list, or one per line); "
                            "default: the sweep's manifest in the store")
        p.add_argument("--format", default="text", choices=("text", "json"))
    elif action == "compact":
        _store(p)
    else:
        raise unknown_choice("results action", action, HELP)
    p.set_defaults(func=HANDLERS[action])
