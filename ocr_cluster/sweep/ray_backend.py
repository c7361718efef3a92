"""`sweep launch | status | cancel --backend ray`: the grid's missing cells as one Ray job running Tune.

The launch writes the cells to do (their resolved configs) to a cells file next to the sweep's Tune
experiments (shared storage: the job's driver may run on any node), then submits one Ray job through the
dashboard's job API (JobSubmissionClient) whose entrypoint is `python -m ocr_cluster.sweep.tune --cells URI`.
The job's runtime env ships this package (py_modules, as a driver that joins a cluster does) and the
non-secret object-storage settings; credentials only with --with-secrets. The submission id is ours
(ocr-sweep-<sweep>-<time>), so the launch record names it before the job starts and the rows
(scheduler_job_id, launcher "tune") name the same id. `sweep cancel` stops that job; `ray job stop` does
the same. Relaunching restores the experiment (ocr_cluster.sweep.tune).
"""

from __future__ import annotations

import os
import re
import shlex
from contextlib import contextmanager

from ocr_cluster.sweep.grid import SweepError

# Ray job states (ray.job_submission.JobStatus values) of a job that still runs or will.
LIVE_JOB_STATES = {"PENDING", "RUNNING"}


class RayBackendError(SweepError):
    """The Ray cluster cannot be used (no address, dashboard unreachable); one line, exit 2."""


def address_of(grid, given: str | None) -> str:
    """--address, else backend.ray.address, else RAY_ADDRESS; RayBackendError with none."""
    address = given or grid.backend.ray.address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise RayBackendError("no Ray cluster for --backend ray: give --address http://HEAD:8265, set "
                              "backend.ray.address in the grid file, or export RAY_ADDRESS; nothing was submitted")
    return address


@contextmanager
def _only(address: str):
    """Ray lets RAY_ADDRESS override the address a client is given: the one given wins here."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield address
    finally:
        os.environ.update(saved)


CONNECT_PATIENCE_S = 60  # a head under load can refuse connections for a while (its dashboard busy or restarting)


def client(address: str, patience_s: float = CONNECT_PATIENCE_S):
    """A JobSubmissionClient for the cluster's dashboard (its auth token, if any, from Ray's usual places).
    A refused connection is tried again for `patience_s`; anything else fails at once."""
    import time

    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + patience_s
    while True:
        try:
            with _only(address):
                return JobSubmissionClient(address)
        except ConnectionError as exc:
            failure = exc
            if time.monotonic() < deadline:
                time.sleep(3)
                continue
        except Exception as exc:  # noqa: BLE001 - refused, wrong token: one line
            failure = exc
        text = str(failure).strip().splitlines()
        raise RayBackendError(f"cannot reach the Ray cluster's job API at {address}: "
                              f"{text[-1] if text else type(failure).__name__}") from None


def job_states(job_ids: dict[str, str]) -> dict[str, str]:
    """job id -> Ray job status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED) for {job id: address};
    a job or a cluster that cannot be asked is absent."""
    out: dict[str, str] = {}
    clients: dict[str, object] = {}
    for job_id, address in job_ids.items():
        try:
            if address not in clients:
                clients[address] = client(address, patience_s=10)
            out[job_id] = str(clients[address].get_job_status(job_id).value)
        except Exception:  # noqa: BLE001 - unknown job or cluster gone: status shows it as ended
            continue
    return out


def submission_id(sweep: str, stamp: str) -> str:
    return f"ocr-sweep-{re.sub(r'[^A-Za-z0-9_-]+', '-', sweep)[:60]}-{stamp}"


def write_cells(grid, todo_cells, now: str, job_id: str | None = None) -> tuple[str, str]:
    """The cells file the Tune driver reads (`python -m ocr_cluster.sweep.tune --cells URI`), next to the
    sweep's experiments on shared storage: (its URI, the experiment root)."""
    import dataclasses
    import json

    from ocr_cluster import storage
    from ocr_cluster.sweep import tune

    root = tune.experiment_root(grid.name, todo_cells, grid.backend.ray.experiment_uri)
    ray_opts = {**dataclasses.asdict(grid.backend.ray), "experiment_root": root}
    ray_opts.pop("address")
    body = {"sweep": grid.name, "job_id": job_id, "ray": ray_opts,
            "cells": [{"name": c.name, "run_id": c.run_id, "axes": c.axes, "config_yaml": c.config.to_yaml()}
                      for c in todo_cells]}
    uri = storage.write_bytes_atomic(storage.join(root, f"cells-{now}.json"), json.dumps(body, default=str).encode())
    return uri, root


