"""The `backend:` section of a grid file: where its cells run. One dataclass per backend, validated
like the job config (ocr_cluster.config): unknown keys and wrong types fail with one line naming the key.

    backend:
      default: slurm                        # what `sweep launch` uses without --backend: slurm | ray | slurm-ray
      slurm: {partition: gpu, gpus_per_node: 8, time: "2-00:00:00", array_parallelism: 16}
      ray: {address: "http://head:8265", max_concurrent_trials: 4,
            early_stopping: {grace_period: 4000, reduction_factor: 3}}   # ASHA; off unless given

The SLURM launcher (submitit job arrays), the Ray Tune backend (ocr_cluster.sweep.tune) and Tune inside
one SLURM allocation (ocr_cluster.sweep.allocation: backend.slurm sizes it, backend.ray runs it) read these;
a backend a grid does not name keeps its defaults, so one file runs on either. Add fields here, with
defaults that keep old grid files valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ocr_cluster import config
from ocr_cluster.config import ConfigError, opt

# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS
SLURM_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
SLURM_MEM = re.compile(r"^\d+[KMGT]?$")  # sbatch --mem: 0 = all of the node's memory


@dataclass
class SlurmBackend:
    partition: str = opt("", "sbatch --partition; empty = the cluster's default")
    account: str = opt("", "sbatch --account")
    qos: str = opt("", "sbatch --qos")
    nodes: int = opt(0, "nodes per cell; 0 = enough for the cell's cluster.num_workers at gpus_per_node")
    gpus_per_node: int = opt(8, "GPUs per node (one Ray Train worker each)")
    cpus_per_task: int = opt(0, "sbatch --cpus-per-task (one task per node runs Ray); 0 = SLURM's default")
    mem: str = opt("", "sbatch --mem per node, e.g. 256G; empty = SLURM's default")
    time: str = opt("24:00:00", "sbatch --time per job (a requeued job starts a new one), e.g. 2-00:00:00")
    array_parallelism: int = opt(0, "cells running at once (sbatch --array=...%N); 0 = no cap")
    sbatch: list[str] = opt([], "more sbatch options, e.g. ['--constraint=a100', '--exclusive']")


@dataclass
class EarlyStopping:
    """ASHA (Tune's AsyncHyperBandScheduler) on the cells' periodic eval mIoU, the training iteration as its
    clock: at each rung (grace_period x reduction_factor^k iterations) a cell whose mIoU is below the
    (1 - 1/reduction_factor) quantile of the cells that reached that rung before it is stopped. Only
    evaluations that fall on a checkpoint reach Tune (those are what Ray Train reports)."""

    enabled: bool = opt(False, "stop hopeless cells early (an `early_stopping:` mapping in the file turns it on)")
    grace_period: int = opt(0, "iterations a cell trains before it can be stopped (ASHA's first rung); 0 = the "
                               "first iteration at which every cell has reported an evaluation")
    reduction_factor: float = opt(4.0, "> 1: rungs are grace_period x reduction_factor^k iterations apart, and "
                                       "a cell must be in the top 1/reduction_factor at a rung to go on")


@dataclass
class RayBackend:
    address: str = opt("", "Ray cluster's dashboard (http://head:8265) for the Ray Tune backend; empty = "
                           "--address or RAY_ADDRESS")
    max_concurrent_trials: int = opt(0, "cells training at once; 0 = as many as the cluster fits")
    trial_cpus: float = opt(0.1, "CPUs a cell's Tune trial holds besides its Ray Train workers (it only waits)")
    experiment_uri: str = opt("", "where Tune keeps the sweep's experiment state (shared by every node); "
                                  "empty = <first cell's storage.checkpoint_uri>/_tune/<sweep>")
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)


@dataclass
class Backend:
    default: str = opt("slurm", "backend of `sweep launch` without --backend: slurm (a job per cell), ray (Tune on "
                                "a Ray cluster) or slurm-ray (Tune on a Ray cluster inside one SLURM allocation)")
    slurm: SlurmBackend = field(default_factory=SlurmBackend)
    ray: RayBackend = field(default_factory=RayBackend)


BACKENDS = ("slurm", "ray", "slurm-ray")


def _check(backend: Backend) -> None:
    if backend.default not in BACKENDS:
        raise ConfigError(f"backend.default: expected one of {', '.join(BACKENDS)}, got {backend.default!r}")
    slurm = backend.slurm
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "array_parallelism"):
        if getattr(slurm, key) < 0:
            raise ConfigError(f"backend.slurm.{key}: must be >= 0, got {getattr(slurm, key)}")
    if not SLURM_TIME.match(slurm.time):
        raise ConfigError(f"backend.slurm.time: expected an sbatch time such as 240, 24:00:00 or 2-00:00:00, "
                          f"got {slurm.time!r}")
    if slurm.mem and not SLURM_MEM.match(slurm.mem):
        raise ConfigError(f"backend.slurm.mem: expected an sbatch size such as 64G or 0, got {slurm.mem!r}")
    bad = [opt for opt in slurm.sbatch if not opt.startswith("--")]
    if bad:
        raise ConfigError(f"backend.slurm.sbatch: expected long options such as '--constraint=a100', got {bad[0]!r}")
    if backend.ray.max_concurrent_trials < 0:
        raise ConfigError(f"backend.ray.max_concurrent_trials: must be >= 0, got {backend.ray.max_concurrent_trials}")
    if backend.ray.trial_cpus < 0:
        raise ConfigError(f"backend.ray.trial_cpus: must be >= 0, got {backend.ray.trial_cpus}")
    stopping = backend.ray.early_stopping
    if stopping.grace_period < 0:
        raise ConfigError(f"backend.ray.early_stopping.grace_period: expected iterations >= 0 (0 = the cells' "
                          f"first evaluation), got {stopping.grace_period}")
    if not stopping.reduction_factor > 1:
        raise ConfigError(f"backend.ray.early_stopping.reduction_factor: expected a number > 1 (ASHA keeps the "
                          f"top 1/reduction_factor at each rung), got {stopping.reduction_factor:g}")


def _early_stopping_on(data: Any) -> Any:
    """`early_stopping: {...}` turns it on unless it says `enabled: false`; `early_stopping: true` too."""
    ray = data.get("ray") if isinstance(data, dict) else None
    if not isinstance(ray, dict) or "early_stopping" not in ray:
        return data
    given = ray["early_stopping"]
    if isinstance(given, bool):
        given = {"enabled": given}
    elif isinstance(given, dict) and "enabled" not in given:
        given = {"enabled": True, **given}
    return {**data, "ray": {**ray, "early_stopping": given}}


def from_dict(data: Any) -> Backend:
    """A Backend from the grid's `backend:` mapping (None = all defaults); ConfigError on bad input."""
    backend = config._build(Backend, {} if data is None else _early_stopping_on(data), "backend")
    _check(backend)
    return backend
