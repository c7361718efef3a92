"""`sweep plan`: each cell of a grid with what the results store holds for it and what it would cost."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from ocr_cluster.sweep.estimate import Estimate, Speed, estimate, speeds_from_rows
from ocr_cluster.sweep.grid import Cell

# A cell's state: what the store holds ("completed", "failed", "stopped": ended early by the sweep's early
# stopping, not completed), None when it holds nothing, UNREAD when
# the store was not or could not be read. The launcher adds what the scheduler knows ("pending", "running") through
# `live` in plan(): a completed row wins over it, anything else is replaced by it.
COMPLETED, FAILED, STOPPED, UNREAD = "completed", "failed", "stopped", "unread"


@dataclass
class PlanRow:
    cell: Cell
    state: str | None
    miou: float | None
    estimate: Estimate
    store_uri: str

    def to_json(self) -> dict[str, Any]:
        cfg = self.cell.config
        return {
            "sweep": cfg.run.sweep, "name": self.cell.name, "run_id": self.cell.run_id, "seed": cfg.run.seed,
            "axes": self.cell.axes, "dataset": cfg.data.dataset, "backbone": cfg.model.backbone,
            "head": cfg.model.head, "crop_size": cfg.data.crop_size, "batch_size": cfg.data.batch_size,
            "num_gpus": cfg.cluster.num_workers if cfg.cluster.use_gpu else 0, "iters": cfg.schedule.iters,
            "store_uri": self.store_uri, "state": self.state, "miou": self.miou,
            "sec_per_iter": self.estimate.sec_per_iter, "est_hours": self.estimate.hours,
            "est_gpu_hours": self.estimate.gpu_hours, "estimate_source": self.estimate.source,
            "estimate_note": self.estimate.note,
        }


def read_store(store_uri: str) -> tuple[list[dict[str, Any]] | None, list[str]]:
    """(one row per run, or None when the store cannot be read; warning lines)."""
    from ocr_cluster.results import read_runs  # pyarrow: only when a store is read

    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rows = read_runs(store_uri).to_pylist()
        except Exception as exc:  # noqa: BLE001 - an unreachable store leaves the plan without its states
            rows = None
            lines.append(f"could not read the results store {store_uri} ({type(exc).__name__}: {exc}); "
                         f"its cells show '?'")
    lines += [str(w.message) for w in caught]
    return rows, lines


def plan(cells: list[Cell], *, store: str | None = None, read: bool = True, device: str | None = None,
         live: Mapping[str, str] | None = None) -> tuple[list[PlanRow], list[str]]:
    """PlanRows for `cells` and warning lines. `store` replaces every cell's results.store_uri; with
    `read=False` no store is read (states unknown, estimates from TRAIN_SPEEDS only)."""
    uris = {c.run_id: store or c.config.results.store_uri for c in cells}
    runs: dict[str, dict[str, dict[str, Any]] | None] = {}
    speeds: list[Speed] = []
    notes: list[str] = []
    for uri in dict.fromkeys(uris.values()):
        rows, lines = read_store(uri) if read else (None, [])
        notes += lines
        runs[uri] = None if rows is None else {r["run_id"]: r for r in rows}
        speeds += speeds_from_rows(rows or [])
    out = []
    for cell in cells:
        held = runs[uris[cell.run_id]]
        row = (held or {}).get(cell.run_id)
        state = UNREAD if held is None else (row["status"] if row else None)
        if live and cell.run_id in live and state != COMPLETED:
            state = live[cell.run_id]
        miou = row.get("miou") if row and state in (COMPLETED, STOPPED) else None
        out.append(PlanRow(cell, state, miou, estimate(cell.config, speeds, device), uris[cell.run_id]))
    return out, notes


def summary(rows: list[PlanRow]) -> dict[str, Any]:
    """Counts and estimated totals; totals are lower bounds when some cells have no estimate."""
    todo = [r for r in rows if r.state != COMPLETED]
    known = [r for r in rows if r.estimate.gpu_hours is not None]
    return {
        "cells": len(rows),
        "completed": sum(r.state == COMPLETED for r in rows),
        "failed": sum(r.state == FAILED for r in rows),
        "stopped": sum(r.state == STOPPED for r in rows),
        "not_in_store": sum(r.state is None for r in rows),
        "unread": sum(r.state == UNREAD for r in rows),
        "est_gpu_hours": sum(r.estimate.gpu_hours for r in known),
        "est_hours": sum(r.estimate.hours for r in known),
        "est_gpu_hours_todo": sum(r.estimate.gpu_hours for r in todo if r.estimate.gpu_hours is not None),
        "todo": len(todo),
        "without_estimate": len(rows) - len(known),
    }
