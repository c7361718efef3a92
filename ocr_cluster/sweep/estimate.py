"""GPU-hour estimates for sweep cells, only from measurements: never a made-up number.

A cell's seconds per iteration come from, in order:
1. completed rows in the results store with the same backbone, head, crop, batch per device and device
   (total_time_s / iters, the run's time over all attempts, or train_time_s for older rows; the median
   when several match);
2. TRAIN_SPEEDS below, measured figures the training benchmarks are to fill;
3. nothing: the estimate is unknown ("?").
GPU-hours = seconds per iteration x iters x GPUs / 3600. A CPU cell uses no GPU-hours; its wall-clock
hours are still estimated the same way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from ocr_cluster import config
from ocr_cluster.config import Config


@dataclass(frozen=True)
class Speed:
    """A measured training speed: one (backbone, head, crop, batch per device, device) setting."""
    backbone: str
    head: str
    crop_size: str
    per_device_batch: int
    device: str              # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3", or "cpu"
    sec_per_iter: float
    source: str              # where the figure comes from (a run id, a benchmarks/README.md section)


# Training speeds measured by benchmarks/ (none yet: benchmarks/ measures data and the results store,
# not training). A training benchmark adds rows here, with its README section as the source. Empty on
# purpose: without a measurement the plan says "?".
TRAIN_SPEEDS: tuple[Speed, ...] = ()


@dataclass(frozen=True)
class Estimate:
    sec_per_iter: float | None
    hours: float | None          # wall clock
    gpu_hours: float | None
    source: str | None           # e.g. "store: 2 runs on NVIDIA H100 80GB HBM3", "benchmarks: ..."
    note: str | None = None      # why there is none, when it is not simply missing


UNKNOWN = Estimate(None, None, None, None)


def cell_key(cfg: Config) -> tuple[str, str, str, int]:
    """(backbone, head, crop, batch per device) of a config; a CPU run's device is a Ray worker."""
    per_device = cfg.data.batch_size // max(cfg.cluster.num_workers, 1)
    return cfg.model.backbone, cfg.model.head, cfg.data.crop_size, per_device


def cell_device(cfg: Config) -> str | None:
    return None if cfg.cluster.use_gpu else "cpu"


def _row_per_device_batch(row: dict[str, Any]) -> int | None:
    if row.get("num_gpus"):
        return row["batch_size"] // row["num_gpus"]
    try:  # CPU runs: the row has no GPU count; its stored config has the worker count
        workers = config.loads_yaml(row["config_yaml"]).cluster.num_workers
    except Exception:  # noqa: BLE001 - an old or foreign row without a readable config gives no speed
        return None
    return row["batch_size"] // max(workers, 1)


def speeds_from_rows(rows: Iterable[dict[str, Any]]) -> list[Speed]:
    """A Speed per completed row that measured its training time."""
    out = []
    for row in rows:
        seconds = row.get("total_time_s") or row.get("train_time_s")  # all attempts', where the row has it
        if row.get("status") != "completed" or not seconds or not row.get("iters"):
            continue
        if not (row.get("backbone") and row.get("head") and row.get("crop_size") and row.get("device")):
            continue
        per_device = _row_per_device_batch(row)
        if per_device:
            out.append(Speed(row["backbone"], row["head"], row["crop_size"], per_device, row["device"],
                             seconds / row["iters"], f"run {row['run_id']}"))
    return out


def _pick(matches: list[Speed], device: str | None) -> tuple[list[Speed], str | None]:
    """The speeds on one device: `device` (a substring, case-insensitive) if given, else the only one."""
    if device is not None:
        return [s for s in matches if device.lower() in s.device.lower()], None
    devices = sorted({s.device for s in matches})
    if len(devices) > 1:
        return [], f"measured on several devices ({', '.join(devices)}): choose one with --device"
    return matches, None


def estimate(cfg: Config, measured: list[Speed], device: str | None = None,
             benchmarks: tuple[Speed, ...] = TRAIN_SPEEDS) -> Estimate:
    """The estimate for one cell; `device` narrows GPU cells to one device (CPU cells are "cpu")."""
    key = cell_key(cfg)
    device = cell_device(cfg) or device
    gpus = cfg.cluster.num_workers if cfg.cluster.use_gpu else 0
    note = None
    for kind, pool in (("store", measured), ("benchmarks", list(benchmarks))):
        matches = [s for s in pool if (s.backbone, s.head, s.crop_size, s.per_device_batch) == key]
        chosen, why = _pick(matches, device)
        note = note or why
        if chosen:
            sec = statistics.median(s.sec_per_iter for s in chosen)
            hours = sec * cfg.schedule.iters / 3600
            runs = f"{len(chosen)} run{'s' if len(chosen) > 1 else ''}" if kind == "store" else chosen[0].source
            return Estimate(sec, hours, hours * gpus, f"{kind}: {runs} on {chosen[0].device}")
    return Estimate(None, None, None, None, note)
