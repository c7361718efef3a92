"""`sweep launch`: submit a grid's missing cells to SLURM as one job array (submitit), and record it.

A cell is submitted when the results store has no completed row for its run id (in any sweep: the
run id hashes what is trained and the dataset's fingerprint, filled in from its manifest before the
cell's config is sent, so the task, the driver and the rows share it) and no live job of an earlier
launch (from the launch records, checked against squeue). Cells with the same resource shape (nodes, GPUs per node) share
one array (`--array=0-N%P`, P = backend.slurm.array_parallelism); a grid whose cells need different
shapes makes one array per shape. Every task runs ocr_cluster.sweep.task.CellTask: a private Ray head
and `python -m ocr_cluster.train` on the cell's config; a cell over N nodes is one job of N tasks, whose
other tasks join the head as Ray nodes.

The submitit folder (scripts, pickles, logs; it must be on a filesystem the nodes share) is
<folder>/<sweep>/launch-<UTC time>/, with <folder> = --folder or ./sweeps_runs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocr_cluster import storage
from ocr_cluster.config import Config
from ocr_cluster.sweep import records, slurm
from ocr_cluster.sweep.grid import Cell, Grid, SweepError, resolve
from ocr_cluster.sweep.ray_head import TOKEN_VAR
from ocr_cluster.sweep.status import (COMPLETED, LIVE, STOPPED, UNREAD, CellStatus, cell_states, ended, keeps_stopped,
                                      with_store)

DEFAULT_FOLDER = "sweeps_runs"


@dataclass
class Launch:
    statuses: list[CellStatus]                    # every cell, before submitting
    todo: list[CellStatus]                        # what is (or would be) submitted
    jobs: dict[str, str] = field(default_factory=dict)   # run id -> SLURM job id
    arrays: list[str] = field(default_factory=list)      # the array job ids
    folder: Path | None = None
    record_uris: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cells(self) -> list[Cell]:
        return [s.cell for s in self.statuses]

    def counts(self) -> str:
        """'N completed, M queued or running' before submitting."""
        done = sum(s.state == COMPLETED for s in self.statuses)
        stopped = sum(s.state == STOPPED for s in self.statuses)
        return (f"{done} completed, " + (f"{stopped} stopped early, " if stopped else "")
                + f"{sum(s.state in LIVE for s in self.statuses)} queued or running")


def absolute_paths(cfg: Config) -> Config:
    """Local URIs made absolute: the task runs in the submit directory, the Ray workers elsewhere."""
    def fix(uri: str) -> str:
        return storage.local_path(uri) if uri and not storage.is_remote(uri) else uri

    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, pretrained=fix(cfg.model.pretrained),
                                       pretrained_backbone=fix(cfg.model.pretrained_backbone)),
        data=dataclasses.replace(cfg.data, uri=fix(cfg.data.uri)),
        storage=dataclasses.replace(cfg.storage, checkpoint_uri=fix(cfg.storage.checkpoint_uri)),
        results=dataclasses.replace(cfg.results, store_uri=fix(cfg.results.store_uri)))


def prepare(grid: Grid, store: str | None, notes: list[str] | None = None) -> list[Cell]:
    """The grid's cells as they run: on `store`, local paths absolute, run ids resolved for their datasets
    (grid.resolve; its warning lines go to `notes`)."""
    cells = [Cell(c.name, absolute_paths(c.config), c.axes) for c in with_store(grid.cells(), store)]
    cells, lines = resolve(cells)
    if notes is not None:
        notes += lines
    return cells


@dataclass(frozen=True)
class Shape:
    """What one cell's SLURM job asks for: `nodes` nodes, one task each, `gpus` GPUs per node."""
    nodes: int
    gpus: int


