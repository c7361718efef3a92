"""The config system: YAML loading, inheritance, overrides, validation, dumping, run ids."""

from __future__ import annotations

import textwrap

import pytest

from ocr_cluster import config
from ocr_cluster.config import ConfigError


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------
# loading and inheritance


def test_embedded_default_is_valid_and_named():
    cfg = config.load()
    assert cfg.run.name == "quickstart"
    assert cfg.data.dataset == "synthetic"
    assert cfg.model.backbone in config.BACKBONES


def test_yaml_values_land_in_the_tree_with_types(tmp_path):
    path = write(tmp_path / "job.yaml", """
        model: {backbone: hrnetv2_w48, num_classes: 19, align_corners: true}
        optimizer: {lr: 1e-2, weight_decay: 5e-4}
        data: {batch_size: 16, ratio_range: [0.5, 1.5], crop_size: 512x1024}
    """)
    cfg = config.load(path)
    assert cfg.model.backbone == "hrnetv2_w48" and cfg.model.num_classes == 19 and cfg.model.align_corners
    # PyYAML alone reads 5e-4 as a string; mmseg users write it this way.
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.weight_decay == 0.0005
    assert isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.data.ratio_range == [0.5, 1.5] and cfg.data.crop_size == "512x1024"
    assert cfg.run.name == "job"  # defaults to the file's stem


