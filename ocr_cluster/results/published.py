"""Published numbers (published.csv beside this file) and matching them to our runs."""

from __future__ import annotations

import csv
import functools
from importlib import resources
from typing import Any

INT_FIELDS = ("batch_size", "iters", "epochs")
FLOAT_FIELDS = ("mem_gb", "fps")
MULTI_FIELDS = ("miou", "miou_msflip")  # "80.29,80.65" = repeated runs


def _values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


@functools.lru_cache(maxsize=1)
def load() -> tuple[dict[str, Any], ...]:
    """Every published row, typed: ints, floats, lists of run values for the metrics, None for blanks.

    Each row also gets `<metric>_mean`: the mean of its repeated runs (or the single value).
    """
    text = resources.files(__package__).joinpath("published.csv").read_text()
    rows = []
    for raw in csv.DictReader(line for line in text.splitlines() if not line.startswith("#")):
        row: dict[str, Any] = {k: (v.strip() or None) for k, v in raw.items()}
        for key in INT_FIELDS:
            row[key] = int(row[key]) if row[key] else None
        for key in FLOAT_FIELDS:
            row[key] = float(row[key]) if row[key] else None
        for key in MULTI_FIELDS:
            runs = _values(row[key] or "")
            row[key] = runs
            row[f"{key}_mean"] = sum(runs) / len(runs) if runs else None
        rows.append(row)
    return tuple(rows)


def matches(run: dict[str, Any], pub: dict[str, Any]) -> bool:
    """True when `pub` reports the same setting as `run` (see the rule at the top of published.csv)."""
    if pub["split"] != "val" or pub["variant"] or not pub["head"] or pub["iters"] is None:
        return False
    same = all(pub[key] == run.get(key) for key in ("dataset", "head", "backbone", "crop_size", "iters"))
    return same and (pub["batch_size"] is None or pub["batch_size"] == run.get("batch_size"))


def find(run: dict[str, Any]) -> dict[str, Any] | None:
    """The first published row matching `run` (a results row), or None."""
    return next((pub for pub in load() if matches(run, pub)), None)
