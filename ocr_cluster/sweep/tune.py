"""The Ray Tune backend's driver: one Tune trial per cell, each running the single job's training entry.

    python -m ocr_cluster.sweep.tune GRID.yaml [--store URI]     foreground: inside `ray job submit`, or
                                                                  with RAY_ADDRESS / --address set
    python -m ocr_cluster.sweep.tune --cells URI                  what `sweep launch --backend ray` submits

A trial is a function trainable with a small CPU share (backend.ray.trial_cpus) that calls
ocr_cluster.train.driver.run on the cell's config, inside the trial: preflight, the completed-row check,
the TorchTrainer with name=run_id, its fit and its rows. So checkpoints, resume and rows are shared with
`ray job submit` and the SLURM arrays, and a cell with a completed row returns at once (never trained
twice, whatever launched it). Ray Train metrics reach Tune through TuneReportCallback. A trial's
config names its cell (name, run id); the cells' job configs and the Ray job's id come with the
trainable (tune.with_parameters), which each launch gives anew.

Experiments live on shared storage under backend.ray.experiment_uri (default
<first cell's storage.checkpoint_uri>/_tune/<sweep>), one directory per launch (exp-<UTC time>). A launch
first restores the newest experiment when Tune can (Tuner.restore with resume_errored: trials cut off by
`ray job stop` or a dead driver run again, and their Ray Train runs resume from their checkpoints), then
runs a new experiment for the cells to do that the restored one does not hold (cells added to the grid
since, or cells that experiment never got to). Two steps, because a Tune experiment's trials are fixed
when it is created (a new Tuner never resumes, and a restored one takes no new trials).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any
from urllib.parse import quote

from ocr_cluster import storage
from ocr_cluster.results.rows import LAUNCH_ENV
from ocr_cluster.sweep.grid import Cell

LAUNCHER = "tune"
EXPERIMENT_PREFIX = "exp-"


def experiment_root(sweep: str, cells: list[Cell], configured: str = "") -> str:
    """Where the sweep's Tune experiments live (absolute when local)."""
    uri = configured or storage.join(cells[0].config.storage.checkpoint_uri, "_tune", quote(sweep, safe=""))
    return uri if storage.is_remote(uri) else storage.local_path(uri)


def stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def cell_params(cell: Cell) -> dict[str, Any]:
    """A trial's config: which cell it is. The cell's job config and the launch (job id) come with the
    trainable (tune.with_parameters), given anew by each launch: a restored trial keeps its config, but
    trains the grid as it is now and its rows name the job that ran it."""
    return {"name": cell.name, "run_id": cell.run_id}


def train_cell(params: dict[str, Any], launch: dict[str, Any] | None = None,
               configs: dict[str, str] | None = None) -> None:
    """The trainable: one cell (params["cell"]) through the single job's training entry, in the trial's
    process. `configs`: run id -> job config YAML of the cells this launch trains; a restored trial whose
    cell is not among them (completed since, or no longer in the grid) has nothing to do."""
    from ocr_cluster.config import loads_yaml
    from ocr_cluster.errors import UserInputError
    from ocr_cluster.sweep.task import _attempts, _write_failed
    from ocr_cluster.train.driver import run

    cell = params["cell"]
    config_yaml = (configs or {}).get(cell["run_id"])
    if config_yaml is None:
        print(f"cell {cell['name']} ({cell['run_id']}): not to be trained by this launch (completed, or no "
              "longer in the grid); skipped", flush=True)
        return
    # attempt_launch reads these; the workers get them. A SLURM allocation hosting the sweep
    # (ocr_cluster.sweep.task.SweepTask) has set its own launcher in the Ray cluster's environment.
    os.environ[LAUNCH_ENV["launcher"]] = os.environ.get(LAUNCH_ENV["launcher"]) or LAUNCHER
    if (launch or {}).get("job_id"):
        os.environ[LAUNCH_ENV["scheduler_job_id"]] = launch["job_id"]
    cfg = loads_yaml(config_yaml)
    try:
        before = _attempts(cfg)
    except Exception:  # noqa: BLE001 - the driver's preflight names what is wrong with the store
        before = None
    try:
        run(cfg, callbacks=[report_callback(cfg, bool((launch or {}).get("early_stopping")))], in_trial=True)
    except UserInputError as exc:  # found before training (a bad data.uri): the cell's failed row says so
        _write_failed(cfg, str(exc), before)
        raise


