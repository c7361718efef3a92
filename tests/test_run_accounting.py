"""Run accounting over attempts: the clock a checkpoint carries, the row's total time and GPU-hours, the
sweep planner reading the total, and the results table telling two seeds of one cell apart."""

from __future__ import annotations

import pytest
import torch

from ocr_cluster import config
from ocr_cluster.results import read_runs, row_from_config, write_run
from ocr_cluster.results import tables
from ocr_cluster.results.rows import checked_row
from ocr_cluster.sweep import estimate as est
from ocr_cluster.train import checkpoint
from ocr_cluster.train.clock import RunClock, gpu_hours


def test_a_resumed_attempt_adds_its_time_to_the_checkpointed_time():
    first = RunClock.start(None, now=1000.0)
    assert first.total_s(now=1060.0) == first.attempt_s(now=1060.0) == 60.0
    at_checkpoint = first.state(now=1100.0)  # the checkpoint the next attempt resumes from
    # The first attempt crashes at 1150: its 50 s after the checkpoint are in no checkpoint.
    second = RunClock.start(at_checkpoint, now=1200.0)
    assert second.started_at == 1000.0  # the run's start, not this attempt's
    assert second.attempt_s(now=1330.0) == 130.0
    assert second.total_s(now=1330.0) == 230.0  # 100 checkpointed + 130
    third = RunClock.start(second.state(now=1300.0), now=2000.0)
    assert (third.started_at, third.total_s(now=2010.0)) == (1000.0, 210.0)


def test_gpu_hours_over_all_attempts_and_none_on_cpu():
    assert gpu_hours(7200.0, 4) == 8.0
    assert gpu_hours(7200.0, 0) is None and gpu_hours(None, 4) is None


def test_the_checkpoint_carries_the_clock(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clock = RunClock.start(None, now=1000.0).state(now=1100.0)
    checkpoint.save(tmp_path / "new", model, optimizer, 8, {}, clock=clock)
    assert checkpoint.load(tmp_path / "new", model, optimizer)[:2] == (8, clock)
    # A checkpoint written before the clock existed: the resumed run counts from its resume.
    checkpoint.save(tmp_path / "old", model, optimizer, 4, {})
    iteration, state, _ = checkpoint.load(tmp_path / "old", model, optimizer)
    assert (iteration, state) == (4, {})
    assert RunClock.start(state, now=500.0) == RunClock(500.0, 0.0, 500.0)


def cfg(gpu: bool = True, **sets):
    base = {"model.backbone": "hrnetv2_w18", "schedule.iters": 40000, "data.batch_size": 8,
            "cluster.num_workers": 4, "cluster.use_gpu": gpu}
    return config.load(None, [f"{k}={v}" for k, v in {**base, **sets}.items()])


def test_the_row_gpu_hours_cover_all_attempts():
    row = checked_row(row_from_config(cfg(), status="completed", train_time_s=1800.0, total_time_s=5400.0))
    assert row["gpu_hours"] == pytest.approx(5400.0 * 4 / 3600)
    older = checked_row(row_from_config(cfg(), status="completed", train_time_s=1800.0))  # no total: as before
    assert older["gpu_hours"] == pytest.approx(1800.0 * 4 / 3600)
    cpu = checked_row(row_from_config(cfg(gpu=False), status="completed", train_time_s=10.0, total_time_s=30.0))
    assert cpu["gpu_hours"] is None and cpu["total_time_s"] == 30.0


def test_the_planner_reads_the_runs_total_time():
    row = row_from_config(cfg(), status="completed", train_time_s=9000.0, total_time_s=36000.0, device="H100")
    (speed,) = est.speeds_from_rows([row])
    assert speed.sec_per_iter == pytest.approx(0.9)  # 36000 s over 40000 iterations, not the last attempt's
    (old,) = est.speeds_from_rows([{**row, "total_time_s": None}])
    assert old.sec_per_iter == pytest.approx(9000.0 / 40000)


def _table(store) -> list[list[str]]:
    runs = read_runs(store).drop_columns(["config_yaml", "iou_per_class"]).to_pylist()
    text = tables.render(tables.seeds_tables(runs))
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()]


def test_two_seeds_of_one_cell_get_a_seed_column(tmp_path):
    store = str(tmp_path)
    write_run(store, row_from_config(cfg(**{"run.seed": 1}), status="completed", miou=77.1))
    write_run(store, row_from_config(cfg(**{"run.seed": 0}), status="completed", miou=77.5))
    write_run(store, row_from_config(cfg(**{"model.backbone": "hrnetv2_w48"}), status="completed", miou=80.0))
    header, _, *body = _table(store)
    assert header == ["Method", "Backbone", "Crop Size", "Lr schd", "Seed", "Mem (GB)", "Inf time (fps)", "mIoU",
                      "mIoU(ms+flip)"]
    assert [(r[1], r[4], r[7]) for r in body] == [("HRNetV2p-W18", "0", "77.50"), ("HRNetV2p-W18", "1", "77.10"),
                                                  ("HRNetV2p-W48", "0", "80.00")]


def test_one_cell_twice_with_one_seed_gets_a_run_column(tmp_path):
    store = str(tmp_path)
    a = row_from_config(cfg(), status="completed", miou=77.1)
    b = row_from_config(cfg(**{"optimizer.lr": 0.02}), status="completed", miou=77.5)  # another setting
    for row in (a, b):
        write_run(store, row)
    header, _, *body = _table(store)
    assert "Seed" not in header and header[4] == "Run"
    assert sorted(r[4] for r in body) == sorted([a["run_id"], b["run_id"]])


def test_one_row_per_cell_keeps_the_seeds_layout(tmp_path):
    store = str(tmp_path)
    write_run(store, row_from_config(cfg(), status="completed", miou=77.1))
    write_run(store, row_from_config(cfg(**{"schedule.iters": 80000, "run.seed": 3}), status="completed", miou=78.0))
    header, *_ = _table(store)
    assert "Seed" not in header and "Run" not in header
