"""The configuration tree: dataclasses, YAML loading, `--set a.b=c` overrides, validation, run ids.

A job file is YAML read with a `yaml.SafeLoader` (that also reads `5e-4` as a float). It may name one parent with `base: other.yaml`
(resolved next to the file, like mmseg's `_base_`); the child's mapping is merged into the
parent's key by key, and lists are replaced whole. Every key must exist in the tree below,
every value must have the field's type, and fields with a fixed set of values name it.

The defaults are the embedded default job: a small model trained on synthetic shards on a local
Ray cluster with CPU workers, results in ./results.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ocr_cluster.data.constants import MEAN_RGB, STD_RGB
from ocr_cluster.errors import UserInputError
from ocr_cluster.models.names import BACKBONES, HEADS
from ocr_cluster.train.layout import split_batch

DATASETS = ("synthetic", "cityscapes", "ade20k", "voc-aug", "pascal-context", "pascal-context-59",
            "coco-stuff164k", "coco-stuff10k", "lip")

# Bump when a default below changes what a training computes, so old run ids are not reused for it.
RUN_ID_VERSION = 1


# Keys that earlier versions wrote into every dumped config (results rows, checkpoints) and that no longer
# mean anything; accepted at the one value they could have, so those configs still load.
RETIRED = {"schedule.policy": "poly"}


class ConfigError(UserInputError):
    """Bad configuration input; the message is one line meant for the user."""


def choice(default: str, choices: tuple[str, ...], doc: str = "", *, hashed: bool = True) -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc, "hashed": hashed})


def opt(default: Any, doc: str = "", *, hashed: bool = True) -> Any:
    """A field; `hashed=False` keeps it out of the run id (where it does not change what is trained)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, "hashed": hashed})
    return field(default=default, metadata={"doc": doc, "hashed": hashed})


def size(default: str, doc: str = "", *, hashed: bool = True) -> Any:
    """A 'HxW' (or 'WxH', as documented) size written as text, e.g. '512x1024'."""
    return field(default=default, metadata={"doc": doc, "hashed": hashed, "size": True})


_SIZE_RE = re.compile(r"([0-9]+)(?:x([0-9]+))?")


def parse_size(text: str, *, square: bool = False, what: str = "size") -> tuple[int, int]:
    """'512x1024' -> (512, 1024); with `square` also '769' -> (769, 769). Positive integers only.

    The one size parser: config size fields, `data synth --size`, `models info --size`. Anything
    else is a ConfigError (bad input, exit 2) naming `what`.
    """
    match = _SIZE_RE.fullmatch(str(text))
    if match and (match[2] or square):
        height, width = int(match[1]), int(match[2] or match[1])
        if height > 0 and width > 0:
            return height, width
    shape = "HxW (or S for a square)" if square else "HxW"
    raise ConfigError(f"bad {what} {text!r}: expected {shape} with positive integers, e.g. 512x1024")


@dataclass
class RunSection:
    name: str = opt("quickstart", "human-readable job name (defaults to the YAML file's stem)", hashed=False)
    seed: int = opt(0, "global seed; data order and initialisation derive from it")
    sweep: str = opt("", "name of the sweep this run belongs to, empty for a single job", hashed=False)


@dataclass
class ModelSection:
    backbone: str = choice("hrnetv2_w18_small", BACKBONES)
    head: str = choice("ocr", HEADS)
    num_classes: int | None = opt(None, "number of classes; taken from the dataset manifest when unset")
    align_corners: bool = opt(False, "False as mmseg; True for the HRNet-OCR / openseg recipes")
    norm: str = choice("syncbn", ("syncbn", "bn"), "syncbn becomes plain BN with a single worker")
    dropout_ratio: float | None = opt(None, "dropout before the classifiers; unset = the head's default")
    pretrained: str = opt("", "URI of a full-model checkpoint (this project's, mmseg's or HRNet-OCR's)")
    pretrained_backbone: str = opt("", "URI of ImageNet backbone weights (MSRA HRNet / mmseg V1c ResNet)")


