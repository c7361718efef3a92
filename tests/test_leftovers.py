"""Nothing left behind: `scripts/services.py up` stopped by a signal, and a test session's temp files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import conftest
import services  # scripts/services.py, on sys.path through conftest

REPO = Path(__file__).resolve().parents[1]


def _read_json(stream) -> dict:
    """The JSON object `services.py up` prints (its lines up to the closing brace)."""
    lines = []
    for line in stream:
        lines.append(line)
        if line.rstrip() == "}":
            return json.loads("".join(lines))
    raise AssertionError(f"services.py exited before printing its environment: {''.join(lines)}")


@pytest.mark.s3
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_services_up_cleans_up_on_a_signal(sig):
    if not (services.VENV_BIN / "moto_server").exists():
        pytest.skip("no moto_server in this environment")
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "services.py"), "up", "s3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = {}
    try:
        started = _read_json(proc.stdout)
        (moto,) = started["pids"]
        workdir = Path(started["workdir"])
        assert Path(f"/proc/{moto}").exists() and workdir.is_dir()
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        moto_outlived, workdir_left = services._alive(moto), workdir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if started:  # whatever the outcome, leave nothing behind ourselves
            services.Service("s3", {}, started["pids"], Path(started["workdir"])).stop()
    assert not moto_outlived, f"moto (pid {moto}) outlived services.py"
    assert not workdir_left


def test_the_session_has_its_own_temp_dir(tmp_path):
    assert tempfile.gettempdir() == conftest.SESSION_TMP == os.environ["TMPDIR"]
    assert not tmp_path.is_relative_to(conftest.SESSION_TMP)  # pytest's dirs: kept for failed tests
    (tmp_path / "output").write_bytes(b"x" * 1000)
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.mkdtemp(prefix='pymp-'))"],
                           capture_output=True, text=True, check=True)
    assert Path(child.stdout.strip()).parent == Path(conftest.SESSION_TMP)  # subprocesses and services inherit it


def test_a_test_session_leaves_nothing_in_the_temp_dir(tmp_path):
    """A nested pytest run with its own TMPDIR: afterwards only pytest's (emptied) tmp_path root remains."""
    root = tmp_path / "tmp"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DEBUG_TEMPROOT"}
    env["TMPDIR"] = str(root)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_leftovers.py::test_the_session_has_its_own_temp_dir"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(".lock"))
    assert all(p.startswith("pytest-of-") and p.count("/") <= 1 for p in left), left
