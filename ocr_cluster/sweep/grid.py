"""Sweep grids: one YAML file that expands into named, validated training cells.

    name: ocrnet_hrnet_cityscapes           # the sweep's name (run.sweep, results partition); default: file stem
    base: ../jobs/_base_/cityscapes.yaml    # the job every cell starts from, next to this file; `base:` chains allowed
    set:                                    # fixed overrides for every cell
      cluster.num_workers: 4                #   dotted keys ...
      schedule: {checkpoint_interval: 0}    #   ... or nested sections, as in a job file
    axes:                                   # the product of the axes, in this order
      model.backbone: [hrnetv2_w18, hrnetv2_w48]      # a list: values of the key the axis is named after
      iters: {key: schedule.iters, values: [40000, 80000]}   # the same, under a short axis name
      method:                               # a mapping: named variants, each setting several keys together
        ocrnet: {model.head: ocr}
        ocrnet-dropout: {model.head: ocr_dropout, model.align_corners: true}
    exclude:                                # partial cells dropped from the product
      - {method: ocrnet-dropout, iters: 40000}
    include:                                # partial cells added after the exclusions
      - {model.backbone: hrnetv2_w18_small, method: ocrnet, set: {data.batch_size: 16}}
    seeds: 1                                # runs per cell: N (run.seed 0..N-1) or a list; default: the base's seed
    repeat:                                 # more runs for some cells
      - {method: ocrnet-dropout, seeds: 3}
    backend:                                # where cells run (ocr_cluster.sweep.backends)
      slurm: {partition: gpu, gpus_per_node: 8, time: "2-00:00:00"}

Include / exclude / repeat entries name axes and give a value, a variant name or a list of them ("any
of"); an axis an entry leaves out spans all its values. An include entry may use values outside a key
axis (that is what it adds) and carry `set:` overrides of its own; exclude and repeat entries must match
at least one cell, and an include entry must add one. Axis values that are lists themselves (e.g.
data.ratio_range) need named variants.

A cell's config is the base job's YAML merged with `set`, the axes' overrides in axis order and the
include entry's `set`, then `run.sweep = name` and `run.seed`, validated by ocr_cluster.config. Its name
is the mmseg-style job name (ocr_cluster.sweep.names), plus `_seed<N>` when the cell runs more than
once; its run id is `cfg.run_id`, the training driver's once `resolve` has filled in data.fingerprint from
the cell's dataset (`cells()` reads nothing: its ids are unresolved). Two cells with one name or one run id
are refused.
Order is stable: product cells in axis order (first axis slowest), then include entries in file order;
a cell's seeds are consecutive.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ocr_cluster import config
from ocr_cluster.config import Config, ConfigError
from ocr_cluster.sweep import backends
from ocr_cluster.sweep.names import config_name

GRID_KEYS = ("name", "base", "set", "axes", "exclude", "include", "seeds", "repeat", "backend")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # SLURM job names, store partitions, file names
ENTRY_EXTRAS = {"exclude": (), "include": ("set",), "repeat": ("seeds",)}


class SweepError(ConfigError):
    """A bad grid file; the message is one line naming the file, the place and the problem."""


def _hint(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _nest(overrides: Any, where: str) -> dict[str, Any]:
    """{'schedule.iters': 40000, 'model': {'head': 'fcn'}} -> nested sections, the shape of a job file."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: expected a mapping of keys to values, got {overrides!r}")
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or any(not part for part in key.split(".")):
            raise SweepError(f"{where}: bad key {key!r}; expected section.key or a section mapping")
        for part in reversed(key.split(".")):
            value = {part: value}
        out = config._merge(out, value)
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        out += _flatten(value, full) if isinstance(value, dict) else [(full, value)]
    return out