@dataclass
class DataSection:
    dataset: str = choice("synthetic", DATASETS)
    uri: str = opt("./data/synthetic", "where the dataset's Parquet shards live (s3://, gs://, file://, path)",
                   hashed=False)
    crop_size: str = size("128x128", "training crop, HxW")
    scale: str = size("256x256", "base image scale for random resize (mmseg img_scale), WxH")
    ratio_range: list[float] = opt([0.5, 2.0], "random resize ratio range")
    cat_max_ratio: float = opt(0.75, "largest share one class may have of a random crop")
    flip_prob: float = opt(0.5)
    photometric: bool = opt(True, "mmseg PhotoMetricDistortion")
    mean: list[float] = opt(list(MEAN_RGB), "RGB mean on 0-255 pixels")
    std: list[float] = opt(list(STD_RGB), "RGB std on 0-255 pixels")
    batch_size: int = opt(8, "global batch (all workers, after gradient accumulation)")
    skip_bad_samples: bool = opt(False, "skip undecodable or out-of-range samples instead of failing",
                                 hashed=False)
    preserve_order: bool = opt(False, "deliver training samples in the stream's order and split them between "
                                      "workers deterministically (Ray Data's preserve_order): reproducible runs "
                                      "and resumes, for some data throughput", hashed=False)
    fingerprint: str = opt("", "the dataset's fingerprint, from its manifest's shard checksums; filled in by "
                               "the driver, set it to pin a dataset")


@dataclass
class LossSection:
    reduction: str = choice("mmseg", ("mmseg", "valid"),
                            "mmseg averages over all pixels; valid averages over non-ignored pixels (PyTorch)")
    aux_weight: float = opt(0.4, "weight of auxiliary / soft-region heads")
    ohem: bool = opt(False, "online hard example mining")
    ohem_thresh: float = opt(0.7)
    ohem_min_kept: int = opt(100000)
    class_weight: list[float] = opt([], "per-class CE weights; empty = uniform")


@dataclass
class OptimizerSection:
    type: str = choice("sgd", ("sgd", "adamw"))
    lr: float = opt(0.01)
    momentum: float = opt(0.9)
    weight_decay: float = opt(5e-4)
    head_lr_mult: float = opt(1.0, "lr multiplier for the non-backbone parameters (HRNet-OCR uses 10 on some sets)")


@dataclass
class ScheduleSection:
    iters: int = opt(1000, "training iterations")
    power: float = opt(0.9)
    min_lr: float = opt(1e-4, "mmseg uses 1e-4; HRNet-OCR / openseg use 0")
    warmup_iters: int = opt(0)
    warmup_ratio: float = opt(0.1, "warm-up starts at lr * warmup_ratio")
    checkpoint_interval: int = opt(0, "iterations between checkpoints; 0 = iters/10", hashed=False)
    log_interval: int = opt(50, hashed=False)


