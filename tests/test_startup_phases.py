"""Start-up phase marks (ocr_cluster.train.phases), the step trace's timing fields, the training stream's
first batch fetched in the background (loop.FirstInBackground), and the driver's check that torch and Ray are
byte-compiled. Plain Python: no Ray cluster."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ocr_cluster.train import phases


def test_marks_go_to_the_trace_dir_with_wall_and_cpu_time(tmp_path, monkeypatch):
    monkeypatch.setenv(phases.STARTUP_ENV, str(tmp_path))
    monkeypatch.setattr(phases, "_marked", False)
    before = time.time()
    phases.mark("driver_main")
    phases.mark("fit", rank=1)
    first, second = [json.loads(line) for line in (tmp_path / "startup.jsonl").read_text().splitlines()]
    assert (first["phase"], second["phase"], second["rank"]) == ("driver_main", "fit", 1)
    assert before <= first["t"] <= second["t"] <= time.time()
    assert 0 <= first["cpu"] <= second["cpu"]
    # The process's start is in its first mark only, and it is before the mark.
    assert first["process_start"] is not None and first["process_start"] <= first["t"] + 0.01
    assert "process_start" not in second


def test_no_trace_dir_no_file(tmp_path, monkeypatch):
    monkeypatch.delenv(phases.STARTUP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    phases.mark("driver_main")
    assert list(tmp_path.iterdir()) == []


def test_the_step_trace_records_when_each_step_ended(tmp_path, monkeypatch):
    import torch

    from ocr_cluster.train.trace import TRACE_ENV, StepTrace

    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    trace = StepTrace(rank=0)
    for done in (1, 2):
        trace.batch({"key": ["a"], "image": torch.zeros(1, 3, 4, 4)}, torch.tensor(1.0), accum=1)
        trace.step(done, lr=0.1)
    steps = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert [s["iter"] for s in steps] == [1, 2]
    assert steps[0]["t"] <= steps[1]["t"] and steps[0]["cpu"] <= steps[1]["cpu"]


def test_the_first_item_is_fetched_before_it_is_asked_for():
    from ocr_cluster.train.loop import FirstInBackground

    fetched = threading.Event()

    def items():
        fetched.set()
        yield threading.current_thread().name
        yield threading.current_thread().name

    stream = FirstInBackground(items())
    assert fetched.wait(10), "the first item was not fetched in the background"
    first, second = list(stream)
    assert first != threading.current_thread().name  # fetched on the background thread
    assert second == threading.current_thread().name  # the rest on the caller's


def test_an_error_of_the_first_fetch_is_raised_at_the_first_next():
    from ocr_cluster.train.loop import FirstInBackground

    def items():
        raise ValueError("bad sample")
        yield  # pragma: no cover

    stream = FirstInBackground(items())
    with pytest.raises(ValueError, match="bad sample"):
        next(stream)


def test_an_empty_stream_ends_at_once():
    from ocr_cluster.train.loop import FirstInBackground

    assert next(FirstInBackground(iter(())), None) is None


def test_a_package_without_byte_code_is_named_until_it_is_compiled(tmp_path, monkeypatch):
    import py_compile
    import sys

    from ocr_cluster.train.bytecode import bytecode_warning

    for name in ("slowpkg_a", "slowpkg_b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("VALUE = 1\n")
    py_compile.compile(str(tmp_path / "slowpkg_b" / "__init__.py"), doraise=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = bytecode_warning(("slowpkg_a", "slowpkg_b"))
    assert line is not None and line.startswith("warning: slowpkg_a is not byte-compiled in this Python")
    assert "slowpkg_b" not in line
    assert line.endswith(f"python -m compileall -q -j 0 {tmp_path}")  # the folder that holds the package
    py_compile.compile(str(tmp_path / "slowpkg_a" / "__init__.py"), doraise=True)
    assert bytecode_warning(("slowpkg_a", "slowpkg_b")) is None
    assert "slowpkg_a" not in sys.modules  # found, never imported


def test_the_venv_make_builds_is_byte_compiled():
    """`make venv` compiles what pip installed; without it every Ray process compiles torch and Ray again."""
    from ocr_cluster.train.bytecode import bytecode_warning

    line = bytecode_warning(("torch", "ray", "pyarrow", "numpy"))
    assert line is None, f"{line} (a venv made before `make venv` compiled: `make clean test` rebuilds it)"
