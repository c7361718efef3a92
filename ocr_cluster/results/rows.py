"""Building one results row: from a Config, checked against the schema, scrubbed of credentials."""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

import ocr_cluster
from ocr_cluster.results import names
from ocr_cluster.results.errors import ResultsError
from ocr_cluster.results.schema import COLUMNS, PERCENT_COLUMNS, REQUIRED, SCHEMA, SCHEMA_VERSION, STATUSES
from ocr_cluster.train.clock import gpu_hours
from ocr_cluster.train.layout import RunLayout


class RowError(ResultsError):
    """A row that does not fit the schema; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Credentials never land in a row. The config has no credential fields by design; these catch
# what could still leak in through URIs, error messages and tracebacks.

_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@")  # s3://KEY:SECRET@bucket -> s3://bucket
_SECRET_PARAM = re.compile(
    r"([?&;](?:x-amz-[\w-]+|[\w-]*(?:token|signature|secret|password|passwd|credential|sig|key)[\w-]*)=)[^&\s#'\"]+",
    re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|KEY_ID|CREDENTIAL|API_KEY", re.IGNORECASE)
REDACTED = "***"


def _secret_env_values() -> list[str]:
    # Short values ("testing", "1") would redact ordinary words; real keys are 16+ characters.
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def scrub(text: str | None) -> str | None:
    """`text` with URI userinfo, credential-looking query values, AWS key ids and the values of
    credential environment variables replaced by '***'."""
    if not text:
        return text
    for value in _secret_env_values():
        text = text.replace(value, REDACTED)
    text = _USERINFO.sub(r"\1", text)
    text = _SECRET_PARAM.sub(rf"\1{REDACTED}", text)
    return _AWS_KEY_ID.sub(REDACTED, text)


# ---------------------------------------------------------------------------------------------
# Provenance


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the ocr_cluster checkout, or None outside a git checkout (e.g. an installed wheel)."""
    if os.environ.get("OCR_CLUSTER_GIT_SHA"):  # for images built without .git
        return os.environ["OCR_CLUSTER_GIT_SHA"]
    package_dir = Path(ocr_cluster.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def _version(dist: str) -> str | None:
    # importlib.metadata, not `import torch`: a row must not cost a second of import time.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(num_gpus: int) -> str | None:
    """The GPU's name when this process already uses torch with CUDA; "cpu" for CPU runs; else None."""
    if not num_gpus:
        return "cpu"
    torch = sys.modules.get("torch")  # never import torch just for a name
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None


# How an attempt was launched. A launcher exports these for the driver and the Ray workers it starts
# (the SLURM array task does); `ray job submit` is recognised on the driver by the variable Ray sets.
LAUNCH_ENV = {"launcher": "OCR_CLUSTER_LAUNCHER", "scheduler_job_id": "OCR_CLUSTER_JOB_ID",
              "restart_count": "OCR_CLUSTER_RESTART_COUNT"}


def launch_fields() -> dict[str, Any]:
    """launcher, scheduler_job_id and restart_count from the environment (None where unknown)."""
    out: dict[str, Any] = {key: os.environ.get(var) or None for key, var in LAUNCH_ENV.items()}
    if out["launcher"] is None and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        out["launcher"] = "ray-job"
        try:
            import json

            meta = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]).get("metadata") or {}
            out["scheduler_job_id"] = out["scheduler_job_id"] or meta.get("job_submission_id")
        except (ValueError, AttributeError):
            pass
    try:
        out["restart_count"] = int(out["restart_count"]) if out["restart_count"] is not None else None
    except ValueError:
        out["restart_count"] = None
    return out


