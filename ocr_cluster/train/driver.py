"""The driver: check the inputs, connect to Ray, build the TorchTrainer, fit, record the outcome.

It runs where `python -m ocr_cluster.train` runs: inside `ray job submit` (RAY_ADDRESS is set) or on a
laptop, where it starts a local Ray cluster. Everything that can be wrong with the inputs is found here,
before a worker starts: a bad config, a missing dataset, an unreachable endpoint, wrong credentials.

Resume is keyed on the run id: RunConfig(name=run_id) under storage.checkpoint_uri, so submitting the
same config again continues from its latest checkpoint; a run with a completed result row is not
trained again. The run id includes the dataset's fingerprint: preflight fills data.fingerprint in from
the manifest before anything uses the id (layout, rows, checkpoints, the workers' config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ocr_cluster import logs, ray_defaults, storage
from ocr_cluster.config import Config, parse_size, with_dataset
from ocr_cluster.errors import ReportedFailure, UserInputError
from ocr_cluster.train import bytecode, phases
from ocr_cluster.train.layout import RunLayout, checkpoint_iteration


class TrainSetupError(UserInputError):
    """Bad input found before training starts; one line for the user."""


class TrainInputError(UserInputError):
    """Bad input a worker found (a bad sample, weights that do not load); ended without a retry."""


class TrainFailed(ReportedFailure):
    """The run failed for good (after Ray Train's retries); a failed row was written."""


@dataclass
class RunStart:
    """What preflight found: the config resolved for its dataset (data.fingerprint), where the run lives,
    its dataset, and the iteration it starts from."""

    config: Config
    layout: RunLayout
    num_classes: int
    manifest: object
    start_iter: int


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def worker_error(exc: BaseException) -> str:
    """The first worker's own exception out of Ray Train's WorkerGroupError, as 'Type: message'."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        first = failures[min(failures)]
        root = getattr(first, "cause", None) or first
        lines = [line.strip() for line in str(root).splitlines() if line.strip()]
        message = lines[-1] if lines else ""
        return message if message.startswith(type(root).__name__) else f"{type(root).__name__}: {message}"
    return _reason(exc)


def latest_checkpoint_iter(layout: RunLayout) -> int:
    """The iteration of the newest checkpoint in the run's directory, 0 if none."""
    fs, path = storage.filesystem(layout.run_uri)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return 0
    return max((i for n in names if (i := checkpoint_iteration(n)) is not None), default=0)


def absolute_local_paths(cfg: Config) -> Config:
    """Local URIs made absolute: Ray Train workers do not run in the driver's working directory.
    (Multi-node runs need shared storage anyway: s3://, gs:// or a path every node mounts.)"""
    import dataclasses

    def fix(uri: str) -> str:
        return storage.local_path(uri) if uri and not storage.is_remote(uri) else uri

    model = dataclasses.replace(cfg.model, pretrained=fix(cfg.model.pretrained),
                                pretrained_backbone=fix(cfg.model.pretrained_backbone))
    return dataclasses.replace(
        cfg, model=model, data=dataclasses.replace(cfg.data, uri=fix(cfg.data.uri)),
        storage=dataclasses.replace(cfg.storage, checkpoint_uri=fix(cfg.storage.checkpoint_uri)),
        results=dataclasses.replace(cfg.results, store_uri=fix(cfg.results.store_uri)))


def _must_exist(key: str, uri: str, target: str, missing: str) -> None:
    """`target` (a URL) must exist; an unreachable endpoint or refused credentials name `key` and `uri`."""
    try:
        found = storage.exists(target)
    except Exception as exc:  # noqa: BLE001 - endpoint, credentials: all one line
        raise TrainSetupError(f"{key}: cannot reach {uri}: {_reason(exc)}") from None
    if not found:
        raise TrainSetupError(f"{key}: {missing}")


def preflight(cfg: Config) -> RunStart:
    """Every check that needs no worker and is not the config's own (config._check), and the config
    resolved for the dataset's manifest (config.with_dataset). Raises TrainSetupError (or DataError, or
    ConfigError for a pinned data.fingerprint of another dataset or a fast-path option this torch lacks) with
    one line."""
    from ocr_cluster.data.errors import DataError
    from ocr_cluster.data.pipeline import open_dataset
    from ocr_cluster.data.shards import check_shard_sizes

    for key, uri in (("data.uri", cfg.data.uri), ("storage.checkpoint_uri", cfg.storage.checkpoint_uri),
                     ("results.store_uri", cfg.results.store_uri)):
        if not uri:
            raise TrainSetupError(f"{key} is empty; give a path, file://, s3:// or gs:// URL")
        try:
            storage.filesystem(uri)
        except storage.StorageError as exc:
            raise TrainSetupError(f"{key}: {exc}") from None

    try:
        manifest = open_dataset(cfg.data)
        check_shard_sizes(manifest)  # a truncated or missing shard now, not in a worker
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - endpoint, credentials, missing bucket: all one line
        raise TrainSetupError(f"cannot read the dataset at {cfg.data.uri}: {_reason(exc)}") from None

    cfg = with_dataset(cfg, manifest.fingerprint)  # from here on, cfg.run_id names this dataset
    num_classes = manifest.num_classes
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise TrainSetupError(f"model.num_classes is {cfg.model.num_classes} but the dataset at {cfg.data.uri} "
                              f"has {num_classes} classes")
    if cfg.loss.class_weight and len(cfg.loss.class_weight) != num_classes:
        raise TrainSetupError(f"loss.class_weight has {len(cfg.loss.class_weight)} values; the dataset has "
                              f"{num_classes} classes")
    if manifest.split("train").num_samples == 0 or manifest.split("val").num_samples == 0:
        raise TrainSetupError(f"the dataset at {cfg.data.uri} needs samples in both 'train' and 'val'")

    for key, uri in (("model.pretrained", cfg.model.pretrained),
                     ("model.pretrained_backbone", cfg.model.pretrained_backbone)):
        if uri:
            _must_exist(key, uri, uri, f"no checkpoint at {uri}")
    for key, uri in (("storage.checkpoint_uri", cfg.storage.checkpoint_uri),
                     ("results.store_uri", cfg.results.store_uri)):
        if storage.is_remote(uri):
            bucket = storage.filesystem(uri)[1].split("/", 1)[0]
            _must_exist(key, uri, f"{storage.scheme(uri)}://{bucket}", f"bucket '{bucket}' of {uri} does not exist")
    from ocr_cluster.train import fastpath

    fastpath.check(cfg.cluster, cfg.optimizer.type)  # a fused optimizer or torch.compile this torch lacks
    layout = RunLayout.from_config(cfg)
    start = RunStart(cfg, layout, num_classes, manifest, latest_checkpoint_iter(layout))
    if start.start_iter == 0:  # the weights a fresh start loads (a resume loads its checkpoint instead)
        key = "model.pretrained" if cfg.model.pretrained else "model.pretrained_backbone"
        uri = cfg.model.pretrained or cfg.model.pretrained_backbone
        if uri:
            check_pretrained(cfg, key, uri, num_classes, backbone_only=key == "model.pretrained_backbone")
    return start


def check_pretrained(cfg: Config, key: str, uri: str, num_classes: int, backbone_only: bool) -> None:
    """The checkpoint at `uri` loads into the run's model as the workers will load it. The model is built
    on the meta device (no memory for weights); the file is read whole."""
    import torch

    from ocr_cluster.models import build_model
    from ocr_cluster.models.convert import CheckpointError, check_checkpoint

    with torch.device("meta"):
        model = build_model(cfg.model.backbone, cfg.model.head, num_classes, align_corners=cfg.model.align_corners,
                            dropout_ratio=cfg.model.dropout_ratio, norm=cfg.model.norm,
                            aux_weight=cfg.loss.aux_weight)
    try:
        check_checkpoint(model, uri, backbone_only=backbone_only)
    except CheckpointError as exc:
        raise TrainSetupError(f"{key}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - endpoint, credentials: one line
        raise TrainSetupError(f"{key}: cannot read {uri}: {_reason(exc)}") from None


def _cluster_address(cfg: Config) -> str | None:
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None


def joined_runtime_env() -> dict:
    """What a driver that joins a cluster itself gives its workers, as `ray job submit` with the README's
    runtime env would: this package (nodes need only its dependencies) and the object-store settings of
    python -m ocr_cluster.runtime_env (endpoint, region, profile name; never credentials). Nothing inside a
    submitted job: it has its runtime env already, and Ray refuses a second value for a variable."""
    import ocr_cluster
    from ocr_cluster import runtime_env

    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor for the job's driver
        return {}
    return {"py_modules": [os.path.dirname(os.path.abspath(ocr_cluster.__file__))], "excludes": ["__pycache__"],
            "env_vars": runtime_env.build(None)["env_vars"]}


def connect_ray(cfg: Config, layout: RunLayout) -> None:
    """Join the cluster this runs in (cluster.address or RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = _cluster_address(cfg)
    if address:
        options = logs.ray_init_options(local=False)
        joined = joined_runtime_env()
        if joined:
            env = options.setdefault("runtime_env", {})
            env.update({**joined, "env_vars": {**env.get("env_vars", {}), **joined["env_vars"]}})
        ray.init(address=address, **options)
        return
    workers_cpus = layout.world * (cfg.cluster.cpus_per_worker or 1)  # 0: sized after the start
    # Logical CPUs beyond the workers' share, so Ray Data's read and decode tasks can run beside them.
    num_cpus = max(os.cpu_count() or 1, int(workers_cpus) + 2)
    ray_defaults.set_node_env()
    ray.init(num_cpus=num_cpus, object_store_memory=local_object_store_bytes(cfg),
             **logs.ray_init_options(local=True))


OBJECT_STORE_BATCHES = 16  # global batches of crops a local cluster's object store holds at once
MIN_OBJECT_STORE = 512 * 1024**2


def local_object_store_bytes(cfg: Config, node_memory: int | None = None) -> int:
    """The object store of a cluster started for this run, sized from the run and the node: room for
    OBJECT_STORE_BATCHES global batches of training crops in flight (Ray Data's queues, every worker's
    prefetch), at least 512 MB, at most Ray's own default share of the node's memory (30 %)."""
    height, width = parse_size(cfg.data.crop_size)
    crop_bytes = height * width * (3 * 4 + 1)  # float32 image and uint8 label (uint8 crops need less)
    need = OBJECT_STORE_BATCHES * cfg.data.batch_size * crop_bytes
    node_memory = node_memory or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(max(need, MIN_OBJECT_STORE), max(0.3 * node_memory, MIN_OBJECT_STORE)))


def auto_cpus_per_worker(nodes: list[dict], world: int, use_gpu: bool) -> tuple[float, str]:
    """cluster.cpus_per_worker 0: the CPUs each training worker reserves, sized from the cluster's alive
    nodes (as `ray.nodes()` lists them), and why, for the log line.

    GPU workers get a quarter of the CPUs per GPU of the leanest GPU node, 1 to 4: the training process
    needs a core or two (the step's launches, Ray Data's fetch thread); every CPU it leaves is a decode task
    of Ray Data's, and a GPU needs 1-11 of those (benchmarks/README.md, "Per core, cores per GPU").
    CPU workers compute with their CPUs (Ray sets their torch threads from them): each gets an equal share of
    three quarters of the cluster's CPUs, at most one node's, at least 1; the quarter left decodes."""
    cpus = [float(node.get("Resources", {}).get("CPU", 0)) for node in nodes]
    if use_gpu:
        per_gpu = [cpu / node["Resources"]["GPU"] for cpu, node in zip(cpus, nodes)
                   if node.get("Resources", {}).get("GPU", 0) > 0]
        if not per_gpu:  # an autoscaling cluster before its GPU nodes join
            return 2.0, "no GPU node is up yet to size it from"
        leanest = min(per_gpu)
        return float(min(max(int(leanest // 4), 1), 4)), (
            f"a quarter of the {leanest:g} CPUs per GPU of the leanest GPU node, 1 to 4; the rest for Ray Data")
    total = sum(cpus)
    share = min(int(0.75 * total // max(world, 1)), int(max(cpus, default=1)))
    return float(max(share, 1)), (f"three quarters of the cluster's {total:g} CPUs over {max(world, 1)} "
                                  "worker(s); the rest for Ray Data")


def size_cpus_per_worker(cfg: Config, layout: RunLayout) -> Config:
    """After connect_ray: cluster.cpus_per_worker 0 replaced by auto_cpus_per_worker's size for this
    cluster, with one line saying so; any other value as given."""
    import dataclasses

    import ray

    if cfg.cluster.cpus_per_worker:
        return cfg
    cpus, why = auto_cpus_per_worker([n for n in ray.nodes() if n.get("Alive")], layout.world, cfg.cluster.use_gpu)
    print(f"cluster.cpus_per_worker 0: {cpus:g} per worker ({why})", flush=True)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, cpus_per_worker=cpus))


def data_cpus_warning(cluster_cpus: float, workers: int, cpus_per_worker: float) -> str | None:
    """One warning line when the training workers' CPUs take all of the cluster's, leaving Ray Data's read
    and decode tasks none (e.g. cpus_per_worker 8 on nodes with 8 vCPUs per GPU), else None."""
    taken = workers * cpus_per_worker
    if cluster_cpus > taken:
        return None
    fit = max(1, int(cluster_cpus // max(workers, 1)) - 2)
    return (f"warning: the cluster has {cluster_cpus:g} CPUs and the {workers} training worker(s) take "
            f"{workers} x {cpus_per_worker:g} = {taken:g}: none left for Ray Data, so training will wait for "
            f"its data; set cluster.cpus_per_worker lower (e.g. {fit}; 0 sizes it from the nodes) or add "
            "CPU nodes")


def warn_if_no_data_cpus(cfg: Config, layout: RunLayout) -> None:
    """After connect_ray: print data_cpus_warning's line for this cluster, if any."""
    import ray

    line = data_cpus_warning(ray.cluster_resources().get("CPU", 0), layout.world, cfg.cluster.cpus_per_worker)
    if line:
        print(line, flush=True)


def _node_reads(uri: str) -> str | None:
    """Run on a cluster node: None when `uri` is there to read, else why not, in one line."""
    try:
        return None if storage.exists(uri) else f"{uri} not found"
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint: the reason, not a traceback
        return _reason(exc)


CLUSTER_CHECK_TIMEOUT_S = 60


def check_cluster_storage(cfg: Config) -> None:
    """On a cluster this driver joined: a node must read the dataset as the workers will (their own
    credentials, the settings passed on), or a TrainSetupError with one line says how to fix it. The
    driver's own checks ran with its environment, which the nodes do not share."""
    import ray

    from ocr_cluster.data.shards import manifest_uri

    if not _cluster_address(cfg) or not storage.is_remote(cfg.data.uri):
        return
    target = manifest_uri(cfg.data.uri)
    probe = ray.remote(num_cpus=0.01, max_retries=0)(_node_reads).remote(target)
    try:
        why = ray.get(probe, timeout=CLUSTER_CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        print(f"note: no cluster node was free to check {cfg.data.uri} within {CLUSTER_CHECK_TIMEOUT_S} s; "
              "going on", flush=True)
        return
    except Exception as exc:  # noqa: BLE001 - the probe did not run on the node (no package, setup failed)
        cause = getattr(exc, "cause", None) or exc
        raise TrainSetupError(f"a task on the cluster could not check {cfg.data.uri}: {_reason(cause)}") from None
    if why:
        raise TrainSetupError(
            f"the cluster's nodes cannot read {cfg.data.uri} ({why}): give every node credentials (exported "
            "before `ray start`, an ~/.aws profile named by AWS_PROFILE, or an instance role), or submit with "
            "`ray job submit --runtime-env-json \"$(python -m ocr_cluster.runtime_env --with-secrets)\"` "
            "(README: Object storage)")


def build_trainer(cfg: Config, start: RunStart, skip_counter=None, callbacks=()):
    """The run's TorchTrainer; `callbacks`: more Ray Train callbacks (the Tune backend's TuneReportCallback)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ocr_cluster.train.input_errors import StopOnInputError
    from ocr_cluster.train.loop import train_fn_per_worker
    from ocr_cluster.train.results import attempt_launch

    # No datasets here: the workers build the training stream from the checkpoint they resume from
    # (Trainer._train_stream), also when Ray Train restarts them inside this fit().
    # Ray composes <storage_path>/<name>: the layout's run_uri.
    storage_fs, storage_path = storage.arrow_filesystem(cfg.storage.checkpoint_uri)
    resources = {"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config_yaml": cfg.to_yaml(), "skip_counter": skip_counter,
                           "launch": attempt_launch(cfg)},
        # cluster.num_workers as given: 0 is Ray's local mode (one worker, the layout's world of 1).
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.cluster.placement_strategy),
        run_config=ray.train.RunConfig(
            name=start.layout.run_id, storage_path=storage_path,
            storage_filesystem=storage_fs if storage.is_remote(cfg.storage.checkpoint_uri) else None,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=[StopOnInputError(), *callbacks],  # bad input a worker finds is not retried
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.storage.num_to_keep),
            logging_config=logs.train_logging_config()),
    )


def run(cfg: Config, callbacks=(), in_trial: bool = False) -> int:
    """Train `cfg` to completion (or resume it); returns 0. Raises TrainSetupError / TrainFailed.

    A Ray Tune trial (ocr_cluster.sweep.tune) calls it with `in_trial=True` and its TuneReportCallback:
    Ray is already up in the trial's process (connect_ray joins nothing), and a failure leaves Ray alone."""
    from ocr_cluster.train.results import completed_row, write_failed

    phases.mark("driver_run")
    start = preflight(absolute_local_paths(cfg))
    cfg, layout = start.config, start.layout
    phases.mark("preflight")
    done = completed_row(cfg, layout.run_id)
    phases.mark("results_checked")
    if done is not None:
        print(f"run {layout.run_id} ({cfg.run.name}) is already completed: mIoU {done['miou']} "
              f"(row {done['file']}); not training again", flush=True)
        return 0
    where = f"resuming from iteration {start.start_iter}" if start.start_iter else "from scratch"
    print(f"run {layout.run_id} ({cfg.run.name}): {cfg.model.head} on {cfg.model.backbone}, {cfg.data.dataset} "
          f"({start.num_classes} classes), {cfg.schedule.iters} iterations, batch {cfg.data.batch_size} on "
          f"{cfg.cluster.num_workers} worker(s), {where}", flush=True)
    if cfg.data.dataset != "synthetic" and not (cfg.model.pretrained or cfg.model.pretrained_backbone):
        print("note: no model.pretrained_backbone: training from random initialisation; the published "
              "numbers start from ImageNet weights", flush=True)
    if not in_trial:  # a Tune sweep says it once (sweep/tune.run_sweep), not once per trial
        bytecode.warn_if_not_compiled()
    connect_ray(cfg, layout)
    phases.mark("ray_connected")
    cfg = size_cpus_per_worker(cfg, layout)
    warn_if_no_data_cpus(cfg, layout)
    if not in_trial:  # a trial runs on a cluster node, whose preflight read the data; it may start no other task
        check_cluster_storage(cfg)
    phases.mark("cluster_checked")
    skip_counter = None
    if cfg.data.skip_bad_samples:  # the training stream's skips, counted by its Ray Data tasks
        from ocr_cluster.data.pipeline import SkipCounter

        skip_counter = SkipCounter()
    trainer = build_trainer(cfg, start, skip_counter, callbacks)
    phases.mark("fit")
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray gave up after max_failures: record it, then one line
        import ray

        from ocr_cluster.train.input_errors import ANSI, input_error_line

        if not in_trial:
            ray.shutdown()  # no more relayed worker logs: the line the job ends with is ours
        line = input_error_line(exc)
        if line is not None:  # bad input a worker found: one attempt, exit 2 with its line
            write_failed(cfg, layout, line)
            print(f"run {layout.run_id} stopped on bad input, not retried; a failed row is in "
                  f"{cfg.results.store_uri}", flush=True)
            raise TrainInputError(line) from None
        reason = ANSI.sub("", worker_error(exc))
        write_failed(cfg, layout, ANSI.sub("", f"{reason}\n\n{exc}"))
        raise TrainFailed(f"run {layout.run_id} failed: {reason}; a failed row is in {cfg.results.store_uri}") from exc
    return 0