def submit(grid, todo_cells, address: str, *, with_secrets: bool = False) -> tuple[str, str, str]:
    """Write the cells file and submit the job; (job id, cells file URI, experiment root)."""
    import ocr_cluster
    from ocr_cluster import runtime_env
    from ocr_cluster.results.rows import LAUNCH_ENV
    from ocr_cluster.sweep import tune

    job_client = client(address)
    now = tune.stamp()
    job_id = submission_id(grid.name, now)
    cells_uri, root = write_cells(grid, todo_cells, now, job_id)
    env_vars = runtime_env.build(None, with_secrets=with_secrets)["env_vars"]
    env_vars.update({LAUNCH_ENV["launcher"]: tune.LAUNCHER, LAUNCH_ENV["scheduler_job_id"]: job_id})
    if address.startswith(("http://", "https://")):
        # Ray Train's controller asks the State API about itself; without an address it looks for "the"
        # local Ray instance and fails where a node hosts more than one.
        env_vars["RAY_API_SERVER_ADDRESS"] = address
    env = {"py_modules": [os.path.dirname(os.path.abspath(ocr_cluster.__file__))], "excludes": ["__pycache__"],
           "env_vars": env_vars}
    try:
        job_client.submit_job(entrypoint=f"python -m ocr_cluster.sweep.tune --cells {shlex.quote(cells_uri)}",
                              submission_id=job_id, runtime_env=env,
                              metadata={"ocr_cluster_sweep": grid.name},
                              entrypoint_num_cpus=0)
    except Exception as exc:  # noqa: BLE001 - refused by the cluster: one line
        text = str(exc).strip().splitlines()
        raise RayBackendError(f"the Ray cluster at {address} refused the sweep's job: "
                              f"{text[-1] if text else type(exc).__name__}") from None
    return job_id, cells_uri, root


def stop(job_ids: dict[str, str]) -> list[str]:
    """Stop Ray jobs ({job id: address}); the ids the job API accepted."""
    done = []
    for job_id, address in job_ids.items():
        try:
            client(address, patience_s=30).stop_job(job_id)
            done.append(job_id)
        except Exception:  # noqa: BLE001 - already ended or cluster gone
            continue
    return done


def logs(job_id: str, address: str) -> str:
    try:
        return client(address).get_job_logs(job_id)
    except Exception:  # noqa: BLE001
        return ""


def cmd_launch(args, grid) -> int:
    """`sweep launch GRID --backend ray`: submit the missing cells as one Ray job; --wait follows it."""
    import sys

    from ocr_cluster import storage
    from ocr_cluster.sweep import records, slurm
    from ocr_cluster.sweep.launch import cells_to_submit
    address = address_of(grid, args.address) if not args.dry_run else (
        args.address or grid.backend.ray.address or os.environ.get("RAY_ADDRESS") or "(no address given)")
    launch = cells_to_submit(grid, args.store, ask_slurm=slurm.available(), ask_ray=True,
                             rerun_stopped=getattr(args, "rerun_stopped", False))
    for note in launch.notes:
        print(f"warning: {note}", file=sys.stderr)
    statuses, todo, cells = launch.statuses, launch.todo, launch.cells
    if not todo:
        print(f"sweep {grid.name}: nothing to submit ({launch.counts()}, {len(statuses)} cells)")
        return 0
    if args.dry_run:
        print(f"sweep {grid.name}: would submit {len(todo)} of {len(statuses)} cells as one Ray Tune job to "
              f"{address} ({launch.counts()})")
        for s in todo:
            print(f"  {s.cell.name}  {s.cell.run_id}  ({s.state})")
        return 0
    job_id, cells_uri, root = submit(grid, [s.cell for s in todo], address, with_secrets=args.with_secrets)
    record_uris = []
    for store_uri in dict.fromkeys(s.cell.config.results.store_uri for s in statuses):
        mine = [s for s in todo if s.cell.config.results.store_uri == store_uri]
        body = {"grid": str(grid.label), "axes": [a.name for a in grid.axes], "backend_kind": "ray",
                "address": storage.redact(address), "ray_job_id": job_id, "tune_experiments": root,
                "cells_file": cells_uri,
                "cells": [{"name": s.cell.name, "run_id": s.cell.run_id, "axes": s.cell.axes, "job_id": job_id}
                          for s in mine],
                "backend": {"ray": records.backend_dict(grid.backend.ray)}}
        record_uris.append(records.write_record(store_uri, grid.name, "launch", body))
    _write_manifest(grid, statuses)
    print(f"sweep {grid.name}: submitted {len(todo)} of {len(statuses)} cells as Ray job {job_id} on {address} "
          f"({launch.counts()} before)")
    for s in todo:
        print(f"  {job_id}  {s.cell.name}  {s.cell.run_id}")
    print(f"launch record: {', '.join(record_uris)}")
    print(f"Tune experiments: {root}")
    print(f"follow it with: ocr-cluster sweep status {args.grid}" + (f" --store {args.store}" if args.store else "")
          + f"  (or: ray job logs --follow --address {address} {job_id})")
    if not args.wait:
        return 0
    from ocr_cluster.sweep.slurm_commands import all_ended, follow

    statuses = follow(grid, cells, args.interval, only={s.cell.run_id for s in todo})
    return 0 if all_ended(grid, statuses) else 1


def _write_manifest(grid, statuses) -> None:
    import json

    from ocr_cluster.results import write_sweep_manifest

    by_store: dict[str, list] = {}
    for status in statuses:
        by_store.setdefault(status.cell.config.results.store_uri, []).append(status.cell)
    for store_uri, cells in by_store.items():
        write_sweep_manifest(store_uri, grid.name, [{"run_id": c.run_id, "name": c.name,
                                                     "axes": json.dumps(c.axes, default=str)} for c in cells])


def ray_jobs_of(cells, sweep: str) -> dict[str, str]:
    """The sweep's Ray jobs named by the newest launch of each cell: {job id: address}."""
    from ocr_cluster.sweep import records

    out: dict[str, str] = {}
    for store_uri in dict.fromkeys(c.config.results.store_uri for c in cells):
        subs = records.submitted(records.read_records(store_uri, sweep))
        for cell in cells:
            sub = subs.get(cell.run_id)
            if sub and sub.backend == "ray":
                out[sub.job_id] = sub.address
    return out