def shape_of(cell: Cell, grid: Grid) -> Shape:
    """The cell's nodes and GPUs per node; SweepError (one line) when cluster.num_workers does not fit them.

    A GPU cell has one Ray Train worker per GPU: over several nodes its num_workers must be exactly
    nodes x gpus_per_node (nodes: 0 = as many full nodes as num_workers needs). A CPU cell's workers are
    spread evenly over its nodes (num_workers a multiple of nodes)."""
    backend, cfg = grid.backend.slurm, cell.config
    workers, per_node = max(cfg.cluster.num_workers, 1), backend.gpus_per_node
    if not cfg.cluster.use_gpu:
        nodes = max(backend.nodes, 1)
        if workers % nodes:
            raise grid.error(f"cell {cell.name}: cluster.num_workers {workers} does not spread evenly over "
                             f"backend.slurm.nodes {nodes}; use a multiple of {nodes}")
        return Shape(nodes, 0)
    nodes = backend.nodes or (-(-workers // per_node) if per_node else 1)
    if nodes == 1:
        if per_node and workers > per_node:
            raise grid.error(f"cell {cell.name}: cluster.num_workers {workers} needs more GPUs than one node's "
                             f"backend.slurm.gpus_per_node {per_node}; set backend.slurm.nodes (or 0)")
        return Shape(1, workers)
    if not per_node or workers != nodes * per_node:
        raise grid.error(f"cell {cell.name}: cluster.num_workers {workers} must be backend.slurm.nodes {nodes} x "
                         f"gpus_per_node {per_node} = {nodes * per_node} (one Ray Train worker per GPU)")
    return Shape(nodes, per_node)


def cell_yaml(cell: Cell, shape: Shape) -> str:
    """The config a task runs: a multi-node CPU cell spreads its workers over the nodes (Ray Train packs
    them on the fewest nodes otherwise); not hashed, so the run id is unchanged."""
    cfg = cell.config
    if shape.nodes > 1 and not cfg.cluster.use_gpu and cfg.cluster.placement_strategy == "PACK":
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, placement_strategy="SPREAD"))
    return cfg.to_yaml()


def sbatch_extras(options: list[str]) -> dict[str, Any]:
    """['--constraint=a100', '--exclusive'] -> {'constraint': 'a100', 'exclusive': True}."""
    out: dict[str, Any] = {}
    for option in options:
        key, sep, value = option[2:].partition("=")
        out[key] = value if sep else True
    return out


def parameters(grid: Grid, shape: Shape, count: int) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for an array of `count` cells of one shape (one task per node)."""
    backend = grid.backend.slurm
    extra = {"requeue": True}  # preemption and `scontrol requeue` put the task back in the queue
    if backend.account:
        extra["account"] = backend.account
    if backend.mem:
        extra["mem"] = backend.mem
    extra.update(sbatch_extras(backend.sbatch))
    params: dict[str, Any] = {"job_name": grid.name, "time": slurm.minutes(backend.time), "nodes": shape.nodes,
                              "ntasks_per_node": 1, "array_parallelism": backend.array_parallelism or count,
                              "additional_parameters": extra}
    for key in ("partition", "qos"):
        if getattr(backend, key):
            params[key] = getattr(backend, key)
    if backend.cpus_per_task:
        params["cpus_per_task"] = backend.cpus_per_task
    if shape.gpus:
        params["gpus_per_node"] = shape.gpus
    return params


def plan_launch(grid: Grid, store: str | None = None, check: bool = True, rerun_stopped: bool = False) -> Launch:
    """Every cell's state and the cells to submit as a job array; SlurmError when SLURM cannot be used
    (if `check`)."""
    for cell in grid.cells():
        shape_of(cell, grid)
    if check:
        slurm.check_cluster(grid.backend.slurm.partition)
    return cells_to_submit(grid, store, ask_slurm=check, rerun_stopped=rerun_stopped)


def cells_to_submit(grid: Grid, store: str | None, *, ask_slurm: bool, ask_ray: bool = False,
                    rerun_stopped: bool = False) -> Launch:
    """Every cell's state (from the store, the launch records and, if asked, SLURM / Ray's job API) and the
    cells with no completed row and no live job; SweepError when the store cannot be read. A cell stopped
    early stays stopped while the grid's early stopping is on, unless `rerun_stopped` (status.keeps_stopped):
    then it is submitted again and continues from its checkpoint."""
    resolving: list[str] = []
    cells = prepare(grid, store, resolving)
    statuses, notes = cell_states(cells, grid.name, ask_slurm=ask_slurm, ask_ray=ask_ray)
    notes = resolving + notes
    unread = [s for s in statuses if s.state == UNREAD]
    if unread:
        raise SweepError(f"cannot read the results store {unread[0].cell.config.results.store_uri}, so it is not "
                         f"known which cells are completed; nothing was submitted ({notes[0] if notes else ''})")
    keep = keeps_stopped(grid, rerun_stopped)
    todo = [s for s in statuses if not ended(s, keep) and s.state not in LIVE]
    return Launch(statuses, todo, notes=notes)


def submitit_folder(grid: Grid, folder_root: str | Path | None) -> Path:
    """<folder_root or ./sweeps_runs>/<sweep>/launch-<UTC time>/, absolute: where one launch's jobs log."""
    now = dt.datetime.now(dt.timezone.utc)
    return (Path(folder_root or DEFAULT_FOLDER) / grid.name / f"launch-{now:%Y%m%dT%H%M%S%fZ}").absolute()


