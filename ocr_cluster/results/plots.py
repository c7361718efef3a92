"""A metric against a field, one line per group (e.g. mIoU against iters, by backbone)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ocr_cluster.results import names
from ocr_cluster.results.tables import HEADERS, TableError, _order


def plot(runs: list[dict[str, Any]], x: str, y: str, by: str | None, out: str, title: str | None = None) -> str:
    """Write the plot to `out` (format from its suffix: .png, .svg, .pdf); returns the path.

    Every run is a point; the line joins the mean of each x. Runs without an x or y are left out.
    """
    points = [r for r in runs if r.get(x) is not None and r.get(y) is not None]
    if not points:
        raise TableError(f"no runs have both {x!r} and {y!r}")
    numeric = all(isinstance(r[x], (int, float)) for r in points)
    groups: dict[Any, list[dict]] = {}
    for run in points:
        groups.setdefault(run.get(by) if by else None, []).append(run)
    # Categorical x (e.g. crop_size) goes on evenly spaced positions in the zoo's order.
    categories = sorted({r[x] for r in points}, key=lambda v: _order(x, v))

    def pos(value: Any) -> float:
        return value if numeric else categories.index(value)

    fig = Figure(figsize=(7, 4.5))  # no pyplot: no display, no global backend switch on cluster nodes
    ax = fig.subplots()
    for group in sorted(groups, key=lambda v: _order(by or "", v)):
        rows = groups[group]
        label = names.DISPLAY.get(by, str)(group) if by else None
        xs = sorted({r[x] for r in rows}, key=lambda v: _order(x, v))
        means = [statistics.fmean(r[y] for r in rows if r[x] == v) for v in xs]
        line, = ax.plot([pos(v) for v in xs], means, marker="o", label=label)
        ax.scatter([pos(r[x]) for r in rows], [r[y] for r in rows], color=line.get_color(), alpha=0.4, s=14)
    if not numeric:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
    ax.set_xlabel(HEADERS.get(x, x))
    ax.set_ylabel(HEADERS.get(y, y))
    ax.grid(True, alpha=0.3)
    if by:
        ax.legend(title=HEADERS.get(by, by))
    ax.set_title(title or f"{HEADERS.get(y, y)} vs {HEADERS.get(x, x)}")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