def row_from_config(cfg, **fields: Any) -> dict[str, Any]:
    """A row for a run of `cfg` (an ocr_cluster.config.Config); `fields` add metrics and override the rest.

    e.g. row_from_config(cfg, status="completed", miou=77.72, mem_gb=4.7, attempt=1, num_nodes=2)
    """
    layout = RunLayout.from_config(cfg)
    row = {
        "run_id": layout.run_id,
        "sweep": cfg.run.sweep,
        "run_name": cfg.run.name,
        "dataset": cfg.data.dataset,
        "method": names.method(cfg.model.head),
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "crop_size": cfg.data.crop_size,
        "batch_size": cfg.data.batch_size,
        "iters": cfg.schedule.iters,
        "seed": cfg.run.seed,
        "num_gpus": layout.num_gpus,
        "device": _device(layout.num_gpus),
        "checkpoint_uri": layout.run_uri,
        "config_yaml": cfg.to_yaml(),
        "git_sha": git_sha(),
        "torch_version": _version("torch"),
        "ray_version": _version("ray"),
        **launch_fields(),
    }
    row.update(fields)
    return row


# ---------------------------------------------------------------------------------------------
# Checking a row against the schema


def _timestamp(value: Any, key: str) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        stamp = dt.datetime.fromtimestamp(value, dt.timezone.utc)
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            raise RowError(f"{key}: expected a datetime, epoch seconds or ISO 8601 text, got {value!r}") from None
    else:
        raise RowError(f"{key}: expected a datetime, epoch seconds or ISO 8601 text, got {value!r}")
    # A naive datetime is local time (Python's convention); rows store UTC.
    return stamp.astimezone(dt.timezone.utc) if stamp is not None else None


def _per_class(value: Any) -> list[dict] | None:
    """{name: iou}, [(name, iou)], [{"name", "iou"}] or [iou, ...] (names become "0", "1", ...)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return [{"name": str(k), "iou": v} for k, v in value.items()]
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            out.append({"name": str(item["name"]), "iou": item["iou"]})
        elif isinstance(item, (tuple, list)):
            out.append({"name": str(item[0]), "iou": item[1]})
        else:
            out.append({"name": str(i), "iou": item})
    return out


def checked_row(row: dict[str, Any], *, written_at: dt.datetime | None = None) -> dict[str, Any]:
    """A complete row: every schema column, types checked, timestamps in UTC, strings scrubbed.

    Raises RowError for unknown keys, missing required values, wrong types and out-of-range metrics.
    """
    unknown = [k for k in row if k not in COLUMNS]
    if unknown:
        hints = [f"{k} (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(k.lower(), COLUMNS, n=1)) else k
                 for k in unknown]
        raise RowError(f"unknown result columns: {', '.join(hints)}")
    out = {name: row.get(name) for name in COLUMNS}
    for key in REQUIRED:
        if not out[key]:
            raise RowError(f"{key}: required, got {out[key]!r}")
    if out["status"] not in STATUSES:
        raise RowError(f"status: expected one of {', '.join(STATUSES)}, got {out['status']!r}")
    out["schema_version"] = SCHEMA_VERSION
    out["attempt"] = out["attempt"] or 0
    if not isinstance(out["attempt"], int) or out["attempt"] < 0:
        raise RowError(f"attempt: expected a retry number >= 0, got {out['attempt']!r}")
    out["sweep"] = out["sweep"] or ""
    out["method"] = out["method"] or names.method(out["head"])
    out["iou_per_class"] = _per_class(out["iou_per_class"])
    for key in ("started_at", "finished_at"):
        out[key] = _timestamp(out[key], key)
    out["written_at"] = written_at or dt.datetime.now(dt.timezone.utc)
    if out["gpu_hours"] is None:  # over all attempts where known; a CPU run has none
        seconds = out["total_time_s"] if out["total_time_s"] is not None else out["train_time_s"]
        out["gpu_hours"] = gpu_hours(seconds, out["num_gpus"])
    for key in PERCENT_COLUMNS:
        value = out[key]
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 100.0):
            raise RowError(f"{key}: expected a percentage in [0, 100] (mIoU 77.72, not 0.7772), got {value!r}")
    # Type-check column by column so that the error names the column.
    for field in SCHEMA:
        value = out[field.name]
        if isinstance(value, str):
            value = out[field.name] = scrub(value)
        try:
            pa.array([value], type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise RowError(f"{field.name}: {value!r} is not a valid {field.type} ({exc})") from None
    return out
