"""Ray settings for the clusters ocr_cluster starts and owns: the local cluster of a run given no address,
and a SLURM cell's private head and nodes. Nobody reads their metrics or task timelines and nothing drains
their nodes, so the background work behind those is switched off. On a 2-core node it took 3-4 % of
every training step (benchmarks/README.md, "Ray's overhead against torchrun"). A cluster the user runs keeps
Ray's defaults; the README says how to give it these. A value already in the environment wins."""
from __future__ import annotations

import os

# For `ray start` (or a local ray.init): every process of the node inherits them.
NODE_ENV = {
    "RAY_enable_metrics_collection": "0",  # no Prometheus metrics from the raylet, GCS and workers
    "RAY_task_events_report_interval_ms": "0",  # no task events (the dashboard's task and timeline views)
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # the dashboard agent's node and process stats: once a minute, not every 5 s
    # The log monitor looks for new log files every 0.5 s rather than every 0.1 s: each look lists the log
    # dir, which grows by a few files per worker process the node ever ran.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}

# For the job's driver: Ray Train passes them on to its controller and workers.
JOB_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # polls for node drains, which only a cloud autoscaler starts
}

# Both, for a node we start and for a driver we start on it: a Tune trial's TorchTrainer (slurm-tune) passes
# on what its own process has, which is the node's environment.
OWN_CLUSTER_ENV = {**NODE_ENV, **JOB_ENV}


def under(env: dict[str, str], defaults: dict[str, str]) -> dict[str, str]:
    """`env` with `defaults` added where it has no value of its own."""
    return {**defaults, **env}


def set_node_env() -> None:
    """Before a ray.init that starts a local cluster: its processes inherit this process's environment."""
    for key, value in NODE_ENV.items():
        os.environ.setdefault(key, value)
