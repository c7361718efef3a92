"""What a training run prints, decided in one place.

By default a run shows our own lines: the driver's header, one line per log interval, the evaluations,
warnings that matter (ours, Ray's warnings and errors, unschedulable resources) and the result. Ray's
chatter (Ray Train's INFO lines such as "Reporting training result", Ray Data's execution plans and
progress, deprecation notices Ray raises against its own code) is kept out of the console; it is still
written to the Ray session's log files (/tmp/ray/session_*/logs). `--verbose` or OCR_CLUSTER_VERBOSE=1
brings Ray's own console output back unchanged.

The driver calls `ray_init_options` for its ray.init and `train_logging_config` for its RunConfig; every
worker process of the job (Ray Train's controller and workers, Ray Data's tasks and actors) runs
`quiet_worker` as its runtime env's worker_process_setup_hook, and the train function calls `train_worker`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings

from ocr_cluster import ray_defaults

VERBOSE_ENV = "OCR_CLUSTER_VERBOSE"
WORKER_HOOK = "ocr_cluster.logs.quiet_worker"

# Warnings Ray raises against its own calls (Ray Train's DataConfig): nothing a user can act on.
RAY_OWN_WARNINGS = (r"`ExecutionOptions\.exclude_resources` is deprecated",)
# Ray log warnings with nothing for a user to act on: (logger, message start). They are demoted to DEBUG, so
# Ray Train's system log file keeps them and the console does not show them.
RAY_TRANSIENT = (
    # The controller's request to the autoscaling coordinator timed out (5 s): a busy machine (a new actor's
    # worker process starting), and no autoscaler on a local cluster; Ray calls it safe to ignore when
    # transient. A traceback each time.
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     "Failed to send resource request"),
    # broadcast_from_rank_zero warns above 1000 bytes; the one broadcast of a run is Ray Data's split
    # iterators (~5.5 KB), once at start.
    ("ray.train.v2._internal.execution.collective_impl", "Data size"),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_verbose() -> None:
    """`--verbose`: the same switch as OCR_CLUSTER_VERBOSE=1."""
    os.environ[VERBOSE_ENV] = "1"


_quiet = False  # this process ran quiet_worker


def quiet_worker() -> None:
    """Ray's chatter off in this process: Ray Data's console lines below WARNING, the deprecations Ray
    raises against itself, Ray's warnings in RAY_TRANSIENT (as DEBUG). Ray's log files keep everything else."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger, whose console handler is lowered here

    global _quiet
    _quiet = True
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(logging.WARNING)
    for message in RAY_OWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, start in RAY_TRANSIENT:
        logging.getLogger(name).addFilter(_Demote(start))


def train_worker() -> None:
    """First thing in the train function. Ray Train sets each worker's root logger to INFO after the setup
    hook ran, and logs some of its lines ("Reporting training result ...") under a logger outside
    "ray.train", which RunConfig's logging_config does not reach."""
    if _quiet:
        logging.getLogger().setLevel(logging.WARNING)


def ray_init_options(local: bool) -> dict:
    """Keyword arguments for the driver's ray.init (`local`: it starts a cluster of its own). Unless verbose,
    also quiets Ray in this process and has every worker of the job run `quiet_worker`."""
    import ray

    options: dict = {"logging_level": "WARNING"}
    runtime_env: dict = {}
    if local:
        # Ray Train's PlacementGroupCleaner asks the State API whether the controller is still alive every
        # second; that API is served by the dashboard, and without it every ask logs a warning. The workers
        # are told its address, so the ask does not depend on this being the machine's only Ray cluster.
        port = _free_port()
        options.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
        # A cluster this process starts (and stops) is never drained by a cloud provider: no preemption
        # watcher (whose actor also logs a core-worker error when it is created), as ray_defaults says.
        runtime_env["env_vars"] = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **ray_defaults.JOB_ENV}
    if not verbose():
        if local:  # Ray's notice that it turned on its default (token auth) for the cluster it starts
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
                lambda record: not record.getMessage().startswith("Token authentication is enabled"))
        # Root and "ray" loggers of the driver and every worker at WARNING; with it, Ray also drops the
        # "(RayTrainWorker pid=...)" prefix from the lines workers print.
        options["logging_config"] = ray.LoggingConfig(encoding="TEXT", log_level="WARNING")
        if not _job_has_setup_hook():  # ray.init refuses two hooks
            runtime_env["worker_process_setup_hook"] = WORKER_HOOK
        quiet_worker()
        # Ray Data's progress as log lines (INFO: in its log file) rather than tqdm bars relayed to the driver.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    if runtime_env:
        options["runtime_env"] = runtime_env
    return options


def train_logging_config():
    """Ray Train's own console level, for RunConfig(logging_config=...)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


class _Demote(logging.Filter):
    """Records whose message starts with `start` become DEBUG records."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith(self.start):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _job_has_setup_hook() -> bool:
    """Whether `ray job submit` gave this driver a runtime env with a setup hook of its own."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return bool((job.get("runtime_env") or {}).get("worker_process_setup_hook"))