EVAL_METRIC, TIME_ATTR = "mIoU", "iter"  # what the training loop reports with an evaluation at a checkpoint
STOPPED = "stopped"
STOPPED_KEY = "ocr_stopped_early"  # marks a trial's last result when the early stopping ended it


def report_callback(cfg, early_stopping: bool):
    """The Ray Train callback that feeds Tune. Without early stopping: every report (Ray's own
    TuneReportCallback). With it: only the reports that carry an evaluation (mIoU, iter) before the last
    iteration. Tune's schedulers need their metric in every result they see, and a cell's final report must
    not reach ASHA: a stop decided there would kill the trial while it writes its completed row."""
    from ray.tune.integration.ray_train import TuneReportCallback

    if not early_stopping:
        return TuneReportCallback()

    class EvalReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0] if metrics else {}
            if EVAL_METRIC in first and first.get(TIME_ATTR, cfg.schedule.iters) < cfg.schedule.iters:
                super().after_report(run_context, metrics, checkpoint)

    return EvalReports()


def first_eval_report(cfg) -> int | None:
    """The first iteration at which the cell reports an evaluation to Tune (an evaluation that falls on a
    checkpoint) before its last iteration; None if it never does."""
    import math

    from ocr_cluster.train.loop import intervals

    ckpt_every, eval_every = intervals(cfg)
    first = math.lcm(ckpt_every, eval_every)
    return first if first < cfg.schedule.iters else None


def asha_settings(stopping: dict[str, Any], cells: list[Cell]) -> tuple[dict[str, Any] | None, list[str]]:
    """AsyncHyperBandScheduler's arguments for `cells` under `stopping` (backend.ray.early_stopping as a
    dict; None when it is off or no cell can be stopped), and warning lines. max_t is past every cell's last
    iteration: a cell that survives the rungs trains to its end and is never stopped there."""
    if not stopping.get("enabled") or not cells:
        return None, []
    notes = []
    firsts = {c.name: first_eval_report(c.config) for c in cells}
    blind = [name for name, first in firsts.items() if first is None]
    if blind:
        notes.append(f"early stopping cannot stop {len(blind)} cell(s) (e.g. {blind[0]}): no evaluation falls on a "
                     "checkpoint before their end (evaluation.interval, schedule.checkpoint_interval)")
    seen = [first for first in firsts.values() if first is not None]
    if not seen:
        return None, notes
    grace = int(stopping.get("grace_period") or max(seen))
    max_t = max(c.config.schedule.iters for c in cells) + 1
    if grace >= max_t:
        notes.append(f"early stopping: grace_period {grace} is past every cell's last iteration; nothing will "
                     "be stopped")
        return None, notes
    return {"time_attr": TIME_ATTR, "metric": EVAL_METRIC, "mode": "max", "grace_period": grace,
            "reduction_factor": float(stopping.get("reduction_factor", 4.0)), "max_t": max_t}, notes