def test_int_is_accepted_for_float_fields(tmp_path):
    cfg = config.load(write(tmp_path / "j.yaml", "optimizer: {lr: 1}\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


def test_inheritance_merges_sections_and_replaces_lists(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "root.yaml", """
        model: {backbone: resnet101_d8, head: ocr, num_classes: 19}
        data: {ratio_range: [0.5, 2.0], batch_size: 8}
        optimizer: {lr: 0.01}
    """)
    write(tmp_path / "base" / "mid.yaml", """
        base: root.yaml
        optimizer: {lr: 0.02, weight_decay: 1e-4}
    """)
    child = write(tmp_path / "child.yaml", """
        base: base/mid.yaml
        model: {backbone: resnet50_d8}
        data: {ratio_range: [0.75, 1.25]}
        schedule:
    """)
    cfg = config.load(child)
    assert cfg.model.backbone == "resnet50_d8"
    assert cfg.model.num_classes == 19 and cfg.model.head == "ocr"  # kept from the root
    assert cfg.optimizer.lr == 0.02 and cfg.optimizer.weight_decay == 1e-4  # from the middle
    assert cfg.data.ratio_range == [0.75, 1.25]  # lists are replaced, not merged
    assert cfg.data.batch_size == 8
    assert cfg.schedule == config.ScheduleSection()  # an empty section is no change


def test_empty_child_section_keeps_parent_section(tmp_path):
    write(tmp_path / "p.yaml", "model: {num_classes: 7}\n")
    cfg = config.load(write(tmp_path / "c.yaml", "base: p.yaml\nmodel:\n"))
    assert cfg.model.num_classes == 7


def test_inheritance_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        config.load(tmp_path / "a.yaml")


def test_missing_base_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        config.load(write(tmp_path / "c.yaml", "base: nope.yaml\n"))


def test_base_must_be_a_single_path(tmp_path):
    with pytest.raises(ConfigError, match="'base' must be a file path"):
        config.load(write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="line 2 is not valid YAML"):
        config.load(write(tmp_path / "bad.yaml", "model: {}\ndata: batch_size: 2\nrun: {}\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_empty_file_is_the_default(tmp_path):
    cfg = config.load(write(tmp_path / "empty.yaml", ""))
    assert cfg.model == config.ModelSection()


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_parse_yaml_scalars_and_lists(tmp_path):
    cfg = config.load(overrides=["model.backbone=hrnetv2_w48", "data.batch_size=16", "optimizer.lr=2e-2",
                                 "model.align_corners=true", "data.ratio_range=[0.5, 1.75]",
                                 "model.num_classes=150", "model.dropout_ratio=null"])
    assert cfg.model.backbone == "hrnetv2_w48" and cfg.data.batch_size == 16 and cfg.optimizer.lr == 0.02
    assert cfg.model.align_corners is True and cfg.data.ratio_range == [0.5, 1.75]
    assert cfg.model.num_classes == 150 and cfg.model.dropout_ratio is None


def test_overrides_win_over_the_file_and_its_base(tmp_path):
    write(tmp_path / "p.yaml", "data: {batch_size: 4}\n")
    child = write(tmp_path / "c.yaml", "base: p.yaml\ndata: {batch_size: 8}\n")
    assert config.load(child, ["data.batch_size=32"]).data.batch_size == 32


def test_override_string_stays_a_string():
    assert config.load(overrides=["run.sweep=ablation-1"]).run.sweep == "ablation-1"
    assert config.load(overrides=["data.uri="]).data.uri == ""


@pytest.mark.parametrize("bad, message", [
    ("data.batch_size", "expected section.key=value"),
    ("=3", "expected section.key=value"),
    ("data..batch_size=3", "expected section.key=value"),
    ("data.batch_size=[1", "not valid YAML"),
])
def test_bad_override_syntax(bad, message):
    with pytest.raises(ConfigError, match=message):
        config.load(overrides=[bad])


# ---------------------------------------------------------------------------------------------
# validation: every error is one line naming the key, the bad value and the valid choices


@pytest.mark.parametrize("overrides, message", [
    (["modle.backbone=x"], r"unknown key 'modle' \(did you mean 'model'\?\); valid keys here: run, model, "),
    (["model.backbon=hrnetv2_w48"], r"unknown key 'model.backbon' \(did you mean 'backbone'\?\); valid keys here: "
                                    r"backbone, head,"),
    (["model.backbone=hrnet_w48"], r"model.backbone: unknown value 'hrnet_w48' \(did you mean 'hrnetv2_w48'\?\); "
                                   r"valid choices: hrnetv2_w18_small, hrnetv2_w18, hrnetv2_w48, resnet50_d8"),
    (["model.head=pspnet"], r"model.head: unknown value 'pspnet'; valid choices: ocr, "),
    (["data.dataset=kitti"], r"data.dataset: unknown value 'kitti'; valid choices: synthetic, cityscapes"),
    (["data.batch_size=abc"], r"data.batch_size: expected int, got 'abc' \(str\)"),
    (["data.batch_size=2.5"], r"data.batch_size: expected int, got 2.5 \(float\)"),
    (["data.batch_size=true"], r"data.batch_size: expected int, got True \(bool\)"),
    (["optimizer.lr=fast"], r"optimizer.lr: expected float, got 'fast'"),
    (["model.align_corners=1"], r"model.align_corners: expected bool, got 1 \(int\)"),
    (["model.num_classes=x"], r"model.num_classes: expected int or null, got 'x'"),
    (["data.ratio_range=0.5"], r"data.ratio_range: expected list of float, got 0.5"),
    (["data.ratio_range=[0.5, x]"], r"data.ratio_range\[1\]: expected float, got 'x'"),
    (["data.uri=[1]"], r"data.uri: expected str, got \[1\]"),
    (["model=3"], r"'model' must be a mapping, got 3"),
    (["data.crop_size=512by1024"], r"data.crop_size: expected a size like '512x1024', got '512by1024'"),
    (["data.crop_size=0x512"], r"data.crop_size: expected a size like"),  # YAML 1.1 reads 0x512 as hex
    (["data.crop_size=512"], r"data.crop_size: expected a size like '512x1024', got 512"),
    (["model.backbone.depth=3"], r"model.backbone: expected str, got \{'depth': 3\} \(dict\)"),
    (["data.batch_size=0"], r"data.batch_size: must be > 0, got 0"),
    (["schedule.iters=-5"], r"schedule.iters: must be > 0"),
    (["model.num_classes=0"], r"model.num_classes: must be > 0"),
    (["cluster.num_workers=-1"], r"cluster.num_workers: must be >= 0"),
    (["data.ratio_range=[2.0, 0.5]"], r"data.ratio_range: expected \[low, high\]"),
    (["data.mean=[1, 2]"], r"data.mean: expected 3 values"),
    (["data.batch_size=8", "cluster.num_workers=3"],
     r"^data.batch_size 8 does not split over cluster.num_workers 3; use a multiple of 3$"),
    (["data.batch_size=16", "cluster.num_workers=2", "cluster.micro_batch=3"],
     r"^cluster.micro_batch 3 must divide the per-worker batch 8$"),
    (["data.batch_size=8", "cluster.num_workers=2", "cluster.micro_batch=-2"],
     r"^cluster.micro_batch -2 must divide the per-worker batch 4$"),
    (["cluster.amp=fp16", "cluster.use_gpu=false"],
     r"^cluster.amp fp16 needs GPUs \(cluster.use_gpu: true\); use bf16 or none on CPU$"),
    (["schedule.policy=step"], r"unknown key 'schedule.policy'"),
])
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.load(overrides=overrides)
    assert "\n" not in str(info.value)


def test_parse_size_is_strict_unless_a_square_is_allowed():
    assert config.parse_size("512x1024") == (512, 1024)
    assert config.parse_size("769", square=True) == (769, 769)
    for bad in ("769", "512x", "0x10", "10x0", "axb", "512X1024", " 5x5", "5x5x5", 512):
        with pytest.raises(ConfigError, match="bad size"):
            config.parse_size(bad)
    with pytest.raises(ConfigError, match=r"bad --size '0': expected HxW \(or S for a square\)"):
        config.parse_size("0", square=True, what="--size")


def test_batch_checks_pass_where_the_batch_splits():
    assert config.load(overrides=["data.batch_size=16", "cluster.num_workers=2", "cluster.micro_batch=4"])
    assert config.load(overrides=["data.batch_size=3", "cluster.num_workers=0"])  # Ray's local mode: one worker
    assert config.load(overrides=["cluster.amp=fp16", "cluster.use_gpu=true"])


def test_retired_key_at_its_old_value_still_loads():
    # Every config dumped before schedule.policy was removed has it (results rows, checkpoints).
    old = config.load().to_yaml().replace("schedule:\n", "schedule:\n  policy: poly\n")
    assert "policy: poly" in old
    assert config.loads_yaml(old) == config.load()
    assert config.loads_yaml(old).run_id == config.load().run_id


def test_validation_errors_from_a_file_name_the_key(tmp_path):
    path = write(tmp_path / "typo.yaml", "optimizer:\n  learning_rate: 0.01\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learning_rate'.*valid keys here: type, lr"):
        config.load(path)


# ---------------------------------------------------------------------------------------------
# dumping


def test_dump_round_trips_exactly(tmp_path):
    cfg = config.load(overrides=["model.backbone=resnet101_d8", "model.num_classes=19", "optimizer.lr=0.02",
                                 "optimizer.weight_decay=5e-4", "loss.class_weight=[0.8, 1.2]",
                                 "run.sweep=s1", "model.dropout_ratio=0.1"])
    text = cfg.to_yaml()
    again = config.loads_yaml(text)
    assert again == cfg
    assert again.to_yaml() == text
    # and through a file, as the results store will keep it
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    assert config.load(path) == cfg


def test_dump_lists_every_field():
    text = config.load().to_yaml()
    for key, *_ in config.describe():
        section, name = key.split(".")
        assert f"\n  {name}:" in f"\n{text}", key


# ---------------------------------------------------------------------------------------------
# run ids


def test_run_id_is_stable_and_short():
    a, b = config.load(), config.load()
    assert a.run_id == b.run_id
    assert a.run_id.startswith("r") and len(a.run_id) == 12 and a.run_id[1:].isalnum()


@pytest.mark.parametrize("override", [
    "model.backbone=hrnetv2_w48", "model.head=fcn", "data.batch_size=16", "optimizer.lr=0.02",
    "schedule.iters=80000", "run.seed=1", "data.crop_size=512x1024", "data.dataset=cityscapes",
    "model.align_corners=true", "loss.ohem=true",
])
def test_run_id_changes_with_training_fields(override):
    assert config.load(overrides=[override]).run_id != config.load().run_id


@pytest.mark.parametrize("override", [
    "run.name=other", "run.sweep=s2", "data.uri=s3://elsewhere/synth", "cluster.num_workers=8",
    "cluster.use_gpu=true", "storage.checkpoint_uri=s3://b/runs", "results.store_uri=s3://b/results",
    "schedule.log_interval=10", "evaluation.interval=100",
])
def test_run_id_ignores_where_and_how_it_runs(override):
    assert config.load(overrides=[override]).run_id == config.load().run_id


def test_run_id_same_for_explicit_default(tmp_path):
    explicit = config.load(write(tmp_path / "x.yaml", "optimizer: {lr: 0.01, momentum: 0.9}\n"))
    assert explicit.run_id == config.load().run_id


def test_run_id_survives_dump_and_reload():
    cfg = config.load(overrides=["model.backbone=hrnetv2_w18", "schedule.iters=40000"])
    assert config.loads_yaml(cfg.to_yaml()).run_id == cfg.run_id
