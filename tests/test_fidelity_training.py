"""LR schedule, OHEM and the heads' loss weighting against mmseg / mmengine / mmcv (fixtures by
scripts/mmseg_fidelity.py) and against F.cross_entropy computed here, not against our own formulas."""

from __future__ import annotations

import json
from pathlib import Path

import mmseg_fidelity as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ocr_cluster.config import ScheduleSection
from ocr_cluster.train import losses, schedule

DATA = Path(__file__).parent / "data"
TABLES = json.loads((DATA / "mmseg_fidelity_tables.json").read_text())


# --------------------------------------------------------------------------------------------- poly LR


@pytest.mark.parametrize("row", TABLES["schedules"], ids=lambda r: f"T{r['iters']}-warm{r['warmup_iters']}")
def test_poly_lr_is_mmcv_0x_and_mmengine_with_one_more_step(row):
    """Ours = mmseg 0.x's PolyLrUpdaterHook (+ linear warm-up): lr(t) uses 1 - t/T. mmengine's PolyLR with
    end=T+1 (and LinearLR with end=W+1 chained from 0) steps to the same values; mmseg 1.x configs
    (PolyLR end=T, total_iters=T-1; warm-up: LinearLR end=W, then PolyLR from W) do not."""
    cfg = ScheduleSection(iters=row["iters"], power=row["power"], min_lr=row["min_lr"],
                          warmup_iters=row["warmup_iters"], warmup_ratio=row["warmup_ratio"])
    ours = [schedule.lr_at(t, row["base_lr"], cfg) for t in row["at"]]
    assert ours == pytest.approx(row["mmcv_0x"], rel=1e-12, abs=0)
    assert ours == pytest.approx(row["mmengine_as_mmcv"], rel=1e-9, abs=0)
    assert ours[-1] > row["mmengine_1x"][-1] == pytest.approx(row["min_lr"], abs=1e-15)  # 1.x reaches min_lr at T-1
    assert ours != pytest.approx(row["mmengine_1x"], rel=1e-6)


def test_every_job_uses_the_0x_poly_recipe():
    """The jobs reproduce the seeds' tables, trained with mmseg 0.x: poly 0.9, no warm-up, min_lr = lr / 100."""
    from ocr_cluster import config

    jobs = sorted(p for p in Path(__file__).resolve().parents[1].glob("jobs/*/*.yaml") if p.parent.name != "_base_")
    assert len(jobs) >= 25
    for path in jobs:
        cfg = config.load(str(path), [])
        sched = cfg.schedule
        assert (sched.power, sched.warmup_iters) == (0.9, 0), path.name  # poly is the only schedule
        assert sched.min_lr == pytest.approx(cfg.optimizer.lr / 100), path.name


# --------------------------------------------------------------------------------------------- OHEM

OHEM = np.load(DATA / "mmseg_fidelity_ohem.npz")
LOGITS = torch.from_numpy(OHEM["logits"])          # (3, 4, 8, 12), the label is 32x48
LABEL = torch.from_numpy(OHEM["label"]).long()


@pytest.mark.parametrize("case", range(len(ref.OHEM["cases"])))
def test_ohem_matches_mmseg_sampler_and_loss_on_a_batch(case):
    thresh, min_kept = ref.OHEM["cases"][case]
    resized = F.interpolate(LOGITS, size=LABEL.shape[-2:], mode="bilinear", align_corners=False)
    kept = losses.ohem_weights(resized, LABEL, thresh, min_kept)
    assert np.array_equal(kept.numpy().astype(np.uint8), OHEM[f"weights_{case}"])
    loss = losses.cross_entropy(LOGITS, LABEL, ohem=(thresh, min_kept))
    assert loss.item() == pytest.approx(float(OHEM[f"loss_{case}"]), rel=1e-6)


def test_ohem_keeps_min_kept_times_the_batch():
    thresh, min_kept = ref.OHEM["cases"][1]  # a threshold so low that min_kept decides
    assert int(OHEM["weights_1"].sum()) == min_kept * LABEL.shape[0]


# --------------------------------------------------------------------------------------------- loss weights


def plain_ce(logits, label):
    """mmseg's CE (avg_non_ignore=False): summed over valid pixels, divided by all pixels."""
    up = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, label, ignore_index=255, reduction="sum").item() / label.numel()


def test_each_head_is_an_independent_cross_entropy_and_ohem_changes_only_the_final_one():
    aux = torch.randn(LOGITS.shape, generator=torch.Generator().manual_seed(7))
    outputs = {"decode": LOGITS, "aux": aux}
    dec_ref, aux_ref = plain_ce(LOGITS, LABEL), plain_ce(aux, LABEL)
    assert dec_ref == pytest.approx(float(OHEM["loss_plain"]), rel=1e-6)  # mmseg's own CE agrees

    total, parts = losses.segmentation_loss(outputs, LABEL, {"decode": 1.0, "aux": 0.4})
    assert parts["decode"].item() == pytest.approx(dec_ref, rel=1e-6)
    assert parts["aux"].item() == pytest.approx(aux_ref, rel=1e-6)
    assert total.item() == pytest.approx(dec_ref + 0.4 * aux_ref, rel=1e-6)

    thresh, min_kept = ref.OHEM["cases"][1]
    total_o, parts_o = losses.segmentation_loss(outputs, LABEL, {"decode": 1.0, "aux": 0.4}, ohem=(thresh, min_kept))
    assert parts_o["aux"].item() == pytest.approx(aux_ref, rel=1e-6)
    assert parts_o["decode"].item() == pytest.approx(float(OHEM["loss_1"]), rel=1e-6)
    assert abs(parts_o["decode"].item() - dec_ref) > 0.1
    assert total_o.item() == pytest.approx(float(OHEM["loss_1"]) + 0.4 * aux_ref, rel=1e-6)
