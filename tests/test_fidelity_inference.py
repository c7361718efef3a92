"""Slide and multi-scale + flip inference against mmseg's own code (fixtures by scripts/mmseg_fidelity.py).

The model is a real HRNet-W18-Small + OCR with fixed random weights, rebuilt here from its seed (the
fixtures record the weights' checksum), so every window sees a different context: a missing division by
the overlap count, or a window that overwrites instead of adding, changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import mmseg_fidelity as ref
import numpy as np
import pytest
import torch

from ocr_cluster.data.transforms import rescale_size
from ocr_cluster.train import inference
from ocr_cluster.train.inference import InferenceSettings, predict

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = ref.seeded_model()
    meta = json.loads(str(np.load(DATA / "mmseg_fidelity_slide.npz")["meta"]))
    # BN statistics come from an fp32 forward, whose last bits depend on the CPU's kernels (AVX-512 or
    # AVX2): 6e-9 apart between the two; a change to the seeding moves the sum by far more than 1e-6.
    assert ref.weight_checksum(net.state_dict()) == pytest.approx(meta["checksum"], rel=1e-6), \
        "the seeded weights differ from the ones the fixtures were exported with"
    return net


def test_slide_logits_match_mmseg_slide_inference(model):
    fixture = np.load(DATA / "mmseg_fidelity_slide.npz")
    h, w = ref.SLIDE["size"]
    image = ref.smooth_input((1, 3, h, w), seed=1)
    settings = InferenceSettings(mode="slide", crop=ref.SLIDE["crop"], stride=ref.SLIDE["stride"])
    with torch.no_grad():
        logits = inference._logits(model, image, settings)
    assert logits.shape == (1, ref.NUM_CLASSES, h, w)
    ours = logits[0, :, ref.SLIDE["rows"], ref.SLIDE["cols"]].numpy()
    want = fixture["logits_sub"]
    scale = np.abs(want).max()
    assert np.abs(ours - want).max() <= 1e-4 * scale, np.abs(ours - want).max() / scale
    # the full-resolution class map; a pixel may flip only at a near-tie of fp32 round-off
    assert (logits[0].argmax(0).numpy() != fixture["argmax"]).mean() < 1e-4
    assert len(np.unique(fixture["argmax"])) > 1  # the case is not degenerate


def test_ms_flip_matches_mmseg_tta_and_averages_probabilities(model):
    fixture = np.load(DATA / "mmseg_fidelity_msflip.npz")
    h, w = ref.MSFLIP["size"]
    image = ref.smooth_input((1, 3, h, w), seed=2)
    pred = predict(model, image, (h, w), InferenceSettings(ms_ratios=ref.MSFLIP["ratios"], flip=True))[0].numpy()
    # averaging logits instead of probabilities gives another class map for this model and these ratios
    assert (fixture["merged"] != fixture["logit_mean"]).mean() > 0.3
    assert (pred != fixture["merged"]).mean() < 1e-3


class SizeSpy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


def test_ms_sizes_follow_mmseg_0x_multiscaleflipaug():
    fixture = np.load(DATA / "mmseg_fidelity_msflip.npz")
    (sw, sh), (oh, ow), ratios = ref.MS_SIZES["scale"], ref.MS_SIZES["original_hw"], ref.MS_SIZES["ratios"]
    test_wh = rescale_size(ow, oh, (sw, sh))  # our test pipeline's resize, as mmcv's
    assert test_wh[::-1] == tuple(fixture["test_resized_hw"])
    spy = SizeSpy()
    settings = InferenceSettings(ms_ratios=ratios, flip=True, scale=(sw, sh))
    predict(spy, torch.zeros(1, 3, test_wh[1], test_wh[0]), (oh, ow), settings)
    assert spy.sizes[0::2] == spy.sizes[1::2]  # the flipped view has the same size
    assert spy.sizes[0::2] == [tuple(s) for s in fixture["sizes_0x_hw"]]
    assert spy.sizes[0::2] != [tuple(s) for s in fixture["sizes_1x_hw"]]  # not 1.x's TestTimeAug
    # with no test scale known, r x the given image: the same as 0.x when the test resize keeps the size
    spy.sizes.clear()
    predict(spy, torch.zeros(1, 3, 1024, 2048), (1024, 2048), InferenceSettings(ms_ratios=(0.5, 1.75)))
    assert spy.sizes == [(512, 1024), (1792, 3584)]


def test_ms_flip_settings_take_the_test_scale_from_the_config():
    from ocr_cluster.config import EvaluationSection

    settings = InferenceSettings.from_config(EvaluationSection(), False, ms_flip=True, scale="2048x512")
    assert settings.scale == (2048, 512) and settings.flip and settings.ms_ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_logits_are_resized_to_the_label_size_before_argmax():
    class Halves(torch.nn.Module):  # class 1 on the left half, class 0 on the right: the tie is at the middle
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 1] = -1.0
            logits[:, 1, :, : x.shape[-1] // 2] = 1.0
            return logits

    pred = predict(Halves(), torch.zeros(1, 3, 8, 8), (16, 32), InferenceSettings())
    assert pred.shape == (1, 16, 32)
    assert pred[0, :, :16].eq(1).all() and pred[0, :, 16:].eq(0).all()