def submit(grid: Grid, launch: Launch, folder_root: str | Path | None = None) -> Launch:
    """Submit `launch.todo`; write the launch record(s) and the sweep's manifest."""
    import submitit

    from ocr_cluster.results import write_sweep_manifest
    from ocr_cluster.results.rows import git_sha
    from ocr_cluster.sweep.task import CellTask

    launch.folder = submitit_folder(grid, folder_root)
    groups: dict[Shape, list[CellStatus]] = {}
    for status in launch.todo:
        groups.setdefault(shape_of(status.cell, grid), []).append(status)
    submitted_params = []
    # The private Ray clusters' token: multi-node tasks read it from the environment sbatch passes on,
    # never from a file (the head's address is in the submitit folder; the token must not be).
    os.environ.setdefault(TOKEN_VAR, secrets.token_hex(32))
    for shape, group in groups.items():
        executor = submitit.SlurmExecutor(folder=launch.folder)
        params = parameters(grid, shape, len(group))
        executor.update_parameters(**params)
        jobs = executor.map_array(CellTask(), [cell_yaml(s.cell, shape) for s in group])
        for status, job in zip(group, jobs):
            launch.jobs[status.cell.run_id] = str(job.job_id)
        launch.arrays.append(str(jobs[0].job_id).split("_", 1)[0])
        submitted_params.append(params)

    by_store: dict[str, list[Cell]] = {}
    for status in launch.statuses:
        by_store.setdefault(status.cell.config.results.store_uri, []).append(status.cell)
    for store_uri, cells in by_store.items():
        mine = [s for s in launch.todo if s.cell.config.results.store_uri == store_uri]
        body = {
            "grid": str(grid.label), "axes": [a.name for a in grid.axes], "array_job_ids": launch.arrays,
            "cells": [{"name": s.cell.name, "run_id": s.cell.run_id, "axes": s.cell.axes,
                       "job_id": launch.jobs[s.cell.run_id]} for s in mine],
            "backend": {"slurm": records.backend_dict(grid.backend.slurm)}, "sbatch": submitted_params,
            "submitit_folder": str(launch.folder), "git_sha": git_sha(),
        }
        launch.record_uris.append(records.write_record(store_uri, grid.name, "launch", body))
        write_sweep_manifest(store_uri, grid.name, [{"run_id": c.run_id, "name": c.name,
                                                "axes": json.dumps(c.axes, default=str)}  # axis order kept
                                               for c in cells])
    return launch
