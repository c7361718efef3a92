"""`sweep status`: each cell's state from the results store, the launch records and SLURM.

    completed   a completed row (its mIoU)            failed        a failed row and no live job (its error)
    stopped     ended early by the sweep's early stopping (ASHA; iteration and eval mIoU reached); not completed
    running     the job runs (iteration, last mIoU)   pending       queued (SLURM's reason)
    requeued    live again after a requeue (restarts) lost          the job ended without a row
    cancelled   `sweep cancel` stopped it             not launched  never submitted
    unread      the store could not be read

A cell launched with --backend ray names its sweep's Ray job: while that job is pending or running the
cell is pending (no checkpoint yet) or running (its checkpoints' progress); a stopped job is cancelled.
A completed row wins over everything; a live job wins over a failed or stopped row (a resubmitted cell),
except over a stopped row that same job wrote: a Tune sweep's job runs on after stopping some of its
cells. Works without SLURM accounting: squeue for live jobs, `scontrol show job` (for MinJobAge after
the end) or sacct, when it answers, for the end of a vanished one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from ocr_cluster import storage
from ocr_cluster.sweep import records, slurm
from ocr_cluster.sweep.grid import Cell
from ocr_cluster.sweep.plan import read_store

COMPLETED, FAILED, RUNNING, PENDING, REQUEUED = "completed", "failed", "running", "pending", "requeued"
LOST, CANCELLED, NOT_LAUNCHED, UNREAD, STOPPED = "lost", "cancelled", "not launched", "unread", "stopped"
LIVE = (RUNNING, PENDING, REQUEUED)


def keeps_stopped(grid, rerun_stopped: bool = False) -> bool:
    """Whether the grid's stopped cells stay stopped: yes while its early stopping is on, unless the launch
    asks to rerun them (--rerun-stopped). Turning early stopping off trains them on from their checkpoints."""
    return grid.backend.ray.early_stopping.enabled and not rerun_stopped


def ended(status: "CellStatus", keep_stopped: bool) -> bool:
    """Nothing left to train: completed, or stopped early and kept so (never counted as completed)."""
    return status.state == COMPLETED or (keep_stopped and status.state == STOPPED)


@dataclass
class CellStatus:
    cell: Cell
    state: str
    detail: str = ""
    job_id: str | None = None
    miou: float | None = None
    restarts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.cell.name, "run_id": self.cell.run_id, "axes": self.cell.axes, "state": self.state,
                "detail": self.detail, "job_id": self.job_id, "miou": self.miou, "restarts": self.restarts}


def with_store(cells: list[Cell], store: str | None) -> list[Cell]:
    """Cells whose results.store_uri is `store` (when given): what --store means for every sweep action."""
    if not store:
        return cells
    out = []
    for cell in cells:
        cfg = dataclasses.replace(cell.config, results=dataclasses.replace(cell.config.results, store_uri=store))
        out.append(Cell(cell.name, cfg, cell.axes))
    return out


def progress(cfg, run_id: str) -> tuple[int, float | None]:
    """(latest checkpoint iteration, last evaluated mIoU) from the run's checkpoint directory."""
    fs, root = storage.filesystem(storage.join(cfg.storage.checkpoint_uri, run_id))
    try:
        fs.invalidate_cache(root)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except (FileNotFoundError, OSError):
        return 0, None
    iters = [int(m.group(1)) for n in names if (m := re.fullmatch(r"checkpoint_iter=(\d+)", n))]
    miou = None
    if "checkpoint_manager_snapshot.json" in names:  # Ray Train's record of the reported metrics
        try:
            snapshot = json.loads(fs.cat_file(f"{root}/checkpoint_manager_snapshot.json"))
            found = [m for m in _metrics(snapshot) if "mIoU" in m]
            if found:
                miou = max(found, key=lambda m: m.get("iter", 0))["mIoU"]
        except (OSError, ValueError, TypeError):
            pass
    return max(iters, default=0), miou


def _metrics(node: Any) -> list[dict]:
    """Every dict with an 'iter' key inside a JSON document (the snapshot's format is Ray's)."""
    if isinstance(node, str) and node.lstrip().startswith("{"):
        try:
            node = json.loads(node)
        except ValueError:
            return []
    if isinstance(node, dict):
        own = [node] if "iter" in node else []
        return own + [m for v in node.values() for m in _metrics(v)]
    if isinstance(node, list):
        return [m for v in node for m in _metrics(v)]
    return []


def _stopped_detail(row: dict) -> str:
    done, miou = row.get("iters_done"), row.get("miou")
    return (f"stopped early at iter {done if done is not None else '?'}/{row.get('iters')}"
            + (f", eval mIoU {miou:.2f}" if miou is not None else ""))


def _first_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[0] if lines else "no error recorded"


def _ray_jobs(job_ids: dict[str, str]) -> dict[str, slurm.JobState]:
    """Ray jobs as JobStates: PENDING / RUNNING live, every other state as the job API says it."""
    from ocr_cluster.sweep.ray_backend import job_states

    out = {}
    for job_id, state in job_states(job_ids).items():
        live = state in ("PENDING", "RUNNING")
        out[job_id] = slurm.JobState(job_id, state if live else f"RAY_{state}")
    return out


