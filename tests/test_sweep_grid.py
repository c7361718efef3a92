"""Sweep grids: the format's checks, the seeds' grids in sweeps/, and `ocr-cluster sweep plan` on a real store."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from ocr_cluster import cli as cli_mod
from ocr_cluster import config
from ocr_cluster.models.names import BACKBONES as ZOO_BACKBONES
from ocr_cluster.models.names import HEADS
from ocr_cluster.results import row_from_config, write_run
from ocr_cluster.sweep import estimate as est
from ocr_cluster.sweep.grid import SweepError, load
from ocr_cluster.sweep.names import BACKBONE_SHORT, DATASET_SHORT, METHOD_SHORT, config_name

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
JOBS = sorted(p for p in (REPO / "jobs").rglob("*.yaml")
              if "_base_" not in p.parts and p.stem not in ("runtime_env", "quickstart"))

# (cells, runs) per grid, derived from the seeds' tables (see each file's header comment)
COUNTS = {
    "quickstart": (4, 4),
    "ocrnet_hrnet_cityscapes": (11, 11),       # 3 HRNets x 3 schedules + dropout W48 80k / 160k
    "ocrnet_hrnet_ade20k": (6, 6),             # 3 x {80k, 160k}
    "ocrnet_hrnet_voc12aug": (6, 6),           # 3 x {20k, 40k}
    "openseg_resnet_cityscapes": (33, 47),     # 26 reported (head, batch, iters) + 7 single rows; repeats
    "openseg_resnet_ade20k": (7, 10),          # R-101 OCR 3 runs, OCRNetPlus (OCR & Decoder) 2 runs
    "ocnet_cityscapes": (3, 3),                # base_oc, asp_oc, asp_oc + OHEM
    "sssegmentation_voc12aug": (5, 5),         # 3 HRNets
    "sssegmentation_ade20k": (5, 5),
    "sssegmentation_cityscapes": (5, 5),
}


def base_name(cell) -> str:
    return cell.name.rsplit("_seed", 1)[0]


def grid(tmp_path: Path, body: str, name: str = "g.yaml") -> Path:
    """A grid file in tmp_path on the quickstart job (2 CPU workers, batch 8, 300 iterations)."""
    path = tmp_path / name
    path.write_text(f"base: {REPO / 'jobs' / 'quickstart.yaml'}\n" + textwrap.dedent(body))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(SweepError) as info:
        load(path).cells()
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


# ---------------------------------------------------------------------------------------------
# sweeps/: the seeds' grids


def test_every_grid_file_has_pinned_counts():
    assert sorted(p.stem for p in SWEEPS.glob("*.yaml")) == sorted(COUNTS)


@pytest.mark.parametrize("stem", sorted(COUNTS))
def test_seed_grid_expands_and_validates(stem):
    g = load(SWEEPS / f"{stem}.yaml")
    cells = g.cells()
    cells_, runs = COUNTS[stem]
    assert (len({base_name(c) for c in cells}), len(cells)) == (cells_, runs)
    assert g.name == stem
    for cell in cells:
        assert cell.config.run.sweep == stem and cell.config.run.name == cell.name
        assert base_name(cell) == config_name(cell.config)
    assert len({c.run_id for c in cells}) == len(cells)


def test_jobs_files_are_cells_with_the_same_run_id():
    cells = {}
    for path in SWEEPS.glob("*.yaml"):
        for cell in load(path).cells():
            if cell.config.run.seed == 0:
                cells.setdefault(base_name(cell), []).append(cell)
    for job in JOBS:
        found = cells.get(job.stem)
        assert found, f"no sweep cell is named {job.stem}"
        assert {c.run_id for c in found} == {config.load(job).run_id}, job.stem


def test_ablation_rows_carry_their_recipe_and_repeats():
    cells = {c.name: c for c in load(SWEEPS / "openseg_resnet_cityscapes.yaml").cells()}
    b16 = cells["ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024_seed2"].config
    assert (b16.optimizer.lr, b16.schedule.min_lr, b16.run.seed) == (0.02, 2e-4, 2)
    crop = cells["ocrnet_r101-d8_4xb2-40k_cityscapes-769x769"].config
    assert (crop.model.align_corners, crop.evaluation.mode, crop.data.scale) == (True, "slide", "2049x1025")
    assert "ocrnet_r101-d8_8xb2-60k_cityscapes-512x1024" not in cells  # the seed lists it without a number
    d16 = cells["deeplabv3plus_r101-d16_8xb2-80k_cityscapes-512x1024_seed1"].config
    assert d16.schedule.min_lr == 1e-4
    ohem = [c.config for c in load(SWEEPS / "ocnet_cityscapes.yaml").cells() if c.config.loss.ohem]
    assert [(c.model.head, c.loss.ohem_thresh, c.loss.ohem_min_kept) for c in ohem] == [("asp_oc", 0.7, 100000)]


def test_naming_covers_the_model_zoo():
    assert set(METHOD_SHORT) == set(HEADS) and set(BACKBONE_SHORT) == set(ZOO_BACKBONES)
    assert set(DATASET_SHORT) == set(config.DATASETS)


# ---------------------------------------------------------------------------------------------
# expansion: order, names, run ids, configs


def test_quickstart_names_run_ids_and_order_are_stable():
    cells = load(SWEEPS / "quickstart.yaml").cells()
    assert [(c.name, c.run_id) for c in cells] == [
        ("ocrnet_hr18s_2xb4-50_synthetic-128x128", "r361fe93325f"),
        ("ocrnet_hr18s_2xb4-100_synthetic-128x128", "rf7380184fc7"),
        ("fcn_hr18s_2xb4-50_synthetic-128x128", "r376d776fd3c"),
        ("fcn_hr18s_2xb4-100_synthetic-128x128", "rb714d072474"),
    ]
    assert [c.axes for c in cells][1] == {"model.head": "ocr", "iters": "longer"}
    # A cell is the base job with the cell's overrides, loaded by ocr_cluster.config.
    same = config.load(REPO / "jobs" / "quickstart.yaml",
                       ["model.head=fcn", "schedule.iters=100", "optimizer.type=sgd", "optimizer.lr=0.01",
                        "optimizer.weight_decay=0.0005", "schedule.min_lr=0.0001", "cluster.amp=none",
                        "schedule.checkpoint_interval=50", "evaluation.interval=50", "run.sweep=quickstart"])
    assert cells[3].config.run_id == same.run_id and cells[3].config.model == same.model
    assert cells[3].config.schedule == same.schedule


def test_seeds_include_exclude_and_repeat(tmp_path):
    path = grid(tmp_path, """
        name: small
        set: {data.batch_size: 8}
        axes:
          model.head: [ocr, fcn]
          iters: {key: schedule.iters, values: [100, 200]}
        exclude:
          - {model.head: fcn, iters: 200}
        include:
          - {model.head: deeplabv3, iters: 100, set: {optimizer.lr: 0.02}}
        seeds: 1
        repeat:
          - {model.head: ocr, iters: [200], seeds: [3, 5]}
    """)
    cells = load(path).cells()
    assert [c.name for c in cells] == [
        "ocrnet_hr18s_2xb4-100_synthetic-128x128",
        "ocrnet_hr18s_2xb4-200_synthetic-128x128_seed3",
        "ocrnet_hr18s_2xb4-200_synthetic-128x128_seed5",
        "fcn_hr18s_2xb4-100_synthetic-128x128",
        "deeplabv3_hr18s_2xb4-100_synthetic-128x128",
    ]
    assert [c.config.run.seed for c in cells] == [0, 3, 5, 0, 0]
    assert cells[-1].config.optimizer.lr == 0.02 and cells[0].config.optimizer.lr == 0.001  # the base job's
    assert [c.run_id for c in load(path).cells()] == [c.run_id for c in cells]  # deterministic


# ---------------------------------------------------------------------------------------------
# format errors: one line naming the file, the place and the key


def test_unknown_key_in_a_cell_override_names_the_cell(tmp_path):
    path = grid(tmp_path, """
        axes:
          variant:
            good: {model.head: ocr}
            bad: {model.backbon: hrnetv2_w48}
    """)
    message = error_of(path)
    assert "cell ocrnet_hr18s_2xb4-300_synthetic-128x128 (variant=bad): unknown key 'model.backbon' " \
           "(did you mean 'backbone'?)" in message


def test_bad_value_names_the_cell_and_the_choices(tmp_path):
    message = error_of(grid(tmp_path, "axes:\n  model.head: [ocr, ocrr]\n"))
    assert "(model.head=ocrr): model.head: unknown value 'ocrr' (did you mean 'ocr'?)" in message


@pytest.mark.parametrize("body, expected", [
    ("axes:\n  model.backbon: [hrnetv2_w48]\n", "axis model.backbon: unknown key 'model.backbon' (did you mean 'backbone'?)"),
    ("axes:\n  model: [a]\n", "axis model: 'model' is a section"),
    ("axes:\n  v: {a: 3}\n", "axis v, variant a: expected a mapping of keys to values, got 3"),
    ("axes:\n  model.head: []\n", "axis model.head: expected a non-empty list"),
    ("axis:\n  model.head: [ocr]\n", "unknown key 'axis' (did you mean 'axes'?)"),
    ("axes:\n  model.head: [ocr, fcn]\nexclude:\n  - {heads: ocr}\n", "exclude[0]: unknown axis 'heads'"),
    ("axes:\n  model.head: [ocr, fcn]\nexclude:\n  - {model.head: isa}\n",
     "exclude[0] matches no cell: 'isa' is not a value of axis model.head"),
    ("axes:\n  it: {short: {schedule.iters: 5}, longer: {schedule.iters: 9}}\ninclude:\n  - {it: lnger}\n",
     "include[0]: unknown variant 'lnger' of axis it (did you mean 'longer'?)"),
    ("axes:\n  model.head: [ocr, fcn]\ninclude:\n  - {model.head: fcn}\n", "include[0] adds no cell"),
    ("axes:\n  model.head: [ocr, fcn]\nrepeat:\n  - {model.head: isa, seeds: 2}\n", "repeat[0] matches no cell"),
    ("axes:\n  model.head: [ocr, fcn]\nrepeat:\n  - {model.head: ocr}\n", "repeat[0]: needs seeds"),
    ("seeds: 0\n", "seeds: expected a number of runs >= 1"),
    ("backend:\n  slurm: {partiton: gpu}\n", "unknown key 'backend.slurm.partiton' (did you mean 'partition'?)"),
    ("backend:\n  slurm: {time: 3 days}\n", "backend.slurm.time: expected an sbatch time"),
    ("backend:\n  slurm: {sbatch: [exclusive]}\n", "backend.slurm.sbatch: expected long options"),
    ("backend:\n  ray: {early_stopping: {grace_period: -1}}\n", "backend.ray.early_stopping.grace_period: expected "
     "iterations >= 0"),
    ("backend:\n  ray: {early_stopping: {reduction_factor: 1}}\n",
     "backend.ray.early_stopping.reduction_factor: expected a number > 1"),
    ("backend:\n  ray: {early_stopping: {grace_perod: 2}}\n",
     "unknown key 'backend.ray.early_stopping.grace_perod' (did you mean 'grace_period'?)"),
    ("backend:\n  ray: {early_stopping: {grace_period: two}}\n", "backend.ray.early_stopping.grace_period: expected"),
    ("axes:\n  optimizer.lr: [0.01, 0.02]\n",
     "two cells are named ocrnet_hr18s_2xb4-300_synthetic-128x128 but differ in optimizer.lr"),
    ("axes:\n  cluster.num_workers: [2, 4]\n", "train the same thing"),
    ("name: bad name\n", "name: expected letters"),
])
def test_format_errors(tmp_path, body, expected):
    assert expected in error_of(grid(tmp_path, body))


@pytest.mark.parametrize("given, enabled, grace, factor", [
    (None, False, 0, 4.0),                                   # off by default
    ({"grace_period": 200}, True, 200, 4.0),                 # a mapping turns it on
    ({"reduction_factor": 3, "enabled": False}, False, 0, 3.0),
    (True, True, 0, 4.0),
])
def test_early_stopping_option(tmp_path, given, enabled, grace, factor):
    import yaml

    body = "" if given is None else "backend:\n  ray: " + yaml.safe_dump({"early_stopping": given},
                                                                          default_flow_style=True)
    stopping = load(grid(tmp_path, body)).backend.ray.early_stopping
    assert (stopping.enabled, stopping.grace_period, stopping.reduction_factor) == (enabled, grace, factor)


def test_missing_base_and_bad_yaml(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("base: nowhere.yaml\n")
    assert "config file not found" in error_of(path)
    path.write_text("base: [\n")
    assert "is not valid YAML" in error_of(path)


def test_bad_grid_is_one_line_exit_2(cli, tmp_path):
    path = grid(tmp_path, "axes:\n  model.backbon: [hrnetv2_w48]\n")
    result = cli("sweep", "plan", str(path))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ocr-cluster sweep plan: error: {path}: axis model.backbon")


def test_status_and_dry_run_without_a_cluster(capsys, tmp_path, monkeypatch):
    """Offline: every cell 'not launched' (exit 1: not all completed); a dry run lists what it would submit."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))
    grid = str(SWEEPS / "quickstart.yaml")
    assert cli_mod.main(["sweep", "status", grid, "--store", str(tmp_path), "--json"]) == 1
    states = [json.loads(line)["state"] for line in capsys.readouterr().out.splitlines()]
    assert states == ["not launched"] * 4
    assert cli_mod.main(["sweep", "launch", grid, "--store", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would submit 4 of 4 cells" in out and not (tmp_path / "_launches").exists()
    from ocr_cluster.sweep import slurm_commands, status  # the parser's light copy of the state names
    assert (slurm_commands.LIVE, slurm_commands.COMPLETED) == (status.LIVE, status.COMPLETED)


def test_slurm_time_and_sbatch_options():
    from ocr_cluster.sweep.launch import sbatch_extras
    from ocr_cluster.sweep.slurm import minutes

    assert [minutes(t) for t in ("240", "30:00", "24:00:00", "2-00", "1-02:30", "0-00:00:30")] == \
        [240, 30, 1440, 2880, 1590, 1]
    assert sbatch_extras(["--constraint=a100", "--exclusive"]) == {"constraint": "a100", "exclusive": True}


def test_launch_records_newest_wins_and_cancel_marks(tmp_path):
    from ocr_cluster.sweep import records

    store = str(tmp_path)
    cells = [{"name": "a", "run_id": "r1", "job_id": "7_0"}, {"name": "b", "run_id": "r2", "job_id": "7_1"}]
    records.write_record(store, "s", "launch", {"axes": ["x"], "cells": cells})
    records.write_record(store, "s", "launch", {"axes": ["x", "y"], "cells": [{**cells[1], "job_id": "9"}]})
    records.write_record(store, "s", "cancel", {"job_ids": ["9"]})
    read = records.read_records(store, "s")
    assert [r["kind"] for r in read] == ["launch", "launch", "cancel"]
    subs = records.submitted(read)
    assert (subs["r1"].job_id, subs["r1"].cancelled) == ("7_0", False)
    assert (subs["r2"].job_id, subs["r2"].cancelled) == ("9", True)
    assert records.axes_of(read) == ["x", "y"]


# ---------------------------------------------------------------------------------------------
# sweep plan on a store


GPU_GRID = """
    name: gpu
    set: {cluster.use_gpu: true, cluster.num_workers: 4, data.dataset: cityscapes, data.crop_size: 512x1024}
    axes:
      model.backbone: [hrnetv2_w18, hrnetv2_w48]
      schedule.iters: [40000, 80000]
"""
H100 = "NVIDIA H100 80GB HBM3"


def test_plan_shows_the_store_and_estimates_from_matching_runs(tmp_path, capsys):
    path = grid(tmp_path, GPU_GRID)
    store = str(tmp_path / "store")
    cells = load(path).cells()
    done, failed = cells[0], cells[2]  # hr18 40k, hr48 40k
    write_run(store, row_from_config(done.config, status="completed", miou=77.72, train_time_s=36000.0,
                                     device=H100))
    write_run(store, row_from_config(failed.config, status="failed", error="boom", device=H100))

    assert cli_mod.main(["sweep", "plan", str(path), "--store", store]) == 0
    out = capsys.readouterr().out
    lines = {name: next(line for line in out.splitlines() if name in line) for name in (c.name for c in cells)}
    assert "completed 77.72" in lines[done.name] and done.run_id in lines[done.name]
    # 36000 s / 40000 iters = 0.9 s/iter: 80k iters = 20 h on 4 GPUs = 80 GPU-h
    hr18_80k = lines["ocrnet_hr18_4xb2-80k_cityscapes-512x1024"]
    assert " 20.0 " in hr18_80k and " 80.0 " in hr18_80k and "store: 1 run on NVIDIA H100" in hr18_80k
    assert "failed" in lines[failed.name]
    for name in ("ocrnet_hr48_4xb2-40k_cityscapes-512x1024", "ocrnet_hr48_4xb2-80k_cityscapes-512x1024"):
        assert lines[name].count(" ? ") == 2  # hours and GPU-h unknown: no HRNet-W48 run measured
    assert "4 cells: 1 completed, 1 failed, 2 not in the store" in out
    assert "estimated 120.0 GPU-h (30.0 h of training) for all, 80.0 GPU-h for the 3 not completed" in out
    assert "2 cells have no estimate ('?'), so these totals are lower bounds" in out

    assert cli_mod.main(["sweep", "plan", str(path), "--store", store, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == [c.name for c in cells]
    assert (rows[0]["state"], rows[0]["miou"], rows[0]["est_gpu_hours"]) == ("completed", 77.72, 40.0)
    assert (rows[1]["state"], rows[1]["est_gpu_hours"], rows[1]["sec_per_iter"]) == (None, 80.0, 0.9)
    assert (rows[2]["state"], rows[2]["est_gpu_hours"], rows[3]["est_gpu_hours"]) == ("failed", None, None)
    assert rows[1]["sweep"] == "gpu" and rows[1]["axes"] == {"model.backbone": "hrnetv2_w18",
                                                             "schedule.iters": 80000}

    assert cli_mod.main(["sweep", "plan", str(path), "--no-store", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["state"] for r in rows} == {"unread"} and {r["est_gpu_hours"] for r in rows} == {None}


def test_estimate_needs_one_device_and_falls_back_to_benchmarks(tmp_path):
    cfg = load(grid(tmp_path, GPU_GRID)).cells()[1].config  # hr18, 80k, 4 GPUs x 2
    key = ("hrnetv2_w18", "ocr", "512x1024", 2)
    runs = [est.Speed(*key, H100, 0.9, "run a"), est.Speed(*key, "NVIDIA A100-SXM4-80GB", 1.8, "run b")]
    ambiguous = est.estimate(cfg, runs)
    assert ambiguous.gpu_hours is None and "choose one with --device" in ambiguous.note
    assert est.estimate(cfg, runs, device="a100").gpu_hours == pytest.approx(1.8 * 80000 * 4 / 3600)
    other_batch = [est.Speed("hrnetv2_w18", "ocr", "512x1024", 4, H100, 0.9, "run c")]
    assert est.estimate(cfg, other_batch) == est.UNKNOWN
    bench = (est.Speed(*key, H100, 0.45, "benchmarks/README.md#training"),)
    got = est.estimate(cfg, other_batch, benchmarks=bench)
    assert got.gpu_hours == pytest.approx(40.0) and got.source == f"benchmarks: benchmarks/README.md#training on {H100}"


def test_results_table_of_a_sweep_is_laid_out_by_its_axes(capsys, tmp_path):
    """`results table --sweep S`: rows x columns of the grid's axes, from the manifest `sweep launch` wrote
    or from --grid; runs of the same cells outside the sweep count (the store is keyed by run id)."""
    from ocr_cluster.results import write_sweep_manifest

    cells = load(SWEEPS / "quickstart.yaml").cells()
    store = str(tmp_path)
    for i, cell in enumerate(cells[:3]):
        sweep = "quickstart" if i else ""  # the first one ran as a single job
        write_run(store, row_from_config(cell.config, status="completed", miou=50.0 + i, sweep=sweep))
    write_sweep_manifest(store, "quickstart", [{"run_id": c.run_id, "name": c.name, "axes": json.dumps(c.axes)}
                                         for c in cells])
    assert cli_mod.main(["results", "table", "--store", store, "--sweep", "quickstart"]) == 0
    out = capsys.readouterr().out
    header, _, first, second = out.splitlines()[:4]
    assert header.split("|")[1:-1] == [" model.head ", " short ", " longer "]
    assert first.split("|")[1:-1] == [" ocr        ", " 50.00 ", "  51.00 "]
    assert second.split("|")[1:-1] == [" fcn        ", " 52.00 ", "      - "]
    (tmp_path / "_manifests").rename(tmp_path / "_elsewhere")
    assert cli_mod.main(["results", "table", "--store", store, "--sweep", "quickstart", "--grid",
                         str(SWEEPS / "quickstart.yaml")]) == 0
    assert capsys.readouterr().out == out
    assert cli_mod.main(["results", "table", "--store", store, "--sweep", "quickstart"]) == 0
    assert "| Method |" in capsys.readouterr().out  # no manifest, no grid: the seeds' layout
