"""One SLURM array task = one cell, run exactly as `ray job submit` runs a job.

The task starts a private Ray head for its allocation (ocr_cluster.sweep.ray_head), runs the training
entry `python -m ocr_cluster.train CELL.yaml` with RAY_ADDRESS set to that head, and stops the head by
its process group at the end, on failure and on signals. A cell over several nodes is one job with one
task per node: task 0 does the above on its node's address once the others joined its head as Ray nodes
(ocr_cluster.sweep.multinode); they stay until it is done. Training, resume and the result rows are the
driver's: this shim only supplies the cluster and the bookkeeping around it.

Preemption and time limits: the task is submitit-checkpointable. On SLURM's --signal (USR2) submitit
calls `checkpoint()`, which stops the driver and Ray and hands back the same call; submitit requeues the
job, and the requeued driver resumes from the run's latest checkpoint (keyed on its run id). An attempt
that is stopped this way, or by SLURM's SIGTERM (scontrol requeue, scancel, preemption), writes no
failed row. A cell that fails for good has a failed row: the driver's own after training failed, else
(preflight, Ray not starting) one written here with the driver's one-line error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import submitit

from ocr_cluster.ray_defaults import OWN_CLUSTER_ENV, under

# Process handles of the running attempt. Kept out of the callable: submitit pickles it on checkpoint.
_RUNNING: dict[str, Any] = {}
# An exit by any of these means the driver was stopped (Ray's SIGTERM handler exits with 15), not that it failed.
_KILLED = {15, 143}


class CellFailed(RuntimeError):
    """The cell failed for good; the message is the driver's one-line error."""


class CellInterrupted(RuntimeError):
    """The attempt was stopped by a signal (requeue, preemption, cancel); no failed row is written."""


