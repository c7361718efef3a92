"""Checkpoint loading / conversion (ocr_cluster.models.convert): CPU only, no mmseg needed.

Numerical parity with mmsegmentation itself is checked by scripts/mmseg_parity.py in a separate
mmseg env; here the converters are checked against the key layout of real mmseg models
(shared/reference/mmseg_state_dicts.json) and against a functional re-statement of the
HRNet-OCR head (HRNet/HRNet-Semantic-Segmentation lib/models/seg_hrnet_ocr.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocr_cluster.models.convert import (
    FORMAT,
    CheckpointError,
    CheckpointMismatchError,
    convert_checkpoint,
    fold_conv_bias_into_bn,
    load_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
SPEC_JSON = REPO / "tests" / "data" / "mmseg_state_dicts.json"  # copy of shared/reference/mmseg_state_dicts.json


def build(backbone, head, num_classes=19, **options):
    from ocr_cluster.models import build_model

    return build_model(backbone, head, num_classes, **options)


def randomise_(model: nn.Module, seed: int = 0, convs: bool = True) -> nn.Module:
    """Seeded non-trivial values for BN parameters and buffers and (with `convs`) conv weights.

    Without `convs` the conv weights keep their (unseeded) init, which already differs between
    two builds; that is enough to see a load, and much faster for ResNet-101.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(7)
            elif convs and isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model


