"""`pip install .` (a wheel, not editable) gives a working `ocr-cluster` outside the checkout: the dataset
cards, the published numbers and every subpackage travel inside the wheel.

Offline and quick: the wheel is built without build isolation, installed with --no-deps into a fresh
venv that sees the project venv's packages through a .pth path line (a path line does not run the
project venv's own .pth files, so its editable install of ocr_cluster stays invisible).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the build reads (so the checkout gets no build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    for name in ("ocr_cluster", "datasets"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src),
         "-w", str(tmp / "dist")], cwd=tmp, env=dict(os.environ))
    (built,) = (tmp / "dist").glob("ocr_cluster-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed: (its bin directory, an environment without the checkout)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent, env=dict(os.environ))
    python = root / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=root.parent, env=dict(os.environ)).stdout.strip())
    (site / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OCR_CLUSTER_DATASETS")}
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=root.parent, env=env)
    return root / "bin", env


def test_the_wheel_carries_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(REPO).as_posix() for p in (REPO / "ocr_cluster").rglob("__init__.py"))
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {missing}"
    cards = sorted(f"ocr_cluster/datasets/{p.name}" for p in (REPO / "datasets").glob("*.yaml"))
    assert cards and set(cards) <= names, sorted(names)
    assert "ocr_cluster/results/published.csv" in names


def test_installed_cli_works_outside_the_checkout(venv, tmp_path):
    bin_dir, env = venv
    where = run([str(bin_dir / "python"), "-c", "import ocr_cluster; print(ocr_cluster.__file__)"],
                cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(bin_dir.parent) and not Path(where).is_relative_to(REPO), where

    cli = str(bin_dir / "ocr-cluster")
    models = run([cli, "models", "list"], cwd=tmp_path, env=env).stdout
    assert "hrnetv2_w18_small" in models and "ocr" in models, models

    run([cli, "data", "synth", "synth", "--num-train", "4", "--num-val", "2", "--size", "32x32"], cwd=tmp_path,
        env=env)
    report = run([cli, "data", "inspect", "synth"], cwd=tmp_path, env=env).stdout
    assert "synthetic" in report and "train" in report, report

    # A LIP tree in its flat layout: the converter reads the installed lip card (20 classes).
    label = np.arange(20, dtype=np.uint8).reshape(4, 5)
    for split in ("train", "val"):
        (tmp_path / "lip" / f"{split}_images").mkdir(parents=True)
        (tmp_path / "lip" / f"{split}_segmentations").mkdir(parents=True)
        Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(tmp_path / "lip" / f"{split}_images" / "a.jpg")
        Image.fromarray(label).save(tmp_path / "lip" / f"{split}_segmentations" / "a.png")
    run([cli, "data", "convert", "lip", "lip", "lip-shards"], cwd=tmp_path, env=env)
    report = run([cli, "data", "inspect", "lip-shards"], cwd=tmp_path, env=env).stdout
    assert "lip" in report and "20" in report, report

    table = run([cli, "results", "table", "--help"], cwd=tmp_path, env=env).stdout
    assert "--compare-published" in table
    published = run([str(bin_dir / "python"), "-c", "from ocr_cluster.results import published; "
                     "print(len(published.load()))"], cwd=tmp_path, env=env).stdout
    assert int(published) > 0
