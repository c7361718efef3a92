"""Tables of runs: the seeds' layout (mmseg's README tables), pivots, and published numbers beside ours.

A Table holds raw values; `render` formats them. Markdown prints what the seeds print (display names,
2-decimal metrics, '-' for a blank); CSV and JSON keep raw values under machine keys.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from ocr_cluster.models.names import BACKBONES, HEADS
from ocr_cluster.results import names, published
from ocr_cluster.results.errors import ResultsError

FORMATS = ("md", "csv", "json")
AGGREGATES = {"mean": statistics.fmean, "max": max, "min": min}


class TableError(ResultsError):
    """Bad table arguments; the message is one line for the user."""


def decimals(digits: int) -> Callable[[Any], str]:
    return lambda v: f"{v:.{digits}f}"


def _signed(v: float) -> str:
    return f"{v:+.2f}"


def _published(v: list[float]) -> str:
    mean = sum(v) / len(v)
    return f"{mean:.2f}" if len(v) == 1 else f"{mean:.2f} (mean of {len(v)})"


@dataclass
class Column:
    key: str                                 # key in each row dict (raw value)
    header: str                              # markdown header
    fmt: Callable[[Any], str] = str          # markdown cell from a non-null raw value
    right: bool = False                      # right-align in markdown (numbers)


# The seeds' columns, in the seeds' order: | Method | Backbone | Crop Size | Lr schd | Mem (GB) |
# Inf time (fps) | mIoU | mIoU(ms+flip) |. mmseg right-aligns Lr schd and the mIoU columns.
SEED_COLUMNS = [
    Column("method", "Method"),
    Column("backbone", "Backbone", names.backbone),
    Column("crop_size", "Crop Size"),
    Column("iters", "Lr schd", str, True),
    Column("mem_gb", "Mem (GB)", decimals(1)),
    Column("fps", "Inf time (fps)", decimals(2)),
    Column("miou", "mIoU", decimals(2), True),
    Column("miou_msflip", "mIoU(ms+flip)", decimals(2), True),
]
# The seeds' ResNet tables add it after Crop Size; we do when a table's batch sizes differ.
BATCH_COLUMN = Column("batch_size", "Batch Size", str, True)
# After Lr schd, when two rows of one cell would otherwise read alike: the seed where they differ in it,
# the run id where they do not (another setting, a sweep).
CELL_KEYS = ("head", "backbone", "crop_size", "batch_size", "iters")
SEED_COLUMN = Column("seed", "Seed", str, True)
RUN_COLUMN = Column("run_id", "Run")
PUBLISHED_COLUMNS = [
    Column("published_miou", "Published mIoU", _published, True),
    Column("delta_miou", "Δ mIoU", _signed, True),
    Column("published_miou_msflip", "Published mIoU(ms+flip)", _published, True),
    Column("delta_miou_msflip", "Δ mIoU(ms+flip)", _signed, True),
    Column("published_source", "Source"),
]
# What CSV and JSON carry for each run (raw values).
MACHINE_KEYS = ["run_id", "dataset", "sweep", "method", "backbone", "head", "crop_size", "batch_size", "iters",
                "seed", "mem_gb", "fps", "miou", "miou_msflip", "aacc", "macc", "num_gpus", "device", "status"]
PUBLISHED_KEYS = ["published_miou", "delta_miou", "published_miou_msflip", "delta_miou_msflip",
                  "published_source", "published_reference"]
# Seed header names for fields used in pivots.
HEADERS = {c.key: c.header for c in SEED_COLUMNS + [BATCH_COLUMN]} | {"head": "Method", "dataset": "Dataset"}


@dataclass
class Table:
    columns: list[Column]          # markdown layout
    rows: list[dict[str, Any]]     # raw values
    keys: list[str]                # CSV / JSON columns
    title: str | None = None       # markdown heading (the dataset)
    notes: list[str] = field(default_factory=list)


def _order(key: str, value: Any) -> tuple:
    """Sort key: backbones and heads in the model zoo's order, numbers numerically, None last."""
    known = {"backbone": BACKBONES, "head": HEADS}.get(key)
    if value is None:
        return (2, 0, "")
    if known and value in known:
        return (0, known.index(value), "")
    return (1, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def _delta(ours: float | None, theirs: list[float]) -> float | None:
    if ours is None or not theirs:
        return None
    return round(ours - sum(theirs) / len(theirs), 4)  # no float noise (0.29000000000000625) in CSV / JSON


def _add_published(row: dict[str, Any]) -> dict[str, Any]:
    pub = published.find(row)
    if pub is None:
        return row
    return row | {
        "published_miou": pub["miou"] or None,
        "delta_miou": _delta(row.get("miou"), pub["miou"]),
        "published_miou_msflip": pub["miou_msflip"] or None,
        "delta_miou_msflip": _delta(row.get("miou_msflip"), pub["miou_msflip"]),
        "published_source": pub["source"],
        "published_reference": pub["reference"],
    }


def _repeat_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """Seed and/or Run columns for the cells with more than one row (none when every cell has one)."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(tuple(row.get(k) for k in CELL_KEYS), []).append(row)
    repeated = [cell for cell in cells.values() if len(cell) > 1]
    out = []
    if any(len({r.get("seed") for r in cell}) > 1 for cell in repeated):
        out.append(SEED_COLUMN)
    if any(len({r.get("seed") for r in cell}) < len(cell) for cell in repeated):
        out.append(RUN_COLUMN)
    return out


def seeds_tables(runs: list[dict[str, Any]], compare_published: bool = False) -> list[Table]:
    """One table per dataset in the seeds' layout, one row per run."""
    tables = []
    for dataset in sorted({r["dataset"] for r in runs}, key=str):
        rows = [r | {"method": r.get("method") or names.method(r.get("head"))}
                for r in runs if r["dataset"] == dataset]
        rows.sort(key=lambda r: [_order(k, r.get(k)) for k in ("head", "iters", "backbone", "crop_size",
                                                                   "batch_size", "seed", "run_id")])
        columns = list(SEED_COLUMNS)
        columns[4:4] = _repeat_columns(rows)
        if len({r.get("batch_size") for r in rows}) > 1:
            columns.insert(3, BATCH_COLUMN)
        keys = list(MACHINE_KEYS)
        notes = []
        if compare_published:
            rows = [_add_published(r) for r in rows]
            columns += PUBLISHED_COLUMNS
            keys += PUBLISHED_KEYS
            used = sorted({(r["published_source"], r["published_reference"]) for r in rows
                           if r.get("published_source")})
            notes = [f"Source {s}: {ref}" for s, ref in used] or ["No published number matches these runs."]
        tables.append(Table(columns, rows, keys, names.dataset(dataset), notes))
    return tables


def pivot(runs: list[dict[str, Any]], rows: list[str], cols: str, metric: str = "miou",
          agg: str = "mean", order: dict[str, list] | None = None) -> Table:
    """`metric` by `rows` (one or more fields) down and the values of `cols` across; cells aggregate
    the runs that share them (n shown in markdown when more than one). `order` fixes the order of some
    fields' values (e.g. a grid's), others sort as `_order` does."""
    def rank(key: str, value: Any) -> tuple:
        known = (order or {}).get(key)
        return (-1, known.index(value), "") if known and value in known else _order(key, value)

    if agg not in AGGREGATES:
        raise TableError(f"unknown aggregate {agg!r}; choose one of {', '.join(AGGREGATES)}")
    cells: dict[tuple, dict[Any, list[float]]] = {}
    for run in runs:
        if run.get(metric) is None:
            continue
        cells.setdefault(tuple(run.get(k) for k in rows), {}).setdefault(run.get(cols), []).append(run[metric])
    col_values = sorted({c for per_row in cells.values() for c in per_row}, key=lambda v: rank(cols, v))
    out_rows = []
    for key in sorted(cells, key=lambda t: [rank(k, v) for k, v in zip(rows, t)]):
        row: dict[str, Any] = dict(zip(rows, key))
        for value in col_values:
            got = cells[key].get(value)
            row[str(value)] = (AGGREGATES[agg](got), len(got)) if got else None
        out_rows.append(row)

    def cell(v: tuple[float, int]) -> str:
        return f"{v[0]:.2f}" if v[1] == 1 else f"{v[0]:.2f} (n={v[1]})"

    columns = [Column(k, HEADERS.get(k, k), names.DISPLAY.get(k, str)) for k in rows]
    columns += [Column(str(v), str(v), cell, True) for v in col_values]
    title = f"{HEADERS.get(metric, metric)} by {', '.join(rows)} and {cols} ({agg})"
    return Table(columns, out_rows, [c.key for c in columns], title)


def sweep_pivot(runs: list[dict[str, Any]], cell_axes: dict[str, dict[str, Any]], metric: str = "miou",
                agg: str = "mean") -> Table | None:
    """A sweep laid out by its grid's axes: rows = every axis but the last, columns = the last axis.

    `cell_axes` maps run id -> {axis: value or variant name}, in the grid's axis order (from the sweep's
    manifest or its grid file). None when no run of `runs` is a cell or the grid has no axes."""
    axes = list(next(iter(cell_axes.values()), {}))
    placed = [{**run, **cell_axes[run["run_id"]]} for run in runs if run["run_id"] in cell_axes]
    if not axes or not placed:
        return None
    rows = axes[:-1] or ["dataset"]
    order = {axis: list(dict.fromkeys(values[axis] for values in cell_axes.values() if axis in values))
             for axis in axes}  # the grid's order, not the alphabet's
    table = pivot(placed, rows, axes[-1], metric, agg, order)
    table.title = f"{HEADERS.get(metric, metric)} by {', '.join(axes[:-1]) or 'dataset'} and {axes[-1]} ({agg})"
    return table


# ---------------------------------------------------------------------------------------------
# Rendering


def _markdown(table: Table) -> str:
    cells = [[c.header for c in table.columns]]
    for row in table.rows:
        cells.append(["-" if row.get(c.key) is None else c.fmt(row[c.key]) for c in table.columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(table.columns))]

    def line(values: list[str], right: list[bool]) -> str:
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if c.right else "-" * (w + 2)
                          for c, w in zip(table.columns, widths)) + "|"
    out = [line(cells[0], [False] * len(widths)), rule]
    out += [line(values, [c.right for c in table.columns]) for values in cells[1:]]
    text = "\n".join(out) + "\n"
    if table.notes:
        text += "\n" + "\n".join(f"- {n}" for n in table.notes) + "\n"
    return text


def _machine(table: Table) -> list[dict[str, Any]]:
    out = []
    for row in table.rows:
        rec = {}
        for key in table.keys:
            value = row.get(key)
            if isinstance(value, tuple):  # pivot cell: (value, n)
                value = value[0]
            rec[key] = value
        out.append(rec)
    return out


def render(tables: list[Table], fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise TableError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "md":
        if len(tables) == 1:
            return _markdown(tables[0])
        return "\n".join(f"### {t.title}\n\n{_markdown(t)}" for t in tables)
    records = [rec for t in tables for rec in _machine(t)]
    if fmt == "json":
        return json.dumps(records, indent=2, default=str) + "\n"
    keys = list(dict.fromkeys(k for t in tables for k in t.keys)) or MACHINE_KEYS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for rec in records:
        # lists (repeated published runs) as "80.29;80.65" so that the CSV stays one value a cell
        writer.writerow({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in rec.items()})
    return buf.getvalue()