def assert_same_state(a: nn.Module | dict, b: nn.Module | dict):
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Tiny(nn.Module):
    """A small segmentor-shaped module: backbone conv+BN, one decode head conv."""

    def __init__(self, classes=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.decode_head = nn.Conv2d(8, classes, 1)


# ------------------------------------------------------------------------------ strict errors


def test_strict_load_lists_missing_unexpected_and_misshaped_in_one_error(tmp_path):
    sd = randomise_(Tiny()).state_dict()
    del sd["backbone.1.running_var"]                 # missing
    sd["decode_head.extra"] = torch.zeros(2)         # unexpected
    sd["decode_head.weight"] = torch.zeros(5, 8, 1, 1)  # mis-shaped (5 classes vs 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, str(path))
    err = info.value
    assert isinstance(err, ValueError)
    text = str(err)
    assert "\n" not in text
    assert "1 missing [backbone.1.running_var]" in text
    assert "1 unexpected [decode_head.extra]" in text
    assert "1 mis-shaped [decode_head.weight: checkpoint [5, 8, 1, 1] vs model [3, 8, 1, 1]]" in text
    assert err.missing == ["backbone.1.running_var"]
    assert err.unexpected == ["decode_head.extra"]
    assert err.mismatched == [("decode_head.weight", (5, 8, 1, 1), (3, 8, 1, 1))]
    # Nothing was loaded by the failed strict load.
    assert_same_state(model, before)


def test_strict_error_lists_ten_names_and_the_full_count(tmp_path):
    model = nn.Module()
    model.backbone = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(12)])  # 24 keys
    path = tmp_path / "empty.pth"
    torch.save({"other.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(model, str(path))
    text = str(info.value)
    assert "24 missing [" in text and ", ...]" in text
    assert text.count("backbone.") == 10
    assert len(info.value.missing) == 24


def test_non_strict_load_skips_misshaped_and_reports(tmp_path):
    src = randomise_(Tiny(classes=5))
    path = tmp_path / "five.pth"
    torch.save({"state_dict": src.state_dict(), "meta": {}}, path)
    model = Tiny(classes=3)
    result = load_checkpoint(model, str(path), strict=False)
    assert result.format == "mmseg"
    assert [k for k, _, _ in result.mismatched] == ["decode_head.weight", "decode_head.bias"]
    assert torch.equal(model.backbone[0].weight, src.backbone[0].weight)
    assert torch.equal(model.backbone[1].running_mean, src.backbone[1].running_mean)


def test_missing_num_batches_tracked_is_tolerated(tmp_path):
    src = randomise_(Tiny())
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pth")
    model = Tiny()
    load_checkpoint(model, str(tmp_path / "old.pth"))
    assert torch.equal(model.backbone[1].running_var, src.backbone[1].running_var)


def test_unreadable_and_missing_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(Tiny(), str(tmp_path / "nope.pth"))

    foreign = argparse.Namespace(lr=0.01)  # an arbitrary pickled object: refused by weights_only
    torch.save({"state_dict": Tiny().state_dict(), "meta": {"args": foreign}}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_checkpoint(Tiny(), str(tmp_path / "pickle.pth"))
    assert "\n" not in str(info.value)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(Tiny(), str(tmp_path / "junk.pth"))


def test_numpy_values_in_meta_are_readable(tmp_path):
    src = randomise_(Tiny())
    meta = {"iter": np.int64(40000), "best": np.float64(0.8), "hist": np.arange(3)}
    torch.save({"state_dict": src.state_dict(), "meta": meta}, tmp_path / "np.pth")
    model = Tiny()
    result = load_checkpoint(model, str(tmp_path / "np.pth"))
    assert result.meta == {"iter": 40000, "best": 0.8, "hist": [0, 1, 2]}
    assert_same_state(model, src)


# ----------------------------------------------------------------------------- mmseg layout


def _spec(name):
    return json.loads(SPEC_JSON.read_text())[name]


@pytest.mark.parametrize("name, backbone, head", [
    ("ocrnet_hr18s_cityscapes", "hrnetv2_w18_small", "ocr"),
    ("ocrnet_r101-d8_cityscapes", "resnet101_d8", "ocr"),
    ("deeplabv3plus_r101-d8_cityscapes", "resnet101_d8", "deeplabv3plus"),
])
def test_mmseg_checkpoint_with_the_json_layout_loads_key_for_key(tmp_path, name, backbone, head):
    spec = _spec(name)
    ours = randomise_(build(backbone, head), seed=1, convs=False)
    # Our keys and shapes are exactly mmseg 1.2.2's.
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == {k: list(v) for k, v in spec["state_dict"].items()}
    # An mmseg checkpoint: {'state_dict', 'meta'} with mmseg's key order (the JSON's).
    mm_sd = {k: ours.state_dict()[k].clone() for k in spec["state_dict"]}
    meta = {"CLASSES": ["road"] * 19, "PALETTE": [[1, 2, 3]] * 19, "mmseg_version": "1.2.2", "config": spec["mmseg_config"]}
    torch.save({"state_dict": mm_sd, "meta": meta}, tmp_path / "mmseg.pth")
    fresh = build(backbone, head)
    result = load_checkpoint(fresh, str(tmp_path / "mmseg.pth"))
    assert result.format == "mmseg"
    assert result.meta["mmseg_version"] == "1.2.2"
    assert result.loaded == len(spec["state_dict"])
    assert_same_state(fresh, ours)
    if backbone.startswith("resnet"):
        return  # the variants below only cost time with a 220 MB state
    # DDP-saved (module.) and plain state_dicts load the same.
    torch.save({"state_dict": {"module." + k: v for k, v in mm_sd.items()}}, tmp_path / "ddp.pth")
    torch.save(mm_sd, tmp_path / "plain.pth")
    for file, fmt in (("ddp.pth", "mmseg"), ("plain.pth", "state_dict")):
        again = build(backbone, head)
        assert load_checkpoint(again, str(tmp_path / file)).format == fmt
        assert_same_state(again, ours)


def test_mmseg_checkpoint_for_another_num_classes_is_refused(tmp_path):
    src = build("hrnetv2_w18_small", "ocr", 150)
    torch.save({"state_dict": src.state_dict(), "meta": {}}, tmp_path / "ade.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(build("hrnetv2_w18_small", "ocr", 19), str(tmp_path / "ade.pth"))
    text = str(info.value)
    assert "4 mis-shaped" in text  # conv_seg weight and bias of both cascade heads
    assert "decode_head.0.conv_seg.weight: checkpoint [150, 270, 1, 1] vs model [19, 270, 1, 1]" in text


# ------------------------------------------------------------------------------- HRNet-OCR


def test_bias_folding_into_bn_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        conv.bias.normal_(0, 1.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.3)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    before = nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        want = before(x)
    folded_conv = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    folded_bn = nn.BatchNorm2d(5)
    folded_conv.weight.data.copy_(conv.weight.data)
    folded_bn.load_state_dict(bn.state_dict())
    folded_bn.running_mean.copy_(fold_conv_bias_into_bn(conv.bias.data, bn.running_mean))
    after = nn.Sequential(folded_conv, folded_bn).eval()
    with torch.no_grad():
        got = after(x)
    assert (got - want).abs().max().item() <= 1e-6 * max(1.0, want.abs().max().item())
    with pytest.raises(CheckpointError):
        fold_conv_bias_into_bn(torch.zeros(4), torch.zeros(5))


# mmseg name prefix -> HRNet-OCR name prefix (the inverse of OCRNET_SPEC.md §9.2's table).
_TO_HR = [
    ("decode_head.0.convs.0.conv.", "aux_head.0."),
    ("decode_head.0.convs.0.bn.", "aux_head.1."),
    ("decode_head.0.conv_seg.", "aux_head.3."),
    ("decode_head.1.bottleneck.conv.", "conv3x3_ocr.0."),
    ("decode_head.1.bottleneck.bn.", "conv3x3_ocr.1."),
    ("decode_head.1.object_context_block.query_project.0.conv.", "ocr_distri_head.object_context_block.f_pixel.0."),
    ("decode_head.1.object_context_block.query_project.0.bn.", "ocr_distri_head.object_context_block.f_pixel.1.0."),
    ("decode_head.1.object_context_block.query_project.1.conv.", "ocr_distri_head.object_context_block.f_pixel.2."),
    ("decode_head.1.object_context_block.query_project.1.bn.", "ocr_distri_head.object_context_block.f_pixel.3.0."),
    ("decode_head.1.object_context_block.key_project.0.conv.", "ocr_distri_head.object_context_block.f_object.0."),
    ("decode_head.1.object_context_block.key_project.0.bn.", "ocr_distri_head.object_context_block.f_object.1.0."),
    ("decode_head.1.object_context_block.key_project.1.conv.", "ocr_distri_head.object_context_block.f_object.2."),
    ("decode_head.1.object_context_block.key_project.1.bn.", "ocr_distri_head.object_context_block.f_object.3.0."),
    ("decode_head.1.object_context_block.value_project.conv.", "ocr_distri_head.object_context_block.f_down.0."),
    ("decode_head.1.object_context_block.value_project.bn.", "ocr_distri_head.object_context_block.f_down.1.0."),
    ("decode_head.1.object_context_block.out_project.conv.", "ocr_distri_head.object_context_block.f_up.0."),
    ("decode_head.1.object_context_block.out_project.bn.", "ocr_distri_head.object_context_block.f_up.1.0."),
    ("decode_head.1.object_context_block.bottleneck.conv.", "ocr_distri_head.conv_bn_dropout.0."),
    ("decode_head.1.object_context_block.bottleneck.bn.", "ocr_distri_head.conv_bn_dropout.1.0."),
    ("decode_head.1.conv_seg.", "cls_head."),
]


def hrnet_ocr_state(model: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """An HRNet-OCR `FullModel` state_dict with random values, conv biases included."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            name = key[len("backbone."):]
        else:
            name = next(hr + key[len(mm):] for mm, hr in _TO_HR if key.startswith(mm))
        out["model." + name] = value.clone()
    for conv in ("aux_head.0.", "conv3x3_ocr.0."):
        channels = out[f"model.{conv}weight"].shape[0]
        out[f"model.{conv}bias"] = torch.randn(channels, generator=gen, dtype=torch.float32) * 0.5
    out["loss.criterion.weight"] = torch.rand(model.num_classes, generator=gen)
    return out


def hrnet_ocr_head(hr: dict[str, torch.Tensor], feats: list[torch.Tensor], align_corners: bool) -> torch.Tensor:
    """HRNet-OCR's forward after the backbone, restated with functional ops from its own names
    (HRNet/HRNet-Semantic-Segmentation, branch HRNet-OCR, lib/models/seg_hrnet_ocr.py)."""
    def conv(x, p, padding=0):
        return F.conv2d(x, hr[p + "weight"], hr.get(p + "bias"), padding=padding)

    def bn(x, p):
        return F.batch_norm(x, hr[p + "running_mean"], hr[p + "running_var"], hr[p + "weight"], hr[p + "bias"],
                            False, 0.0, 1e-5)

    def cbr(x, c, b, padding=0):
        return F.relu(bn(conv(x, c, padding), b))

    m = "model."
    h, w = feats[0].shape[2:]
    x = torch.cat([feats[0]] + [F.interpolate(f, size=(h, w), mode="bilinear", align_corners=align_corners)
                                for f in feats[1:]], 1)
    out_aux = conv(cbr(x, m + "aux_head.0.", m + "aux_head.1."), m + "aux_head.3.")
    feats_ = cbr(x, m + "conv3x3_ocr.0.", m + "conv3x3_ocr.1.", padding=1)
    b, k = out_aux.shape[:2]
    c = feats_.shape[1]
    probs = F.softmax(out_aux.view(b, k, -1), dim=2)
    context = torch.matmul(probs, feats_.view(b, c, -1).permute(0, 2, 1)).permute(0, 2, 1).unsqueeze(3)
    ob = m + "ocr_distri_head.object_context_block."
    query = cbr(cbr(feats_, ob + "f_pixel.0.", ob + "f_pixel.1.0."), ob + "f_pixel.2.", ob + "f_pixel.3.0.")
    key = cbr(cbr(context, ob + "f_object.0.", ob + "f_object.1.0."), ob + "f_object.2.", ob + "f_object.3.0.")
    value = cbr(context, ob + "f_down.0.", ob + "f_down.1.0.")
    kc = query.shape[1]
    query = query.view(b, kc, -1).permute(0, 2, 1)
    sim = F.softmax(kc ** -0.5 * torch.matmul(query, key.view(b, kc, -1)), dim=-1)
    ctx = torch.matmul(sim, value.view(b, kc, -1).permute(0, 2, 1)).permute(0, 2, 1).reshape(b, kc, h, w)
    ctx = cbr(ctx, ob + "f_up.0.", ob + "f_up.1.0.")
    fused = cbr(torch.cat([ctx, feats_], 1), m + "ocr_distri_head.conv_bn_dropout.0.",
                m + "ocr_distri_head.conv_bn_dropout.1.0.")
    return conv(fused, m + "cls_head.")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.filterwarnings("ignore:.*align_corners=True")
def test_hrnet_ocr_checkpoint_loads_renamed_with_biases_folded_and_computes_the_same(tmp_path, align_corners):
    template = randomise_(build("hrnetv2_w18_small", "ocr", 19, align_corners=align_corners), seed=2)
    hr = hrnet_ocr_state(template)
    torch.save({"epoch": 3, "best_mIoU": 0.5, "state_dict": hr}, tmp_path / "checkpoint.pth.tar")
    model = build("hrnetv2_w18_small", "ocr", 19, align_corners=align_corners)
    result = load_checkpoint(model, f"file://{tmp_path}/checkpoint.pth.tar")
    assert result.format == "hrnet_ocr"
    sd = model.state_dict()
    assert "decode_head.0.convs.0.conv.bias" not in sd
    assert torch.allclose(sd["decode_head.1.bottleneck.bn.running_mean"],
                          hr["model.conv3x3_ocr.1.running_mean"] - hr["model.conv3x3_ocr.0.bias"])
    assert torch.equal(sd["backbone.stage4.1.fuse_layers.3.0.1.0.weight"],
                       hr["model.stage4.1.fuse_layers.3.0.1.0.weight"])

    model.eval().double()
    hr64 = {k: v.double() if v.is_floating_point() else v for k, v in hr.items()}
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        ref = F.interpolate(hrnet_ocr_head(hr64, model.backbone(x), align_corners), size=x.shape[2:],
                            mode="bilinear", align_corners=align_corners)
    assert ours.shape == ref.shape == (1, 19, 64, 96)
    assert (ours - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()

    # The plain FullModel state_dict (final_state.pth), and one with `model.` stripped, read the same.
    model.float()
    torch.save(hr, tmp_path / "final_state.pth")
    torch.save({k[len("model."):]: v for k, v in hr.items() if k.startswith("model.")}, tmp_path / "stripped.pth")
    for file in ("final_state.pth", "stripped.pth"):
        again = build("hrnetv2_w18_small", "ocr", 19, align_corners=align_corners)
        assert load_checkpoint(again, str(tmp_path / file)).format == "hrnet_ocr"
        assert_same_state(again, model)


def test_hrnet_seg_fcn_checkpoint_maps_last_layer_to_the_fcn_head(tmp_path):
    template = randomise_(build("hrnetv2_w18_small", "fcn", 19, align_corners=True), seed=9)
    gen = torch.Generator().manual_seed(9)
    hr = {}
    for key, value in template.state_dict().items():
        name = key[len("backbone."):] if key.startswith("backbone.") else (
            key.replace("decode_head.convs.0.conv.", "last_layer.0.").replace("decode_head.convs.0.bn.", "last_layer.1.")
            .replace("decode_head.conv_seg.", "last_layer.3."))
        hr["model." + name] = value.clone()
    bias = torch.randn(270, generator=gen)
    hr["model.last_layer.0.bias"] = bias
    torch.save(hr, tmp_path / "seg_hrnet.pth")
    model = build("hrnetv2_w18_small", "fcn", 19, align_corners=True)
    assert load_checkpoint(model, str(tmp_path / "seg_hrnet.pth")).format == "hrnet_seg"
    want = template.state_dict()
    got = model.state_dict()
    assert torch.allclose(got["decode_head.convs.0.bn.running_mean"], want["decode_head.convs.0.bn.running_mean"] - bias)
    assert torch.equal(got["decode_head.conv_seg.weight"], want["decode_head.conv_seg.weight"])
    with pytest.warns(UserWarning, match="align_corners=True"):
        load_checkpoint(build("hrnetv2_w18_small", "fcn", 19), str(tmp_path / "seg_hrnet.pth"))


@pytest.mark.filterwarnings("ignore:.*align_corners=True")
def test_hrnet_ocr_checkpoint_with_unknown_keys_is_refused(tmp_path):
    hr = hrnet_ocr_state(build("hrnetv2_w18_small", "ocr", 19))
    hr["model.something_new.weight"] = torch.zeros(1)
    torch.save(hr, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="model.something_new.weight"):
        load_checkpoint(build("hrnetv2_w18_small", "ocr", 19), str(tmp_path / "odd.pth"))


def test_openseg_checkpoints_are_refused_with_the_reason(tmp_path):
    sd = {"module.backbone.conv1.weight": torch.zeros(1), "module.spatial_ocr_head.conv_bn_dropout.0.weight": torch.zeros(1)}
    torch.save({"state_dict": sd}, tmp_path / "openseg.pth")
    with pytest.raises(CheckpointError, match="openseg"):
        load_checkpoint(Tiny(), str(tmp_path / "openseg.pth"))


# ---------------------------------------------------------------------------- backbone only


def test_backbone_only_hrnet_imagenet_checkpoint_ignores_classifier_keys(tmp_path):
    src = randomise_(build("hrnetv2_w18_small", "ocr", 19), seed=4)
    imagenet = {k[len("backbone."):]: v.clone() for k, v in src.state_dict().items() if k.startswith("backbone.")}
    imagenet.update({
        "incre_modules.0.0.conv1.weight": torch.zeros(32, 18, 1, 1),
        "downsamp_modules.0.0.weight": torch.zeros(256, 128, 3, 3),
        "final_layer.0.weight": torch.zeros(2048, 1024, 1, 1),
        "classifier.weight": torch.zeros(1000, 2048),
        "classifier.bias": torch.zeros(1000),
    })
    torch.save(imagenet, tmp_path / "hrnet_w18_small_v2_imagenet.pth")
    model = build("hrnetv2_w18_small", "ocr", 19)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    result = load_checkpoint(model, str(tmp_path / "hrnet_w18_small_v2_imagenet.pth"), backbone_only=True)
    assert result.format == "backbone"
    assert result.loaded == len(imagenet) - 5
    assert_same_state(model.backbone, src.backbone)
    for key, value in head_before.items():
        assert torch.equal(model.state_dict()[key], value), key

    # Without backbone_only the same file is refused with the hint.
    with pytest.raises(CheckpointError, match="backbone_only=True"):
        load_checkpoint(build("hrnetv2_w18_small", "ocr", 19), str(tmp_path / "hrnet_w18_small_v2_imagenet.pth"))


def test_backbone_only_v1c_resnet_checkpoint_wrapped_in_state_dict(tmp_path):
    src = randomise_(build("resnet50_d8", "fcn", 19), seed=5, convs=False)
    v1c = {k[len("backbone."):]: v.clone() for k, v in src.state_dict().items() if k.startswith("backbone.")}
    assert "stem.0.weight" in v1c and "layer4.2.bn3.running_var" in v1c
    v1c["fc.weight"] = torch.zeros(1000, 2048)
    v1c["fc.bias"] = torch.zeros(1000)
    torch.save({"state_dict": v1c, "meta": {"epoch": 100}}, tmp_path / "resnet50_v1c.pth")
    # The same ImageNet weights serve the D16 variant (dilation is not a weight).
    model = build("resnet50_d16", "deeplabv3plus", 19)
    load_checkpoint(model, str(tmp_path / "resnet50_v1c.pth"), backbone_only=True)
    assert_same_state(model.backbone, src.backbone)

    # Strict over the backbone: a missing backbone key is an error naming it.
    del v1c["layer3.5.conv2.weight"]
    torch.save(v1c, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing \[layer3.5.conv2.weight\]"):
        load_checkpoint(build("resnet50_d8", "fcn", 19), str(tmp_path / "broken.pth"), backbone_only=True)
    # A ResNet-101 backbone does not fit ResNet-50 weights.
    with pytest.raises(CheckpointMismatchError, match="missing"):
        load_checkpoint(build("resnet101_d8", "ocr", 19), str(tmp_path / "resnet50_v1c.pth"), backbone_only=True)


def test_backbone_only_from_a_whole_segmentor_checkpoint(tmp_path):
    src = randomise_(build("hrnetv2_w18_small", "ocr", 19), seed=6)
    torch.save({"state_dict": src.state_dict(), "meta": {}}, tmp_path / "seg.pth")
    model = build("hrnetv2_w18_small", "fcn", 150)  # another head and class count
    result = load_checkpoint(model, str(tmp_path / "seg.pth"), backbone_only=True)
    assert result.format == "mmseg"
    assert_same_state(model.backbone, src.backbone)


# ------------------------------------------------------------------------------- conversion


def test_convert_mmseg_checkpoint_round_trip(tmp_path):
    src = randomise_(build("hrnetv2_w18_small", "ocr", 19), seed=7)
    meta = {"CLASSES": ["a", "b"], "mmseg_version": "1.2.2"}
    torch.save({"state_dict": src.state_dict(), "meta": meta}, tmp_path / "mmseg.pth")
    dst = tmp_path / "out" / "converted.pth"
    written = convert_checkpoint(str(tmp_path / "mmseg.pth"), str(dst))
    assert written["source_format"] == "mmseg"
    assert written["source_meta"] == meta
    assert sorted(os.listdir(dst.parent)) == ["converted.pth"]  # no temporary file left
    obj = torch.load(dst, weights_only=True)
    assert obj["format"] == FORMAT
    assert obj["meta"]["source_format"] == "mmseg"
    assert obj["meta"]["source_uri"] == str(tmp_path / "mmseg.pth")
    assert_same_state(obj["model"], src.state_dict())
    model = build("hrnetv2_w18_small", "ocr", 19)
    result = load_checkpoint(model, f"file://{dst}")
    assert result.format == "ocr_cluster"
    assert result.meta["source_format"] == "mmseg"
    assert_same_state(model, src)
    # Converting a converted checkpoint keeps its provenance.
    again = convert_checkpoint(str(dst), str(tmp_path / "again.pth"))
    assert again["source_format"] == "mmseg"


@pytest.mark.filterwarnings("ignore:.*align_corners=True")
def test_convert_hrnet_ocr_checkpoint_with_model_spec(tmp_path):
    template = randomise_(build("hrnetv2_w18_small", "ocr", 19), seed=8)
    torch.save(hrnet_ocr_state(template), tmp_path / "hr.pth")
    spec = {"backbone": "hrnetv2_w18_small", "head": "ocr", "num_classes": 19, "align_corners": True}
    written = convert_checkpoint(str(tmp_path / "hr.pth"), f"file://{tmp_path}/hr_converted.pth", model_spec=spec)
    assert written["source_format"] == "hrnet_ocr"
    assert written["source_align_corners"] is True
    assert written["model"] == spec
    direct = build("hrnetv2_w18_small", "ocr", 19)
    load_checkpoint(direct, str(tmp_path / "hr.pth"))
    converted = build("hrnetv2_w18_small", "ocr", 19)
    assert load_checkpoint(converted, str(tmp_path / "hr_converted.pth")).meta["model"] == spec
    assert_same_state(converted, direct)


def test_convert_refuses_a_model_spec_that_does_not_fit_and_writes_nothing(tmp_path):
    src = build("hrnetv2_w18_small", "ocr", 19)
    torch.save({"state_dict": src.state_dict(), "meta": {}}, tmp_path / "mmseg.pth")
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        convert_checkpoint(str(tmp_path / "mmseg.pth"), str(tmp_path / "x.pth"),
                           model_spec={"backbone": "hrnetv2_w18_small", "head": "ocr", "num_classes": 150})
    assert not (tmp_path / "x.pth").exists()
    torch.save(src.backbone.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match="backbone_only"):
        convert_checkpoint(str(tmp_path / "imagenet.pth"), str(tmp_path / "y.pth"))
    assert sorted(os.listdir(tmp_path)) == ["imagenet.pth", "mmseg.pth"]


def test_save_checkpoint_writes_the_project_format(tmp_path):
    src = randomise_(Tiny())
    uri = f"file://{tmp_path}/ckpt/model.pth"
    save_checkpoint(src, uri, meta={"iteration": 10, "model": {"backbone": "x"}, "dropped": object()})
    obj = torch.load(tmp_path / "ckpt" / "model.pth", weights_only=True)
    assert obj["format"] == FORMAT and obj["meta"] == {"iteration": 10, "model": {"backbone": "x"}}
    model = Tiny()
    assert load_checkpoint(model, uri).format == "ocr_cluster"
    assert_same_state(model, src)


@pytest.mark.s3
def test_checkpoint_on_s3(s3):
    src = randomise_(Tiny())
    uri = s3.url("ckpt") + "/model.pth"
    save_checkpoint(src, uri, meta={"step": 1})
    model = Tiny()
    assert load_checkpoint(model, uri).meta == {"step": 1}
    assert_same_state(model, src)