def _job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _cpus(cfg, nodes: int = 1) -> int:
    """Logical CPUs for one node's Ray: the allocation's, and at least its share of the workers' plus two
    for Ray Data."""
    allocated = int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    workers = -(-max(cfg.cluster.num_workers, 1) // nodes) * (cfg.cluster.cpus_per_worker or 1)
    return max(allocated, int(workers) + 2)


def _stop_running(timeout: float = 10.0) -> None:
    """Stop the driver (first, so that it cannot see Ray vanish and record a failure), then Ray."""
    driver = _RUNNING.pop("driver", None)
    if driver is not None and driver.poll() is None:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        driver.wait()
    head = _RUNNING.pop("head", None)
    if head is not None:
        head.stop(timeout)


def _tee(stream, sink, keep: deque) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        keep.append(line)


def _error_line(lines: deque, returncode: int) -> str:
    """The driver's one-line error (`...: error: ...`), else its last line."""
    text = [ln.strip() for ln in lines if ln.strip()]
    errors = [ln for ln in text if ": error: " in ln]
    line = errors[-1].split(": error: ", 1)[1] if errors else (text[-1] if text else "")
    return line or f"the training entry exited with code {returncode}"


def _attempts(cfg) -> int:
    from ocr_cluster.results import read_attempts

    return read_attempts(cfg.results.store_uri, dataset=cfg.data.dataset, run_id=cfg.run_id).num_rows


def _write_failed(cfg, error: str, before: int | None) -> None:
    """A failed row, unless the driver wrote one (its attempts grew) or the store cannot be reached."""
    from ocr_cluster.results import row_from_config, write_run

    try:
        now = _attempts(cfg)
        if before is not None and now > before:
            return
        world = max(cfg.cluster.num_workers, 1)
        write_run(cfg.results.store_uri, row_from_config(cfg, status="failed", error=error, attempt=now + 1,
                                                         num_gpus=world if cfg.cluster.use_gpu else 0))
    except Exception as exc:  # noqa: BLE001 - the store itself may be what is wrong
        print(f"could not write the failed row to {cfg.results.store_uri}: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)


# Ray's own limit for a raylet to register is 30 s, which an overloaded node can miss: start again then.
HEAD_STARTS = 3
SLOW_START = "timed out during startup"


def _start_head(cpus: int, nodes: int, base_env: dict[str, str], stopped: threading.Event):
    """The cell's private head, registered so that signals stop it: on 127.0.0.1 for one node, else on
    this node's address with the launch's token (multinode). Started again (new ports, new temp dir)
    when Ray gave up waiting for its own raylet."""
    from ocr_cluster.sweep import multinode
    from ocr_cluster.sweep.ray_head import RayHeadError, spawn_head

    where = {"node_ip": multinode.node_ip(), "token": multinode.token()} if nodes > 1 else {}
    for start in range(1, HEAD_STARTS + 1):
        head = _RUNNING["head"] = spawn_head(cpus, base_env=base_env, **where)
        print(f"private Ray head {head.address}, temp dir {head.temp_dir}", flush=True)
        try:
            return head.wait_ready()
        except RayHeadError as exc:
            if SLOW_START not in str(exc) or start == HEAD_STARTS or stopped.is_set():
                raise
            print(f"the private Ray head did not come up in time ({start}/{HEAD_STARTS}); starting it again",
                  flush=True)
    raise AssertionError("unreachable")


class _AllocationTask(submitit.helpers.Checkpointable):
    """What every task of ours does on its SLURM allocation: a private Ray cluster (one node, or task 0's
    head joined by the other tasks), one driver process on task 0 with RAY_ADDRESS set to it, everything
    stopped by process group at the end, on failure and on signals. Subclasses say what the driver is."""

    launcher = "slurm"

    def _attempt(self, *, job_id: str, cpus: int, command: list[str], result: dict[str, Any],
                 attempts: Callable[[], int] | None = None,
                 write_failed: Callable[[str, int | None], None] | None = None) -> dict[str, Any]:
        """Run `command` on this allocation's Ray. `attempts` / `write_failed`: the results store's view,
        so that a failure the driver did not record gets a failed row."""
        from ocr_cluster.sweep import multinode
        from ocr_cluster.sweep.ray_head import TOKEN_VAR

        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        stopped = threading.Event()
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):  # SLURM's requeue / cancel / preemption: the attempt is not a failure
            stopped.set()
            if callable(previous):
                previous(signum, frame)
            _stop_running(timeout=3)  # now: SLURM sends SIGKILL after its KillWait

        signal.signal(signal.SIGTERM, on_sigterm)
        # Read by results.rows for every row of this attempt: the driver's, the workers' (through the
        # head's environment) and a failed row written here.
        os.environ.update({"OCR_CLUSTER_LAUNCHER": self.launcher, "OCR_CLUSTER_JOB_ID": job_id,
                           "OCR_CLUSTER_RESTART_COUNT": restarts})
        base_env = dict(os.environ)
        nodes = multinode.num_nodes()
        rdv = multinode.Rendezvous(Path(os.environ.get("SUBMITIT_FOLDER", ".")), job_id, restarts, nodes)
        if nodes > 1 and multinode.rank() > 0:
            try:
                return {**result, **self._join(rdv, cpus, base_env, stopped)}
            finally:
                _stop_running()
                signal.signal(signal.SIGTERM, previous)
        fail = write_failed or (lambda error, before: None)
        before = None
        tail: deque = deque(maxlen=200)
        try:
            try:
                before = attempts() if attempts is not None else None
            except Exception:  # noqa: BLE001 - the driver's preflight names what is wrong with the store
                pass
            try:
                head = _start_head(cpus, nodes, base_env, stopped)
                if nodes > 1:
                    rdv.publish_head(head.address)
                    waited = rdv.wait_joined(stopped)
                    print(f"all {nodes} nodes joined the cell's Ray cluster ({waited:.1f}s after the head)",
                          flush=True)
            except Exception as exc:  # noqa: BLE001
                if stopped.is_set():
                    raise CellInterrupted(f"stopped while starting Ray: {exc}") from None
                # The whole message (with Ray's log tail) goes to the task log, whose temp dir is gone;
                # the row gets one line: what happened and the log's last line.
                print(f"could not start the cell's Ray cluster: {exc}", file=sys.stderr, flush=True)
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                what = lines[0].removesuffix("; log tail:") if lines else type(exc).__name__
                error = f"could not start the cell's Ray head: {what}" + (f" ({lines[-1]})" if len(lines) > 1 else "")
                if isinstance(exc, multinode.RendezvousError):
                    error = f"the cell's Ray cluster did not form: {what}"
                fail(error, before)
                raise CellFailed(error) from None
            env = {**under(base_env, OWN_CLUSTER_ENV), **head.env, "RAY_ADDRESS": head.address,
                   "PYTHONUNBUFFERED": "1"}
            env.pop(TOKEN_VAR, None)  # the driver has RAY_AUTH_TOKEN; nothing it starts needs the launch's
            driver = _RUNNING["driver"] = subprocess.Popen(command, env=env, stdout=None, stderr=subprocess.PIPE,
                                                           text=True, start_new_session=True)
            reader = threading.Thread(target=_tee, args=(driver.stderr, sys.stderr, tail), daemon=True)
            reader.start()
            while driver.poll() is None:
                time.sleep(0.5)  # signals (USR2, SIGTERM) are handled between sleeps
            reader.join(timeout=10)
            code = driver.returncode
            if code == 0:
                return {**result, "job_id": job_id, "status": "done"}
            if stopped.is_set() or code < 0 or code in _KILLED:
                raise CellInterrupted(f"the driver was stopped (exit {code}); SLURM requeues or ends the job")
            error = _error_line(tail, code)
            fail(error, before)
            raise CellFailed(error)
        finally:
            _stop_running()
            if nodes > 1:
                rdv.mark_done()  # the other nodes stop their Ray and end
            signal.signal(signal.SIGTERM, previous)

    def _join(self, rdv, cpus: int, base_env: dict[str, str], stopped: threading.Event) -> dict[str, Any]:
        """A task on another node of the allocation: its Ray joins the head until task 0 is done."""
        from ocr_cluster.sweep import multinode

        def register(node) -> None:
            if node is None:
                _RUNNING.pop("head", None)
            else:
                _RUNNING["head"] = node

        node_rank = multinode.rank()
        try:
            rejoins = multinode.join_until_done(rdv, node_rank, cpus, None, base_env, stopped, register)
        except multinode.RendezvousError as exc:
            if stopped.is_set():
                raise CellInterrupted(str(exc)) from None
            print(f"node task {node_rank}: {exc}", file=sys.stderr, flush=True)
            raise CellFailed(str(exc)) from None
        if stopped.is_set():
            raise CellInterrupted(f"node task {node_rank} was stopped; SLURM requeues or ends the job")
        print(f"node task {node_rank} done ({rejoins} rejoin(s))", flush=True)
        return {"node_rank": node_rank, "rejoins": rejoins, "status": "joined"}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Preempted or at the time limit: stop this attempt cleanly and requeue the same call (the
        driver resumes: a cell from its run's latest checkpoint, a Tune sweep by restoring its experiment)."""
        print("preempted / time limit: stopping the driver and Ray; the job is requeued", flush=True)
        _stop_running()
        return super().checkpoint(*args, **kwargs)


class CellTask(_AllocationTask):
    """The callable of every array task: `CellTask()(config_yaml)` trains one cell."""

    def __call__(self, config_yaml: str) -> dict[str, Any]:
        from ocr_cluster import config
        from ocr_cluster.sweep import multinode

        job_id = _job_id()
        cell_file = Path(os.environ.get("SUBMITIT_FOLDER", ".")) / f"{job_id}_cell.yaml"
        cell_file.write_text(config_yaml)
        cfg = config.load(cell_file)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"cell {cfg.run.name} (run {cfg.run_id}) as SLURM job {job_id}, restart {restarts}", flush=True)
        return self._attempt(job_id=job_id, cpus=_cpus(cfg, multinode.num_nodes()),
                             command=[sys.executable, "-m", "ocr_cluster.train", str(cell_file)],
                             result={"run_id": cfg.run_id, "name": cfg.run.name},
                             attempts=lambda: _attempts(cfg),
                             write_failed=lambda error, before: _write_failed(cfg, error, before))


class SweepTask(_AllocationTask):
    """One SLURM job that hosts a Ray cluster for a whole sweep: `SweepTask()(cells_uri)` runs the Ray
    Tune driver (ocr_cluster.sweep.tune --cells) over the cells file on the allocation's Ray, which packs
    the cells' trials into it. Each trial is the single job's training entry, which writes its own rows
    (failed ones too); a requeued job restores the Tune experiment."""

    launcher = "slurm-tune"

    def __call__(self, cells_uri: str) -> dict[str, Any]:
        from ocr_cluster.sweep import multinode, tune

        job_id = _job_id()
        body, cells = tune.read_cells(cells_uri)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"sweep {body['sweep']}: {len(cells)} cell(s) on one Ray cluster as SLURM job {job_id}, "
              f"restart {restarts}", flush=True)
        nodes = multinode.num_nodes()
        cpus = max((_cpus(cell.config, nodes) for cell in cells), default=1)  # each node fits a cell's share
        return self._attempt(job_id=job_id, cpus=cpus,
                             command=[sys.executable, "-m", "ocr_cluster.sweep.tune", "--cells", cells_uri],
                             result={"sweep": body["sweep"], "cells": len(cells)})