def _gone(sub: records.Submitted, job: slurm.JobState | None = None) -> tuple[str, str]:
    """State and detail of a submitted job that is no longer queued and left no row."""
    if sub.cancelled:
        return CANCELLED, f"job {sub.job_id} cancelled by `sweep cancel`"
    if sub.backend == "ray":
        state = job.state.removeprefix("RAY_") if job else None
        if state == "STOPPED":
            return CANCELLED, f"Ray job {sub.job_id} was stopped"
        return LOST, f"Ray job {sub.job_id} ended ({state or 'the cluster no longer knows it'}) without a result row"
    job = slurm.show_job(sub.job_id)
    end = job.state if job else slurm.sacct_state(sub.job_id)
    return LOST, f"job {sub.job_id} ended ({end or 'SLURM no longer knows it'}) without a result row"


def cell_states(cells: list[Cell], sweep: str, ask_slurm: bool = True,
                ask_ray: bool | None = None) -> tuple[list[CellStatus], list[str]]:
    """The state of every cell, and warning lines. `ask_ray` (default: `ask_slurm`): ask the Ray job API
    about cells launched with --backend ray."""
    ask_ray = ask_slurm if ask_ray is None else ask_ray
    notes: list[str] = []
    stores = list(dict.fromkeys(c.config.results.store_uri for c in cells))
    runs: dict[str, dict[str, dict] | None] = {}
    subs: dict[str, records.Submitted] = {}
    for uri in stores:
        try:  # s3fs caches listings per process: `--wait` and `--watch` must see new rows
            fs, root = storage.filesystem(uri)
            fs.invalidate_cache()  # all of it: a path drops only itself and its parents
        except Exception:  # noqa: BLE001 - read_store reports an unusable store
            pass
        rows, lines = read_store(uri)
        notes += lines
        runs[uri] = None if rows is None else {r["run_id"]: r for r in rows}
        try:
            subs.update(records.submitted(records.read_records(uri, sweep)))
        except Exception as exc:  # noqa: BLE001 - an unreadable store is reported once above
            notes.append(f"could not read the launch records under {uri}: {exc}")
    jobs: dict[str, slurm.JobState] = {}
    slurm_subs = [s for s in subs.values() if s.backend != "ray"]
    if ask_slurm and slurm_subs:
        if slurm.available():
            jobs = slurm.squeue([s.job_id for s in slurm_subs])
        else:
            notes.append("squeue is not on PATH: live jobs cannot be seen (they show as lost)")
    ray_subs = {s.job_id: s.address for s in subs.values() if s.backend == "ray"}
    if ask_ray and ray_subs:
        jobs.update(_ray_jobs(ray_subs))
    out = []
    for cell in cells:
        held = runs[cell.config.results.store_uri]
        row = (held or {}).get(cell.run_id)
        sub = subs.get(cell.run_id)
        job = jobs.get(sub.job_id) if sub else None
        status = CellStatus(cell, NOT_LAUNCHED, job_id=sub.job_id if sub else None,
                            restarts=job.restarts if job else 0)
        stopped_here = bool(row and row["status"] == STOPPED and sub and row.get("scheduler_job_id") == sub.job_id)
        if row and row["status"] == "completed":
            status.state, status.miou = COMPLETED, row.get("miou")
            status.detail = f"mIoU {row['miou']:.2f}" if row.get("miou") is not None else ""
        elif row and row["status"] == STOPPED and (stopped_here or job is None or not job.live):
            status.state, status.miou = STOPPED, row.get("miou")
            status.detail = _stopped_detail(row)
        elif job is not None and job.live:
            status.state = PENDING if job.state == "PENDING" else RUNNING
            done, miou = progress(cell.config, cell.run_id) if status.state == RUNNING else (0, None)
            if sub.backend == "ray" and status.state == RUNNING and not done:
                status.detail = "in the sweep's Ray job, no checkpoint yet"
            elif status.state == RUNNING:
                status.detail = f"iter {done}/{cell.config.schedule.iters}" + (
                    f", last eval mIoU {miou:.2f}" if miou is not None else "")
            else:
                status.detail = job.reason or "queued"
            if job.restarts:
                status.detail = f"{status.state}, restarted {job.restarts}x: {status.detail}"
                status.state = REQUEUED
        elif row:
            status.state, status.detail = FAILED, _first_line(row.get("error"))
        elif held is None:
            status.state, status.detail = UNREAD, "the results store could not be read"
        elif sub and (ask_ray if sub.backend == "ray" else ask_slurm):
            status.state, status.detail = _gone(sub, job)
        out.append(status)
    return out, notes


def live_map(statuses: list[CellStatus]) -> dict[str, str]:
    """run id -> pending / running / requeued, for `plan(live=...)`."""
    return {s.cell.run_id: s.state for s in statuses if s.state in LIVE}


def counts(statuses: list[CellStatus]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[s.state] = out.get(s.state, 0) + 1
    return out
