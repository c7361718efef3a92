"""`sweep launch --backend slurm-ray`: Ray Tune over a grid's missing cells, inside one SLURM allocation.

For sites without a standing Ray cluster: one SLURM job of backend.slurm.nodes nodes (one task per node,
backend.slurm.gpus_per_node GPUs each) forms a private Ray cluster as a multi-node cell does (task 0's
head, the others joined; ocr_cluster.sweep.task.SweepTask), and task 0 runs the Ray Tune driver
(`python -m ocr_cluster.sweep.tune --cells URI`) on it, so the cells' trials are packed into the
allocation, backend.ray.max_concurrent_trials at a time. Every trial is the single job's training entry:
rows (launcher "slurm-tune", scheduler_job_id the SLURM job), checkpoints and resume are shared with the
other launchers. The launch record names that one job for every cell, so `sweep status` and `sweep
cancel` treat the cells as SLURM cells of that job. A preempted or requeued allocation restores the Tune
experiment and its trials resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys

from ocr_cluster.sweep.grid import Grid
from ocr_cluster.sweep.launch import Shape, cells_to_submit, parameters, submitit_folder

BACKEND_KIND = "slurm-ray"


def allocation_shape(grid: Grid, cells) -> Shape:
    """The allocation: backend.slurm.nodes (at least 1) x gpus_per_node (0 for CPU-only grids); a cell
    that cannot fit in it is one line naming the cell."""
    backend = grid.backend.slurm
    nodes = max(backend.nodes, 1)
    uses_gpu = any(c.config.cluster.use_gpu for c in cells)
    shape = Shape(nodes, backend.gpus_per_node if uses_gpu else 0)
    for cell in cells:
        workers = max(cell.config.cluster.num_workers, 1)
        if cell.config.cluster.use_gpu and workers > nodes * shape.gpus:
            raise grid.error(f"cell {cell.name}: cluster.num_workers {workers} GPUs do not fit in the allocation of "
                             f"backend.slurm.nodes {nodes} x gpus_per_node {shape.gpus}")
    return shape


def cmd_launch(args: argparse.Namespace, grid: Grid) -> int:
    """Submit the missing cells as one SLURM job hosting Ray Tune; --wait follows the cells."""
    import submitit

    from ocr_cluster.results.rows import git_sha
    from ocr_cluster.sweep import records, slurm, tune
    from ocr_cluster.sweep.ray_backend import _write_manifest, write_cells
    from ocr_cluster.sweep.ray_head import TOKEN_VAR
    from ocr_cluster.sweep.task import SweepTask

    shape = allocation_shape(grid, grid.cells())
    if not args.dry_run:
        slurm.check_cluster(grid.backend.slurm.partition)
    launch = cells_to_submit(grid, args.store, ask_slurm=slurm.available(),
                             rerun_stopped=getattr(args, "rerun_stopped", False))
    for note in launch.notes:
        print(f"warning: {note}", file=sys.stderr)
    statuses, todo = launch.statuses, launch.todo
    if not todo:
        print(f"sweep {grid.name}: nothing to submit ({launch.counts()}, {len(statuses)} cells)")
        return 0
    params = {**parameters(grid, shape, 1), "job_name": f"{grid.name}-tune"}
    params.pop("array_parallelism")
    if args.dry_run:
        print(f"sweep {grid.name}: would submit {len(todo)} of {len(statuses)} cells as one SLURM job hosting Ray "
              f"Tune ({launch.counts()}); sbatch parameters: {json.dumps(params)}")
        for s in todo:
            print(f"  {s.cell.name}  {s.cell.run_id}  ({s.state})")
        return 0

    folder = submitit_folder(grid, args.folder)
    cells_uri, root = write_cells(grid, [s.cell for s in todo], tune.stamp())
    os.environ.setdefault(TOKEN_VAR, secrets.token_hex(32))  # the nodes' shared token: environment only
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    job_id = str(executor.submit(SweepTask(), cells_uri).job_id)
    record_uris = []
    for store_uri in dict.fromkeys(s.cell.config.results.store_uri for s in statuses):
        mine = [s for s in todo if s.cell.config.results.store_uri == store_uri]
        body = {"grid": str(grid.label), "axes": [a.name for a in grid.axes], "backend_kind": BACKEND_KIND,
                "array_job_ids": [job_id], "tune_experiments": root, "cells_file": cells_uri,
                "cells": [{"name": s.cell.name, "run_id": s.cell.run_id, "axes": s.cell.axes, "job_id": job_id}
                          for s in mine],
                "backend": {"slurm": records.backend_dict(grid.backend.slurm),
                            "ray": records.backend_dict(grid.backend.ray)},
                "sbatch": [params], "submitit_folder": str(folder), "git_sha": git_sha()}
        record_uris.append(records.write_record(store_uri, grid.name, "launch", body))
    _write_manifest(grid, statuses)
    print(f"sweep {grid.name}: submitted {len(todo)} of {len(statuses)} cells as SLURM job {job_id} hosting Ray "
          f"Tune on {shape.nodes} node(s) ({launch.counts()} before)")
    for s in todo:
        print(f"  {job_id}  {s.cell.name}  {s.cell.run_id}")
    print(f"launch record: {', '.join(record_uris)}")
    print(f"submitit folder: {folder}")
    print(f"Tune experiments: {root}")
    print(f"follow it with: ocr-cluster sweep status {args.grid}" + (f" --store {args.store}" if args.store else ""))
    if not args.wait:
        return 0
    from ocr_cluster.sweep.slurm_commands import all_ended, follow

    statuses = follow(grid, launch.cells, args.interval, only={s.cell.run_id for s in todo})
    return 0 if all_ended(grid, statuses) else 1
