"""jobs/: every job loads, and its mmseg-style name says what it trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ocr_cluster import config

JOBS = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs").rglob("*.yaml")
              if "_base_" not in p.parts and p.name not in ("runtime_env.yaml",))
NAME = re.compile(r"^(?P<method>ocrnet(-dropout)?)_(?P<backbone>[a-z0-9-]+)_(?P<gpus>\d+)xb(?P<per_gpu>\d+)-"
                  r"(?P<iters>\d+)k_(?P<dataset>[a-z0-9]+)-(?P<crop>\d+x\d+)$")
BACKBONES = {"hr18s": "hrnetv2_w18_small", "hr18": "hrnetv2_w18", "hr48": "hrnetv2_w48", "r101-d8": "resnet101_d8"}
DATASETS = {"cityscapes": ("cityscapes", 19), "ade20k": ("ade20k", 150), "voc12aug": ("voc-aug", 21)}


def test_there_is_a_job_per_seed_row():
    assert len([j for j in JOBS if NAME.match(j.stem)]) == 25


@pytest.mark.parametrize("path", [j for j in JOBS if j.stem != "quickstart"], ids=lambda p: p.stem)
def test_job_name_matches_its_config(path):
    match = NAME.match(path.stem)
    assert match, f"{path.name} does not follow {{method}}_{{backbone}}_{{gpus}}xb{{batch}}-{{iters}}k_{{dataset}}-{{crop}}"
    cfg = config.load(path)
    dataset, classes = DATASETS[match["dataset"]]
    assert cfg.model.backbone == BACKBONES[match["backbone"]]
    assert cfg.model.head == ("ocr_dropout" if match["method"] == "ocrnet-dropout" else "ocr")
    assert cfg.data.batch_size == int(match["gpus"]) * int(match["per_gpu"])
    assert cfg.cluster.num_workers == int(match["gpus"])
    assert cfg.schedule.iters == int(match["iters"]) * 1000
    assert cfg.data.crop_size == match["crop"]
    assert (cfg.data.dataset, cfg.model.num_classes) == (dataset, classes)
    assert cfg.run.name == path.stem


def test_b16_resnet_jobs_use_mmseg_b16_lr():
    cfg = config.load(next(j for j in JOBS if j.stem == "ocrnet_r101-d8_8xb2-40k_cityscapes-512x1024"))
    assert (cfg.optimizer.lr, cfg.schedule.min_lr) == (0.02, 2e-4)


def test_run_ids_are_distinct():
    ids = [config.load(j).run_id for j in JOBS]
    assert len(set(ids)) == len(ids)