def _check_key(key: str, where: str) -> None:
    """`key` names one field of the config tree (not a section)."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise SweepError(f"{where}: '{'.'.join(parts[:i])}' is a field, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise SweepError(f"{where}: {config._unknown_key('.'.join(parts[:i + 1]), names)}")
        cls = typing.get_type_hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        raise SweepError(f"{where}: '{key}' is a section; an axis sets one field (use named variants for more)")


@dataclass(frozen=True)
class Axis:
    name: str
    key: str | None                       # a key axis sets this field; None = named variants
    values: tuple[Any, ...]               # key axis: the values; variant axis: the variant names
    variants: dict[str, dict] = field(default_factory=dict)  # variant name -> nested overrides

    def overrides(self, value: Any) -> dict[str, Any]:
        if self.key is None:
            return self.variants[value]
        return _nest({self.key: value}, f"axis {self.name}")

    def label(self, value: Any) -> str:
        return f"{self.name}={value}"


@dataclass
class Cell:
    name: str
    config: Config
    axes: dict[str, Any]                  # axis name -> value or variant name

    @property
    def run_id(self) -> str:
        return self.config.run_id


def _axis(name: Any, spec: Any, where: str) -> Axis:
    if not isinstance(name, str) or not name:
        raise SweepError(f"{where}: axis names are text, got {name!r}")
    if name in ("set", "seeds"):
        raise SweepError(f"{where}: '{name}' is reserved in include/exclude/repeat entries; name the axis otherwise")
    where = f"{where} {name}"
    key = None
    if isinstance(spec, dict) and set(spec) == {"key", "values"}:
        key, spec = spec["key"], spec["values"]
        if not isinstance(key, str):
            raise SweepError(f"{where}: key must be a dotted config key, got {key!r}")
    elif isinstance(spec, list):
        key = name
    if key is not None:
        _check_key(key, where)
        if not isinstance(spec, list) or not spec:
            raise SweepError(f"{where}: expected a non-empty list of values for {key}, got {spec!r}")
        dupes = [v for i, v in enumerate(spec) if v in spec[:i]]
        if dupes:
            raise SweepError(f"{where}: value {dupes[0]!r} is listed twice")
        return Axis(name, key, tuple(spec))
    if not isinstance(spec, dict) or not spec:
        raise SweepError(f"{where}: expected a list of values, {{key: ..., values: [...]}} or a mapping of "
                         f"named variants, got {spec!r}")
    variants = {str(v): _nest(body, f"{where}, variant {v}") for v, body in spec.items()}
    return Axis(name, None, tuple(variants), variants)


def _seeds(value: Any, where: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return tuple(range(value))
    if (isinstance(value, list) and value and len(set(value)) == len(value)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        return tuple(value)
    raise SweepError(f"{where}: expected a number of runs >= 1 or a list of distinct seeds >= 0, got {value!r}")


@dataclass
class Entry:
    """One include / exclude / repeat entry: axis -> allowed values, plus its own keys."""
    where: str
    match: dict[str, tuple[Any, ...]]
    extra: dict[str, Any]

    def matches(self, axes: dict[str, Any]) -> bool:
        return all(axes[name] in allowed for name, allowed in self.match.items())


class Grid:
    """A parsed, checked grid file; `cells()` expands it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.label = str(path)  # as the user wrote it, for error lines
        raw = self._read()
        unknown = [k for k in raw if k not in GRID_KEYS]
        if unknown:
            raise self.error(f"unknown key '{unknown[0]}'{_hint(unknown[0], list(GRID_KEYS))}; "
                             f"valid keys: {', '.join(GRID_KEYS)}")
        self.name = raw.get("name", self.path.stem)
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise self.error(f"name: expected letters, digits, '.', '_' or '-', got {self.name!r}")
        if not isinstance(raw.get("base"), str):
            raise self.error(f"base: expected the path of a job YAML (relative to this file), got {raw.get('base')!r}")
        self.base = self.path.parent / raw["base"]
        try:
            self.base_data = config._read_yaml(self.base)
            self.backend = backends.from_dict(raw.get("backend"))
        except SweepError:
            raise
        except ConfigError as exc:
            raise self.error(str(exc)) from None
        self.fixed = self._nest(raw.get("set"), "set")
        axes = raw.get("axes") or {}
        if not isinstance(axes, dict):
            raise self.error(f"axes: expected a mapping of axis name to values or variants, got {axes!r}")
        self.axes = [self._wrap(_axis, name, spec, "axis") for name, spec in axes.items()]
        self.seeds = self._wrap(_seeds, raw.get("seeds"), "seeds")
        self.entries = {kind: self._entries(raw.get(kind), kind) for kind in ENTRY_EXTRAS}
        self._cells: list[Cell] | None = None

    # -- reading ------------------------------------------------------------------------------

    def error(self, message: str) -> SweepError:
        return SweepError(f"{self.label}: {message}")

    def _wrap(self, fn, *args):
        try:
            return fn(*args)
        except SweepError as exc:
            raise self.error(str(exc)) from None

    def _nest(self, overrides: Any, where: str) -> dict[str, Any]:
        return self._wrap(_nest, overrides, where)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise SweepError(f"grid file not found: {self.label}")
        try:
            raw = config._safe_load(self.path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise SweepError(f"{self.label}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise self.error(f"the top level must be a mapping with {', '.join(GRID_KEYS)}")
        return raw

    def _entries(self, raw: Any, kind: str) -> list[Entry]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.error(f"{kind}: expected a list of partial cells, got {raw!r}")
        return [self._entry(item, kind, f"{kind}[{i}]") for i, item in enumerate(raw)]

    def _entry(self, raw: Any, kind: str, where: str) -> Entry:
        if not isinstance(raw, dict):
            raise self.error(f"{where}: expected a mapping of axis to value, got {raw!r}")
        axes = {a.name: a for a in self.axes}
        match, extra = {}, {}
        for key, value in raw.items():
            if key in ENTRY_EXTRAS[kind]:
                extra[key] = value
                continue
            if key not in axes:
                valid = list(axes) + list(ENTRY_EXTRAS[kind])
                raise self.error(f"{where}: unknown axis '{key}'{_hint(key, valid)}; valid here: {', '.join(valid)}")
            axis, values = axes[key], tuple(value if isinstance(value, list) else [value])
            for v in values:
                known = [str(x) for x in axis.values]
                if axis.key is None and str(v) not in axis.variants:
                    raise self.error(f"{where}: unknown variant '{v}' of axis {key}{_hint(v, known)}; "
                                     f"variants: {', '.join(known)}")
                if axis.key is not None and kind == "exclude" and v not in axis.values:
                    raise self.error(f"{where} matches no cell: {v!r} is not a value of axis {key}; "
                                     f"values: {', '.join(known)}")
            match[key] = tuple(str(v) for v in values) if axis.key is None else values
        if kind == "exclude" and not match:
            raise self.error(f"{where}: names no axis (it would drop every cell)")
        if kind == "repeat":
            if "seeds" not in extra:
                raise self.error(f"{where}: needs seeds: (a number of runs or a list of seeds)")
            extra["seeds"] = self._wrap(_seeds, extra["seeds"], f"{where} seeds")
        if "set" in extra:
            extra["set"] = self._nest(extra["set"], f"{where} set")
        return Entry(where, match, extra)

    # -- expansion ----------------------------------------------------------------------------

    def _assignments(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(axis values, the include entry's own overrides) for every cell, in order."""
        names = [a.name for a in self.axes]
        product = [dict(zip(names, combo)) for combo in itertools.product(*(a.values for a in self.axes))]
        # An exclude entry always matches a cell of the full product: its values were checked in _entry.
        product = [c for c in product if not any(e.matches(c) for e in self.entries["exclude"])]
        cells = [(c, {}) for c in product]
        for entry in self.entries["include"]:
            spans = [entry.match.get(a.name, a.values) for a in self.axes]
            new = [(dict(zip(names, combo)), entry.extra.get("set", {})) for combo in itertools.product(*spans)]
            new = [c for c in new if c not in cells]
            if not new:
                raise self.error(f"{entry.where} adds no cell: every cell it names is already in the grid")
            cells += new
        return cells

    def _seeds_of(self, axes: dict[str, Any]) -> tuple[int | None, ...]:
        seeds: tuple[int | None, ...] = self.seeds or (None,)
        for entry in self.entries["repeat"]:
            if entry.matches(axes):
                seeds = entry.extra["seeds"]
        return seeds

    def _build(self, layers: list[dict[str, Any]], label: str) -> Config:
        data = self.base_data
        for layer in layers:
            data = config._merge(data, layer)
        try:
            return config.from_dict(data)
        except ConfigError as exc:
            raise self.error(f"cell {self._name_despite(layers, label)}: {exc}") from None

    def _name_despite(self, layers: list[dict[str, Any]], label: str) -> str:
        """The failing cell's name, from the overrides that do validate, and its axis values."""
        data = self.base_data
        for key, value in (kv for layer in layers for kv in _flatten(layer)):
            trial = config._merge(data, _nest({key: value}, key))
            try:
                config.from_dict(trial)
                data = trial
            except ConfigError:
                continue
        try:
            return f"{config_name(config.from_dict(data))} ({label})"
        except ConfigError:
            return f"({label})"

    def cells(self) -> list[Cell]:
        """Every cell, validated and named; SweepError (one line) for the first bad one."""
        if self._cells is not None:
            return self._cells
        out: list[Cell] = []
        for axes, own in self._assignments():
            label = ", ".join(a.label(axes[a.name]) for a in self.axes) or "the only cell"
            layers = [self.fixed, *(a.overrides(axes[a.name]) for a in self.axes), own, {"run": {"sweep": self.name}}]
            seeds = self._seeds_of(axes)
            for seed in seeds:
                cfg = self._build(layers + ([{"run": {"seed": seed}}] if seed is not None else []), label)
                name = config_name(cfg) + (f"_seed{cfg.run.seed}" if len(seeds) > 1 else "")
                cfg.run.name = name
                out.append(Cell(name, cfg, dict(axes)))
        for entry in self.entries["repeat"]:
            if not any(entry.matches(c.axes) for c in out):
                raise self.error(f"{entry.where} matches no cell")
        self._check_unique(out)
        self._cells = out
        return out

    def _check_unique(self, cells: list[Cell]) -> None:
        by_name: dict[str, Cell] = {}
        by_id: dict[str, Cell] = {}
        for cell in cells:
            other = by_id.get(cell.run_id)
            if other is not None:
                raise self.error(f"cells {other.name} and {cell.name} train the same thing (run id {cell.run_id}); "
                                 f"drop one")
            other = by_name.get(cell.name)
            if other is not None:
                a, b = config.training_fields(other.config), config.training_fields(cell.config)
                diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                raise self.error(f"two cells are named {cell.name} but differ in {', '.join(diff)}; a name shows "
                                 f"method, backbone, GPUs x batch, iters, dataset and crop: split the grid")
            by_name[cell.name] = by_id[cell.run_id] = cell


def resolve(cells: list[Cell]) -> tuple[list[Cell], list[str]]:
    """The cells with the run ids the driver computes: data.fingerprint from each dataset's manifest (each
    data.uri read once), and warning lines. A dataset that cannot be read leaves its cells unresolved (their
    driver stops in preflight, and its failed row carries the unresolved id); a cell pinning another
    dataset's fingerprint is a SweepError."""
    from ocr_cluster.data.plan import open_dataset  # reads object storage: only when asked

    found: dict[tuple[str, str], str | Exception] = {}
    out, notes = [], []
    for cell in cells:
        key = (cell.config.data.uri, cell.config.data.dataset)
        if key not in found:
            try:
                found[key] = open_dataset(cell.config.data).fingerprint
            except Exception as exc:  # noqa: BLE001 - DataError, DataUnreachable, a bad URL: all one line
                found[key] = exc
                notes.append(f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}: cells on "
                             f"{key[0]} show run ids without the dataset's fingerprint")
        fingerprint = found[key]
        if isinstance(fingerprint, Exception):
            out.append(cell)
            continue
        try:
            out.append(Cell(cell.name, config.with_dataset(cell.config, fingerprint), cell.axes))
        except ConfigError as exc:
            raise SweepError(f"cell {cell.name}: {exc}") from None
    return out, notes


def load(path: str | Path) -> Grid:
    """Read and check a grid file (its cells expand on `cells()`)."""
    return Grid(path)


def expand(path: str | Path) -> list[Cell]:
    return Grid(path).cells()