@dataclass
class EvaluationSection:
    interval: int = opt(0, "iterations between evaluations; 0 = iters/10", hashed=False)
    mode: str = choice("whole", ("whole", "slide"))
    slide_crop: str = size("512x1024", "slide-window size, HxW")
    slide_stride: str = size("341x682", "slide-window stride, HxW")
    ms_flip: bool = opt(False, "also report multi-scale + flip mIoU at the end")
    ms_ratios: list[float] = opt([0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    fps_images: int = opt(200, "val images timed for fps (batch 1, first 5 not timed), as mmseg", hashed=False)


@dataclass
class ClusterSection:
    address: str = opt("", "Ray address; empty = RAY_ADDRESS or a local cluster", hashed=False)
    num_workers: int = opt(2, "Ray Train workers (one per GPU on a GPU cluster)", hashed=False)
    use_gpu: bool = opt(False, hashed=False)
    cpus_per_worker: float = opt(1.0, "CPUs each worker reserves (a CPU worker's torch threads); 0 = sized from the "
                                      "cluster's nodes once connected: on GPUs a quarter of a node's CPUs per "
                                      "GPU (1-4), on CPUs an equal share of three quarters of the cluster's; "
                                      "the CPUs left run Ray Data's decode tasks", hashed=False)
    micro_batch: int = opt(0, "samples per worker per forward; 0 = data.batch_size / num_workers; "
                              "smaller accumulates gradients to the same global batch", hashed=False)
    amp: str = choice("auto", ("auto", "bf16", "fp16", "none", "native-bf16"),
                      "autocast dtype. auto = bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 on "
                      "older GPUs, none on CPU; native-bf16 = bf16 where the device computes it natively (such "
                      "GPUs, CPUs with AVX512-BF16), else none (fp32)")
    channels_last: bool = opt(False, "GPU fast path: the model's weights and each training batch in channels-last "
                                     "(NHWC) memory format, which tensor-core convolutions prefer; same model, "
                                     "sums in another order", hashed=False)
    compile: bool = opt(False, "GPU fast path: torch.compile (inductor) of the model for training, after DDP as "
                               "DDP documents; evaluation and the fps run stay eager (their image sizes vary). "
                               "The first iteration takes longer (minutes for HRNetV2-W48 + OCR)", hashed=False)
    optimizer_impl: str = choice("auto", ("auto", "foreach", "fused"),
                                 "GPU fast path: the optimizer's kernels; auto = torch's choice (foreach on CUDA, a "
                                 "loop over the parameters on CPU), fused = one kernel per step for all "
                                 "parameters, which under the fp16 scaler also skips the scaler's host sync; "
                                 "a torch without it for the device is an error before the run", hashed=False)
    normalize_on: str = choice("auto", ("auto", "decode", "device"),
                               "where training crops are normalised: decode = in Ray Data's decode tasks (float32 "
                               "crops through the object store), device = on the worker's device after the copy, "
                               "as mmseg's SegDataPreProcessor (uint8 crops: a quarter of the bytes); the same "
                               "values either way; auto = device on GPU workers, decode on CPU", hashed=False)
    max_failures: int = opt(3, "worker-group restarts before the run fails for good", hashed=False)
    placement_strategy: str = choice("PACK", ("PACK", "SPREAD", "STRICT_SPREAD"),
                                     "how Ray Train places its workers on the nodes; the SLURM launcher sets "
                                     "SPREAD for multi-node CPU cells", hashed=False)


@dataclass
class StorageSection:
    checkpoint_uri: str = opt("./runs", "Ray storage_path: checkpoints live under <this>/<run_id>", hashed=False)
    num_to_keep: int = opt(2, "checkpoints kept per run", hashed=False)


@dataclass
class ResultsSection:
    store_uri: str = opt("./results", "results store root (one Parquet file per run attempt)", hashed=False)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    storage: StorageSection = field(default_factory=StorageSection)
    results: ResultsSection = field(default_factory=ResultsSection)

    @property
    def run_id(self) -> str:
        return run_id(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self)


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with validation


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner[0], key) if len(inner) == 1 else value
        except ConfigError:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})") from None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            if full in RETIRED and value == RETIRED[full]:
                continue
            raise _unknown_key(full, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, full)
            continue
        if fields[key].metadata.get("size"):
            try:
                parse_size(value)
            except ConfigError:
                raise ConfigError(f"{full}: expected a size like '512x1024', got {value!r}") from None
        value = _coerce(value, tp, full)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{full}: unknown value {value!r}{hint}; valid choices: {', '.join(choices)}")
        kwargs[key] = value
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Checks beyond a single field's type: ranges, lengths, and how the batch splits over the workers."""
    positive = [("data.batch_size", cfg.data.batch_size), ("schedule.iters", cfg.schedule.iters),
                ("optimizer.lr", cfg.optimizer.lr)]
    if cfg.model.num_classes is not None:
        positive.append(("model.num_classes", cfg.model.num_classes))
    for key, value in positive:
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    if cfg.cluster.cpus_per_worker < 0:
        raise ConfigError(f"cluster.cpus_per_worker: must be >= 0 (0 sizes it from the nodes), "
                          f"got {cfg.cluster.cpus_per_worker!r}")
    if cfg.cluster.num_workers < 0:
        raise ConfigError(f"cluster.num_workers: must be >= 0 (0 runs in-process), got {cfg.cluster.num_workers}")
    lo_hi = cfg.data.ratio_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise ConfigError(f"data.ratio_range: expected [low, high] with 0 < low <= high, got {lo_hi!r}")
    for key, seq in [("data.mean", cfg.data.mean), ("data.std", cfg.data.std)]:
        if len(seq) != 3:
            raise ConfigError(f"{key}: expected 3 values (R, G, B), got {seq!r}")
    # How the batch splits over the workers: wrong here, a sweep cell is wrong before anything runs.
    world, micro, _ = split_batch(cfg)
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} does not split over "
                          f"cluster.num_workers {world}; use a multiple of {world}")
    if micro <= 0 or (cfg.data.batch_size // world) % micro:
        raise ConfigError(f"cluster.micro_batch {cfg.cluster.micro_batch} must divide the per-worker batch "
                          f"{cfg.data.batch_size // world}")
    if cfg.cluster.amp == "fp16" and not cfg.cluster.use_gpu:
        raise ConfigError("cluster.amp fp16 needs GPUs (cluster.use_gpu: true); use bf16 or none on CPU")


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    _check(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# YAML files, inheritance and overrides


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `5e-4` as a float (YAML 1.2), as mmseg users write it."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def _merge(parent: dict, child: dict) -> dict:
    out = dict(parent)
    for key, value in child.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section in a child keeps the parent's
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance loops: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path (one parent), got {base!r}")
    return _merge(_read_yaml(path.parent / base, (*seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; values are YAML scalars or flow lists (`[1, 2]`)."""
    data = _merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override {item!r}; expected section.key=value, e.g. data.batch_size=16")
        try:
            value = _safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"bad override {item!r}: the value is not valid YAML") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {} if child is None else child
            node = child
        if not isinstance(node, dict):
            raise ConfigError(f"bad override {item!r}: '{'.'.join(parts[:-1])}' is not a section")
        node[parts[-1]] = value
    return data


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a job file (or the embedded default when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        data.setdefault("run", {})
        if isinstance(data["run"], dict):
            data["run"].setdefault("name", Path(path).stem)
    return from_dict(apply_overrides(data, overrides or []))


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists of numbers inline: readable and diff-friendly."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_yaml(cfg: Config) -> str:
    """The whole resolved config; `load` of this text gives back an equal Config."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def loads_yaml(text: str) -> Config:
    data = _safe_load(text) or {}
    return from_dict(data)


# ---------------------------------------------------------------------------------------------
# Deterministic run ids


def training_fields(cfg: Config) -> dict[str, Any]:
    """The fields that change what is trained, leaving out those still at their default.

    Leaving defaults out keeps old run ids stable when a later version adds a field (a new field's
    default is the old behaviour). Changing a default's meaning needs a RUN_ID_VERSION bump.
    """
    out: dict[str, Any] = {}
    default = Config()
    for section in dataclasses.fields(Config):
        current, base = getattr(cfg, section.name), getattr(default, section.name)
        for f in dataclasses.fields(current):
            if not f.metadata.get("hashed", True):
                continue
            value = getattr(current, f.name)
            if value != getattr(base, f.name):
                out[f"{section.name}.{f.name}"] = value
    return out


def run_id(cfg: Config) -> str:
    """A short stable id of the training-relevant config: Ray run name, SLURM job name, results key."""
    payload = json.dumps({"v": RUN_ID_VERSION, **training_fields(cfg)}, sort_keys=True, separators=(",", ":"))
    return "r" + hashlib.sha256(payload.encode()).hexdigest()[:11]


def with_dataset(cfg: Config, fingerprint: str, uri: str = "") -> Config:
    """`cfg` for the dataset whose manifest has `fingerprint` (shards.Manifest.fingerprint): data.fingerprint
    filled in when empty, so the run id names the dataset as well as the training (where the data lives,
    data.uri, stays out of it). A config that pins another fingerprint is a ConfigError."""
    if cfg.data.fingerprint and cfg.data.fingerprint != fingerprint:
        raise ConfigError(f"data.fingerprint is {cfg.data.fingerprint} but the dataset at {uri or cfg.data.uri} "
                          f"has {fingerprint}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fingerprint=fingerprint))


def resolve_dataset(cfg: Config) -> Config:
    """`with_dataset` for the manifest at data.uri, read here; a DataError (one line) when it cannot be."""
    from ocr_cluster.data.plan import open_dataset  # reads object storage: only when a run id is resolved

    return with_dataset(cfg, open_dataset(cfg.data).fingerprint)


def describe() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every field, for `--help`-style listings."""
    rows = []
    default = Config()
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        sec_hints = typing.get_type_hints(hints[section.name])
        for f in dataclasses.fields(hints[section.name]):
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc = (doc + "; " if doc else "") + "one of " + ", ".join(f.metadata["choices"])
            rows.append((f"{section.name}.{f.name}", _type_name(sec_hints[f.name]),
                         getattr(getattr(default, section.name), f.name), doc))
    return rows
