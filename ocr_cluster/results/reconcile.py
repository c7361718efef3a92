"""Is a sweep complete? Its manifest (expected run ids) against what the store holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ocr_cluster import storage
from ocr_cluster.results.errors import ResultsError
from ocr_cluster.results.store import latest, sweep_manifest_uri, read_attempts


class ManifestError(ResultsError):
    """A manifest that cannot be read; the message is one line for the user."""


def read_sweep_manifest(uri: str) -> list[str]:
    """Expected run ids from a manifest: Parquet or CSV with a run_id column, a JSON / YAML list
    (of ids, or of objects with run_id), or plain text with one id a line ('#' comments)."""
    data = storage.read_bytes(uri)
    suffix = Path(uri).suffix.lower()
    try:
        if suffix == ".parquet":
            return [str(v) for v in storage.parquet_table(data, columns=["run_id"])["run_id"].to_pylist()]
        text = data.decode()
        if suffix in (".json", ".yaml", ".yml"):
            items = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
            if isinstance(items, dict):
                items = items.get("cells") or items.get("run_ids") or []
            return [str(i["run_id"] if isinstance(i, dict) else i) for i in items]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if suffix == ".csv" and lines:
            header = [h.strip() for h in lines[0].split(",")]
            if "run_id" not in header:
                raise ManifestError(f"{uri}: a CSV manifest needs a run_id column")
            col = header.index("run_id")
            return [ln.split(",")[col].strip() for ln in lines[1:]]
        return lines
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
        raise ManifestError(f"cannot read the manifest {uri}: {type(exc).__name__}: {exc}") from None


@dataclass
class Report:
    sweep: str
    expected: int
    completed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)            # no attempt at all
    failed: list[dict[str, Any]] = field(default_factory=list)  # attempts, none completed: latest one
    stopped: list[dict[str, Any]] = field(default_factory=list)  # none completed, the latest stopped early (ASHA)
    duplicated: list[dict[str, Any]] = field(default_factory=list)  # more than one completed attempt
    unexpected: list[str] = field(default_factory=list)         # in the sweep's partition, not in the manifest

    @property
    def complete(self) -> bool:
        """Nothing missing or failed. Stopped cells are not completed (nor counted so), but the sweep's
        early stopping ended them: nothing is left to run for them."""
        return not self.missing and not self.failed


def reconcile(store_uri: str, sweep: str, manifest: str | None = None) -> Report:
    """Compare the sweep's manifest (default: the one in the store) with every attempt in the store.

    A run id counts wherever it was written: the id hashes the training config, so the same cell run
    outside the sweep is the same result.
    """
    uri = manifest or sweep_manifest_uri(store_uri, sweep)
    if manifest is None and not storage.exists(uri):
        raise ManifestError(f"no manifest for sweep {sweep!r} at {uri}; pass --manifest FILE")
    expected = list(dict.fromkeys(read_sweep_manifest(uri)))
    attempts = read_attempts(store_uri)
    rows = attempts.select(["run_id", "attempt", "status", "error", "sweep", "file", "finished_at",
                            "written_at", "attempt_id"]).to_pylist()
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["run_id"], []).append(row)
    chosen = {r["run_id"]: r for r in latest(attempts).select(["run_id", "attempt", "status", "error", "file",
                                                                "miou", "iters_done", "iters"]).to_pylist()}
    report = Report(sweep, len(expected))
    for run_id in expected:
        if run_id not in by_id:
            report.missing.append(run_id)
            continue
        done = [r for r in by_id[run_id] if r["status"] == "completed"]
        if not done:
            (report.stopped if chosen[run_id]["status"] == "stopped" else report.failed).append(chosen[run_id])
            continue
        report.completed.append(run_id)
        if len(done) > 1:
            report.duplicated.append({"run_id": run_id, "completed_attempts": len(done),
                                      "files": sorted(r["file"] for r in done)})
    wanted = set(expected)
    report.unexpected = sorted({r["run_id"] for r in rows if r["sweep"] == sweep and r["run_id"] not in wanted})
    return report
