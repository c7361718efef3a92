"""The run's row in the results store: completed (rank 0, at the end) or failed (the driver). (A Tune sweep's
early stopping writes a third kind, stopped: ocr_cluster.sweep.tune.write_stopped.)

Exactly one completed row per run: the driver does not start a run whose completed row exists,
and rank 0 checks again before writing (a retry that finished twice writes once).
"""

from __future__ import annotations

import datetime as dt
import os
import warnings

from ocr_cluster.config import Config
from ocr_cluster.results import read_attempts, row_from_config, write_run
from ocr_cluster.results.rows import launch_fields
from ocr_cluster.train.layout import RunLayout
from ocr_cluster.train.progress import say


def attempts(cfg: Config, run_id: str) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable file elsewhere in the store is not ours to report
        table = read_attempts(cfg.results.store_uri, dataset=cfg.data.dataset, run_id=run_id)
    return table.to_pylist()


def _completed(rows: list[dict]) -> dict | None:
    done = [row for row in rows if row["status"] == "completed"]
    return done[-1] if done else None


def completed_row(cfg: Config, run_id: str) -> dict | None:
    return _completed(attempts(cfg, run_id))


def attempt_launch(cfg: Config) -> dict:
    """How this attempt was launched, read on the driver: what a launcher exported (SLURM task, `ray job
    submit`), else "ray" for a driver that joins a cluster itself and "local" for one that starts its own.
    The workers get it from the driver: Ray's job variables reach only the job's driver process."""
    launch = launch_fields()
    if launch["launcher"] is None:
        launch["launcher"] = "ray" if cfg.cluster.address or os.environ.get("RAY_ADDRESS") else "local"
    return launch


def _common(previous: int, num_nodes: int | None = None) -> dict:
    """What row_from_config cannot know (it takes run id, GPUs and paths from the run's layout)."""
    return {"attempt": previous + 1, "num_nodes": num_nodes, "finished_at": dt.datetime.now(dt.timezone.utc)}


def write_completed(cfg: Config, layout: RunLayout, classes: list[str], scores: dict, ms_scores: dict | None, *,
                    fps, mem_gb, train_time_s: float, total_time_s: float, started_at, num_nodes: int | None,
                    skipped_samples: int, launch: dict | None = None) -> str | None:
    """train_time_s: this attempt's; total_time_s and started_at: the run's, over all attempts (RunClock)."""
    rows = attempts(cfg, layout.run_id)
    if _completed(rows) is not None:
        say(f"[{layout.run_id}] a completed row exists already; not writing another")
        return None
    row = row_from_config(
        cfg, **_common(len(rows), num_nodes), status="completed", miou=scores["mIoU"],
        aacc=scores["aAcc"], macc=scores["mAcc"], miou_msflip=ms_scores["mIoU"] if ms_scores else None,
        iou_per_class=list(zip(classes, scores["IoU"])), fps=fps, mem_gb=mem_gb, train_time_s=train_time_s,
        total_time_s=total_time_s, started_at=started_at, checkpoint_uri=layout.final_model_uri,
        skipped_samples=skipped_samples, iters_done=cfg.schedule.iters, **(launch or {}))
    uri = write_run(cfg.results.store_uri, row)
    say(f"[{layout.run_id}] completed: mIoU {scores['mIoU']:.2f}; result row {uri}")
    return uri


def write_failed(cfg: Config, layout: RunLayout, error: str) -> str:
    previous = len(attempts(cfg, layout.run_id))
    row = row_from_config(cfg, **_common(previous), **attempt_launch(cfg), status="failed", error=error[-4000:])
    return write_run(cfg.results.store_uri, row)
