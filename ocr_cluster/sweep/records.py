"""Launch records: one immutable JSON object per `sweep launch` (and `sweep cancel`), next to the store.

    <store>/_launches/sweep=<S>/launch-<UTC time>-<id>.json
    <store>/_launches/sweep=<S>/cancel-<UTC time>-<id>.json

A launch record says what was submitted: the sweep, the grid's axes, each cell's name, run id, axis
values and job id (SLURM's, or the Ray job's submission id with backend_kind "ray" and the cluster's
address), the backend parameters, the submitit folder, the git sha and the time. It holds
no environment and no credential. The store's readers skip '_' directories, so records are never rows.
The newest record naming a run id gives that cell's job; `sweep status` and the next launch check that
job against squeue.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ocr_cluster import storage
from ocr_cluster.results.rows import scrub

DIR = "_launches"


def records_uri(store_uri: str, sweep: str) -> str:
    return storage.join(store_uri, DIR, f"sweep={quote(sweep, safe='')}")


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y%m%dT%H%M%S%fZ")


def write_record(store_uri: str, sweep: str, kind: str, body: dict[str, Any]) -> str:
    """Write a new `kind` (launch / cancel) record; returns its URI. Strings are scrubbed of credentials."""
    now = dt.datetime.now(dt.timezone.utc)
    record = {"kind": kind, "sweep": sweep, "time": now.isoformat(), **body}
    text = scrub(json.dumps(record, indent=2, sort_keys=False, default=str)) or ""
    name = f"{kind}-{_stamp(now)}-{uuid.uuid4().hex[:8]}.json"
    return storage.write_bytes_atomic(storage.join(records_uri(store_uri, sweep), name), text.encode())


def read_records(store_uri: str, sweep: str) -> list[dict[str, Any]]:
    """Every record of the sweep, oldest first (by name: the time stamp)."""
    fs, base = storage.filesystem(records_uri(store_uri, sweep))
    fs.invalidate_cache()  # s3fs caches listings; a record written a moment ago must show
    if not fs.exists(base):
        return []
    files = sorted((p for p in fs.find(base) if p.endswith(".json")),
                   key=lambda p: p.rsplit("/", 1)[-1].split("-", 1)[-1])
    out = []
    for path in files:
        try:
            record = json.loads(fs.cat_file(path))
        except (OSError, ValueError):
            continue  # a foreign or half-copied file: not ours to trust
        uri = path if storage.scheme(store_uri) == "file" else f"{storage.scheme(store_uri)}://{path}"
        record["uri"] = uri
        out.append(record)
    return out


@dataclass
class Submitted:
    """The newest job a run id was submitted as, and whether a later cancel named it."""
    run_id: str
    name: str
    job_id: str
    launch: str            # the launch record's URI
    time: str
    cancelled: bool = False
    backend: str = "slurm"  # or "ray": job_id is then a Ray job's submission id on `address`
    address: str = ""


def submitted(records: list[dict[str, Any]]) -> dict[str, Submitted]:
    """run id -> its newest submission (records oldest first)."""
    out: dict[str, Submitted] = {}
    for record in records:
        if record.get("kind") == "launch":
            for cell in record.get("cells", []):
                out[cell["run_id"]] = Submitted(cell["run_id"], cell.get("name", ""), str(cell["job_id"]),
                                                record["uri"], record.get("time", ""),
                                                backend=record.get("backend_kind", "slurm"),
                                                address=record.get("address", ""))
        elif record.get("kind") == "cancel":
            cancelled = set(record.get("job_ids", []))
            for sub in out.values():
                if sub.job_id in cancelled or sub.job_id.split("_", 1)[0] in cancelled:
                    sub.cancelled = True
    return out


def axes_of(records: list[dict[str, Any]]) -> list[str]:
    """The grid's axis names from the newest launch record (for `results table --sweep`)."""
    for record in reversed(records):
        if record.get("kind") == "launch" and record.get("axes"):
            return list(record["axes"])
    return []


def backend_dict(backend: Any) -> dict[str, Any]:
    return dataclasses.asdict(backend)