def _asha_scheduler(settings: dict[str, Any]):
    """ASHA that remembers whom it stopped (trial id -> the result it stopped at, and the rung's cutoff)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    class StoppingASHA(AsyncHyperBandScheduler):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.stopped: dict[str, dict[str, Any]] = {}

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped[trial.trial_id] = {"iter": result.get(TIME_ATTR), "miou": result.get(EVAL_METRIC),
                                                "mAcc": result.get("mAcc"), "aAcc": result.get("aAcc"),
                                                "cutoff": self._cutoff_at(trial.trial_id, result.get(TIME_ATTR))}
            return action

        def _cutoff_at(self, trial_id, cur_iter):
            """The cutoff of the rung the trial was judged at, itself left out."""
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    if cur_iter is not None and cur_iter >= milestone and trial_id in recorded:
                        others = {k: v for k, v in recorded.items() if k != trial_id}
                        cutoff = bracket.cutoff(others)
                        return None if cutoff is None else float(cutoff)
            return None

    return StoppingASHA(**settings)


def _stopped_rows_callback(scheduler, settings: dict[str, Any]):
    """A Tune callback (in the driver): a trial the scheduler stopped gets the mark in its last result and
    its cell a stopped row, when Tune completes it (before its actor is stopped)."""
    from ray.tune import Callback

    class StoppedRows(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            stop = scheduler.stopped.get(trial.trial_id)
            if stop is not None:  # the result ASHA stopped the trial at: it becomes the trial's last result
                result[STOPPED_KEY] = {**stop, "grace_period": settings["grace_period"],
                                       "reduction_factor": settings["reduction_factor"]}

        def on_trial_complete(self, iteration, trials, trial, **info):
            stop = (trial.last_result or {}).get(STOPPED_KEY)
            if stop:
                write_stopped(trial.config["cell"]["run_id"], stop)

    return StoppedRows()


# The launch this driver runs (set by run_sweep): a restored experiment's callbacks are the pickled ones of
# the launch that created it, so what they need of this launch is read from here.
_LAUNCH: dict[str, Any] = {"configs": {}, "job_id": None}


def write_stopped(run_id: str, stop: dict[str, Any]) -> None:
    """The stopped row of a cell the early stopping ended (unless it has a completed row, or this stop's row
    is written already): the iteration and eval mIoU it reached, why, and its run directory (checkpoints)."""
    import datetime as dt

    from ocr_cluster.config import loads_yaml
    from ocr_cluster.results import read_attempts, row_from_config, write_run
    from ocr_cluster.results.rows import launch_fields

    config_yaml = _LAUNCH["configs"].get(run_id)
    if config_yaml is None:
        return
    cfg = loads_yaml(config_yaml)
    try:
        rows = read_attempts(cfg.results.store_uri, dataset=cfg.data.dataset, run_id=run_id).to_pylist()
        if any(r["status"] == "completed" for r in rows):
            return
        newest = max(rows, key=lambda r: r["written_at"], default=None)
        if newest and newest["status"] == STOPPED and newest["iters_done"] == stop["iter"]:
            return
        cutoff = stop.get("cutoff")
        why = (f"stopped early by ASHA at iteration {stop['iter']} of {cfg.schedule.iters}: eval mIoU "
               f"{stop['miou']:.2f}" + (f" below the rung's cutoff {cutoff:.2f}" if cutoff is not None else "")
               + f" (grace_period {stop['grace_period']}, reduction_factor {stop['reduction_factor']:g})")
        launch = launch_fields()
        launch["launcher"] = launch["launcher"] or LAUNCHER
        launch["scheduler_job_id"] = launch["scheduler_job_id"] or _LAUNCH["job_id"]
        world = max(cfg.cluster.num_workers, 1)
        row = row_from_config(cfg, **launch, status=STOPPED, attempt=len(rows) + 1, miou=stop["miou"],
                              macc=stop.get("mAcc"), aacc=stop.get("aAcc"), iters_done=stop["iter"], error=why,
                              num_gpus=world if cfg.cluster.use_gpu else 0,
                              finished_at=dt.datetime.now(dt.timezone.utc))
        uri = write_run(cfg.results.store_uri, row)
        print(f"cell {cfg.run.name} ({run_id}): {why}; row {uri}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the store may be what is wrong; the sweep goes on
        print(f"could not write the stopped row of {run_id} to {cfg.results.store_uri}: {type(exc).__name__}: "
              f"{exc}", file=sys.stderr, flush=True)


def trial_name(trial) -> str:
    return str(trial.config["cell"]["name"])


def trial_dirname(trial) -> str:
    return f"{trial.config['cell']['name'][:80]}-{trial.trial_id}"


def experiments(root: str) -> list[str]:
    """The experiment directory names under `root`, oldest first."""
    fs, path = storage.filesystem(root)
    try:
        fs.invalidate_cache()
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, OSError):
        return []
    return sorted(n for n in names if n.startswith(EXPERIMENT_PREFIX))


def run_sweep(sweep: str, cells: list[Cell], root: str, *, max_concurrent: int = 0, trial_cpus: float = 0.1,
              job_id: str | None = None, early_stopping: dict[str, Any] | None = None) -> dict[str, str]:
    """Restore the newest experiment, then a new one for `cells` it does not hold; run id -> trial state
    ('completed', 'stopped' or the trial's error line). `early_stopping`: backend.ray.early_stopping."""
    from ray import tune

    from ocr_cluster.train.bytecode import warn_if_not_compiled

    warn_if_not_compiled(sys.stderr)  # here once, not by each trial's driver
    fs, path = storage.arrow_filesystem(root)
    arrow_fs = fs if storage.is_remote(root) else None
    configs = {c.run_id: c.config.to_yaml() for c in cells}
    _LAUNCH.update(configs=configs, job_id=job_id)
    stopping_on = bool((early_stopping or {}).get("enabled"))
    if stopping_on:
        # A trial that ends without reporting (a cell completed since) gives Tune a result without mIoU.
        os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    launch = {"job_id": job_id, "early_stopping": stopping_on}
    trainable = tune.with_resources(tune.with_parameters(train_cell, launch=launch, configs=configs),
                                    {"cpu": trial_cpus})
    states: dict[str, str] = {}
    held: set[str] = set()
    found = experiments(root)
    if found:
        latest = f"{path.rstrip('/')}/{found[-1]}"
        latest_uri = storage.join(root, found[-1])
        if tune.Tuner.can_restore(latest, storage_filesystem=arrow_fs):
            print(f"sweep {sweep}: restoring Tune experiment {latest_uri}", flush=True)
            tuner = tune.Tuner.restore(latest, trainable, resume_errored=True, storage_filesystem=arrow_fs)
            held, restored = _fit(tuner)
            states.update(restored)
    # A cell the restored experiment stopped early is trained again only when this launch asks for it
    # (it is among `cells`: --rerun-stopped, or early stopping turned off): in a new experiment.
    todo = [c for c in cells if c.run_id not in held]
    if not todo:
        return states
    name = f"{EXPERIMENT_PREFIX}{stamp()}"
    settings, notes = asha_settings(early_stopping or {}, todo)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    scheduler = _asha_scheduler(settings) if settings else None
    print(f"sweep {sweep}: Tune experiment {storage.join(root, name)}: {len(todo)} cell(s)"
          + (f", {max_concurrent} at once" if max_concurrent else "")
          + (f", early stopping (ASHA on eval mIoU: grace_period {settings['grace_period']}, reduction_factor "
             f"{settings['reduction_factor']:g})" if settings else ""), flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([cell_params(c) for c in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None, trial_name_creator=trial_name,
                                    trial_dirname_creator=trial_dirname, scheduler=scheduler, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=arrow_fs, verbose=1,
                                  callbacks=[_stopped_rows_callback(scheduler, settings)] if scheduler else None),
    )
    states.update(_fit(tuner)[1])
    return states


def _fit(tuner) -> tuple[set[str], dict[str, str]]:
    """Fit; (the run ids the experiment holds, but for the cells it stopped early; run id -> 'completed',
    'stopped' or the trial's error line). A stopped cell's row is written again here if the driver died
    before its callback wrote it."""
    results = tuner.fit()
    held, states = set(), {}
    for result in results:
        run_id = result.config["cell"]["run_id"]
        error = result.error
        stop = (result.metrics or {}).get(STOPPED_KEY) if error is None else None
        if stop:
            write_stopped(run_id, stop)
            states[run_id] = STOPPED
            continue
        held.add(run_id)
        states[run_id] = "completed" if error is None else _first_line(error)
    return held, states


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    return lines[-1] if lines else type(cause).__name__


def job_id_here() -> str | None:
    """The submission id of the Ray job this driver runs in (None outside `ray job submit`)."""
    from ocr_cluster.results.rows import launch_fields

    return os.environ.get(LAUNCH_ENV["scheduler_job_id"]) or launch_fields().get("scheduler_job_id")


def connect(address: str | None) -> None:
    """Inside a Ray job: its cluster. Elsewhere: `address` or RAY_ADDRESS, shipping this package as
    `ray job submit` with the README's runtime env would (never credentials)."""
    import ray

    from ocr_cluster import logs
    from ocr_cluster.train.driver import joined_runtime_env

    options = logs.ray_init_options(local=False)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        ray.init(**options)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        from ocr_cluster.sweep.grid import SweepError

        raise SweepError("no Ray cluster: give --address or set RAY_ADDRESS (or run this as the entrypoint "
                         "of `ray job submit`)")
    joined = joined_runtime_env()
    env = options.setdefault("runtime_env", {})
    env.update({**joined, "env_vars": {**env.get("env_vars", {}), **joined["env_vars"]}})
    ray.init(address=address, **options)


def read_cells(uri: str) -> tuple[dict[str, Any], list[Cell]]:
    """The cells file `sweep launch --backend ray` wrote: (its header, the cells)."""
    from ocr_cluster.config import loads_yaml

    body = json.loads(storage.read_bytes(uri))
    cells = [Cell(c["name"], loads_yaml(c["config_yaml"]), c.get("axes") or {}) for c in body["cells"]]
    return body, cells


def main(argv: list[str] | None = None) -> int:
    from ocr_cluster.errors import UserInputError

    parser = argparse.ArgumentParser(prog="python -m ocr_cluster.sweep.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", nargs="?", help="sweeps/<grid>.yaml (foreground mode)")
    parser.add_argument("--cells", metavar="URI", help="cells file written by `sweep launch --backend ray`")
    parser.add_argument("--store", metavar="URI", default=None, help="results store of every cell")
    parser.add_argument("--address", default=None, help="Ray cluster (default RAY_ADDRESS; not inside a job)")
    args = parser.parse_args(argv)
    if bool(args.grid) == bool(args.cells):
        parser.error("give a grid file or --cells, not both")
    try:
        if args.cells:
            body, cells = read_cells(args.cells)
            sweep, ray_opts = body["sweep"], body["ray"]
        else:
            cells, sweep, ray_opts = _from_grid(args.grid, args.store)
        if not cells:
            print(f"sweep {sweep}: nothing to train", flush=True)
            return 0
        connect(args.address)
        root = ray_opts.get("experiment_root") or experiment_root(sweep, cells, ray_opts.get("experiment_uri", ""))
        states = run_sweep(sweep, cells, root, max_concurrent=ray_opts.get("max_concurrent_trials", 0),
                           trial_cpus=ray_opts.get("trial_cpus", 0.1), job_id=job_id_here(),
                           early_stopping=ray_opts.get("early_stopping"))
    except UserInputError as exc:
        print(f"python -m ocr_cluster.sweep.tune: error: {exc}", file=sys.stderr)
        return 2
    failed = {run_id: why for run_id, why in states.items() if why not in ("completed", STOPPED)}
    stopped = sum(why == STOPPED for why in states.values())
    print(f"sweep {sweep}: {len(states) - len(failed)} trial(s) ended" + (f" ({stopped} stopped early)" if stopped
                                                                          else "") + f", {len(failed)} failed",
          flush=True)
    for run_id, why in failed.items():
        print(f"  {run_id}: {why}", flush=True)
    return 1 if failed else 0


def _from_grid(path: str, store: str | None) -> tuple[list[Cell], str, dict[str, Any]]:
    """Foreground mode: the grid's cells without a completed row (nor a stopped one, while the grid's early
    stopping keeps them so)."""
    import dataclasses

    from ocr_cluster.sweep.grid import load
    from ocr_cluster.sweep.launch import prepare
    from ocr_cluster.sweep.status import cell_states, ended, keeps_stopped

    grid = load(path)
    notes: list[str] = []
    cells = prepare(grid, store, notes)
    statuses, more = cell_states(cells, grid.name, ask_slurm=False)
    for note in notes + more:
        print(f"warning: {note}", file=sys.stderr)
    keep = keeps_stopped(grid)
    todo = [s.cell for s in statuses if not ended(s, keep)]
    opts = dataclasses.asdict(grid.backend.ray)
    opts["experiment_root"] = experiment_root(grid.name, cells, grid.backend.ray.experiment_uri)
    return todo, grid.name, opts


if __name__ == "__main__":
    sys.exit(main())
