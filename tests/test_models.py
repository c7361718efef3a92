"""Model zoo: mmseg parameter / state_dict parity, shapes and strides, train/eval outputs, options.

Kept cheap for a 2-core CPU: the big backbones are only built on the meta device (no weights), real
forward passes use 64x64 inputs on the small backbones. The torch.compile test lives in
test_models_compile.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ocr_cluster.models import (BACKBONES, HEADS, MMSEG_REFERENCE_MODELS, REFERENCES, build_model,
                                convert_sync_batchnorm, count_params, output_stride)
from ocr_cluster.models.references import DATASET_CLASSES

REPO = Path(__file__).resolve().parents[1]
SPEC_JSON = REPO / "tests" / "data" / "mmseg_state_dicts.json"  # copy of shared/reference/mmseg_state_dicts.json
SIZE = 64


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(SPEC_JSON.read_text())


def meta_model(backbone: str, head: str, num_classes: int = 19, **options):
    with torch.device("meta"):
        return build_model(backbone, head, num_classes, **options)


# ------------------------------------------------------------------------------------------------
# parity with mmsegmentation 1.2.2: parameter counts, state_dict keys, shapes and order


def test_reference_list_covers_the_json(reference):
    assert set(MMSEG_REFERENCE_MODELS) == set(reference)


@pytest.mark.parametrize("key", list(MMSEG_REFERENCE_MODELS))
def test_mmseg_reference_model_is_exact(reference, key):
    backbone, head, dataset = MMSEG_REFERENCE_MODELS[key]
    want = reference[key]
    num_classes = DATASET_CLASSES[dataset]
    # the class count is also visible in the reference's classifier shape
    seg_key = "decode_head.1.conv_seg.bias" if head == "ocr" else "decode_head.conv_seg.bias"
    assert want["state_dict"][seg_key] == [num_classes]

    model = meta_model(backbone, head, num_classes)
    assert count_params(model) == want["params_total"]
    assert count_params(model.backbone) == want["params_backbone"]
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k, list(v)) for k, v in want["state_dict"].items()]  # keys, shapes and order


def test_loading_an_mmseg_shaped_state_dict_is_strict():
    a = build_model("hrnetv2_w18_small", "ocr", 4)
    b = build_model("hrnetv2_w18_small", "ocr", 4)
    b.load_state_dict(a.state_dict(), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_auxiliary_heads_follow_mmseg():
    hr_fcn = meta_model("hrnetv2_w18", "fcn")
    assert hr_fcn.auxiliary_head is None and hr_fcn.loss_weights == {"decode": 1.0}
    r_fcn = meta_model("resnet50_d8", "fcn")
    aux = r_fcn.auxiliary_head
    assert aux.convs[0].conv.weight.shape == (256, 1024, 3, 3) and aux.dropout.p == 0.1
    assert r_fcn.loss_weights == {"decode": 1.0, "aux": 0.4}
    ocr = meta_model("resnet101_d8", "ocr")
    assert ocr.cascade and ocr.auxiliary_head is None and ocr.loss_weights == {"decode": 1.0, "aux": 0.4}
    assert meta_model("resnet101_d8", "ocr", aux_weight=0.25).loss_weights["aux"] == 0.25


# ------------------------------------------------------------------------------------------------
# names, errors, API


def test_unknown_names_and_options_raise_one_line_errors():
    cases = [
        (("resnet18", "ocr", 19), {}, "valid: hrnetv2_w18_small"),
        (("hrnetv2_w18", "pspnet", 19), {}, "valid: ocr"),
        (("hrnetv2_w18", "ocr", 0), {}, "num_classes"),
        (("hrnetv2_w18", "ocr", 19), {"norm": "gn"}, "valid: syncbn, bn"),
        (("hrnetv2_w18", "ocr", 19), {"pretrained_backbone": "x"}, "valid: align_corners"),
    ]
    for args, options, needle in cases:
        with pytest.raises(ValueError) as info:
            build_model(*args, **options)
        message = str(info.value)
        assert needle in message and "\n" not in message


def test_every_name_builds_and_names_module_stays_torch_free():
    from ocr_cluster.models.heads import HEAD_BUILDERS

    assert set(HEAD_BUILDERS) == set(HEADS)
    for required in ("ocr", "fcn", "deeplabv3", "deeplabv3plus", "isa"):
        assert required in HEADS
    code = "import sys, ocr_cluster.config, ocr_cluster.models.names; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_references_use_valid_names():
    for (backbone, head), refs in REFERENCES.items():
        assert backbone in BACKBONES and head in HEADS and refs
    for backbone, head, dataset in MMSEG_REFERENCE_MODELS.values():
        assert backbone in BACKBONES and head in HEADS and dataset in DATASET_CLASSES


# Every head on one backbone of each stride pattern; the heavier backbones of a family only differ in
# channel counts, so two heads each are enough there.
META_SWEEP = [(b, h) for b in ("hrnetv2_w18_small", "resnet50_d8", "resnet50_d16") for h in HEADS] + [
    (b, h) for b in ("hrnetv2_w18", "hrnetv2_w48", "resnet101_d8", "resnet101_d16") for h in ("ocr", "deeplabv3plus")]


def _backbone_stride(backbone: str) -> int:
    return 4 if backbone.startswith("hrnet") else int(backbone.rsplit("_d", 1)[1])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_strides(backbone):
    """Declared strides == real ones, on the meta device (shapes only, no compute)."""
    heads = [h for b, h in META_SWEEP if b == backbone]
    for head in heads:
        model = meta_model(backbone, head, 5)
        x = torch.empty(2, 3, 128, 128, device="meta")
        outs = model.train()(x)
        assert set(outs) == set(model.loss_weights) == set(model.output_strides)
        for key, out in outs.items():
            stride = model.output_strides[key]
            assert tuple(out.shape) == (2, 5, 128 // stride, 128 // stride), (backbone, head, key)
        decoder = head in ("deeplabv3plus", "ocrplus", "ocrplus_sepdecoder", "ocrplus_sepconv")
        assert model.output_stride == (4 if decoder else _backbone_stride(backbone))
    assert output_stride(backbone, "fcn") == _backbone_stride(backbone)


# ------------------------------------------------------------------------------------------------
# real forward passes on small models


FORWARD_SWEEP = [("hrnetv2_w18_small", h) for h in HEADS] + [
    ("resnet50_d8", h) for h in ("ocr", "fcn", "deeplabv3plus", "isa", "asp_oc")]


@pytest.mark.parametrize("backbone,head", FORWARD_SWEEP)
def test_forward_eval_and_train(backbone, head):
    torch.manual_seed(0)
    model = build_model(backbone, head, num_classes=3)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = model.eval()(x)
        assert y.shape == (2, 3, SIZE, SIZE) and torch.isfinite(y).all()
        outs = model.train()(x)
    assert isinstance(outs, dict) and set(outs) == set(model.loss_weights)
    assert model.loss_weights["decode"] == 1.0
    for key, out in outs.items():
        s = SIZE // model.output_strides[key]
        assert out.shape == (2, 3, s, s) and torch.isfinite(out).all()


def test_backward_reaches_every_head():
    torch.manual_seed(0)
    model = build_model("hrnetv2_w18_small", "ocr_dropout", 3).train()
    outs = model(torch.randn(2, 3, SIZE, SIZE))
    loss = sum(w * outs[k].square().mean() for k, w in model.loss_weights.items())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_eval_is_mmseg_encode_decode_and_train_recomputes_soft_regions():
    torch.manual_seed(0)
    model = build_model("hrnetv2_w18_small", "ocr", 4).eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        feats = model.backbone(x)
        regions = model.decode_head[0](feats)
        manual = nn.functional.interpolate(model.decode_head[1](feats, regions), size=(48, 80),
                                           mode="bilinear", align_corners=False)
        assert torch.equal(model(x), manual)

    calls = []
    model.decode_head[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(x)
        assert len(calls) == 1
        model.train()
        model(torch.randn(2, 3, 48, 80))
        assert len(calls) == 3  # mmseg runs the FCN head again for the soft regions
        model.recompute_soft_regions = False
        model(torch.randn(2, 3, 48, 80))
        assert len(calls) == 4


def test_odd_input_sizes():
    torch.manual_seed(0)
    for backbone, head in (("hrnetv2_w18_small", "ocr"), ("resnet50_d16", "isa")):
        model = build_model(backbone, head, 2).eval()
        with torch.no_grad():
            y = model(torch.randn(1, 3, 67, 93))
        assert y.shape == (1, 2, 67, 93) and torch.isfinite(y).all()


def test_align_corners_option_reaches_every_resize():
    from ocr_cluster.models.backbones.hrnet import HRModule
    from ocr_cluster.models.heads.base import DecodeHead

    torch.manual_seed(0)
    plain = build_model("hrnetv2_w18_small", "ocr", 3).eval()
    aligned = build_model("hrnetv2_w18_small", "ocr", 3, align_corners=True).eval()
    aligned.load_state_dict(plain.state_dict())
    assert all(m.align_corners for m in aligned.modules() if isinstance(m, (HRModule, DecodeHead)))
    assert not any(m.align_corners for m in plain.modules() if isinstance(m, (HRModule, DecodeHead)))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(plain(x), aligned(x))


def test_dropout_defaults_and_override():
    def ratios(model):
        return sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout2d))

    assert ratios(meta_model("hrnetv2_w48", "ocr")) == []  # mmseg HRNet OCRNet: dropout_ratio=-1
    assert ratios(meta_model("hrnetv2_w48", "ocr_dropout")) == [0.1, 0.1]
    assert ratios(meta_model("resnet101_d8", "ocr")) == [0.1, 0.1]
    assert ratios(meta_model("resnet101_d8", "base_oc")) == [0.05, 0.1]
    assert ratios(meta_model("resnet101_d8", "deeplabv3", dropout_ratio=0.3)) == [0.3, 0.3]
    assert ratios(meta_model("resnet101_d8", "ocr", dropout_ratio=0)) == []


def test_resnet_dilation_is_contracted_like_mmseg():
    d8 = meta_model("resnet50_d8", "fcn").backbone
    assert [b.conv2.dilation[0] for b in d8.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in d8.layer4] == [2, 4, 4]
    assert all(b.conv2.padding == b.conv2.dilation for b in d8.layer4)
    assert d8.layer2[0].conv2.stride == (2, 2) and d8.layer3[0].conv2.stride == (1, 1)
    d16 = meta_model("resnet101_d16", "fcn").backbone
    assert [b.conv2.dilation[0] for b in d16.layer4] == [1, 2, 2]
    assert d16.layer3[0].conv2.stride == (2, 2) and len(d16.layer3) == 23
    assert d8.out_strides == (4, 8, 8, 8) and d16.out_strides == (4, 8, 16, 16)


# ------------------------------------------------------------------------------------------------
# SyncBN, channels_last, bf16 autocast


def test_convert_sync_batchnorm():
    model = build_model("hrnetv2_w18_small", "ocr", 3, norm="syncbn")
    assert model.norm == "syncbn"
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    keys = list(model.state_dict())
    model = convert_sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn > 0
    assert list(model.state_dict()) == keys and model.loss_weights == {"decode": 1.0, "aux": 0.4}
    model.eval()
    with torch.no_grad():  # eval-mode SyncBN needs no process group
        assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("backbone,head", [("hrnetv2_w18_small", "ocr"), ("resnet50_d16", "deeplabv3plus")])
def test_channels_last_and_bf16_autocast(backbone, head):
    torch.manual_seed(0)
    model = build_model(backbone, head, 3).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        y = model(x.to(memory_format=torch.channels_last))
        assert y.shape == ref.shape and torch.isfinite(y).all()
        assert torch.allclose(y, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model(x.to(memory_format=torch.channels_last))
        assert z.shape == (1, 3, SIZE, SIZE) and torch.isfinite(z.float()).all()


# ------------------------------------------------------------------------------------------------
# CLI handlers


def test_cmd_list_and_info(capsys):
    import argparse

    from ocr_cluster.config import ConfigError
    from ocr_cluster.models.commands import cmd_info, cmd_list

    assert cmd_list(argparse.Namespace(backbone="hrnetv2_w48", json=True)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["head"] for r in rows] == list(HEADS)
    ocr = next(r for r in rows if r["head"] == "ocr")
    assert ocr["params"] == 70_371_446 and ocr["output_stride"] == 4
    assert "ocrnet_hr48_cityscapes" in ocr["reproduces"]

    assert cmd_list(argparse.Namespace(head="isa", num_classes=150)) == 0
    table = capsys.readouterr().out
    assert "resnet101_d16" in table and "isa" in table

    assert cmd_info(argparse.Namespace(backbone="resnet50_d8", head="fcn", num_classes=19, size="512x1024",
                                       json=True)) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == 49_497_734 and info["output_stride"] == 8
    # FCN R-50-D8 at 512x1024: 395.2 GMACs, all convolutions
    assert 390 < info["gmacs"] < 400 and info["gflops_2x"] == pytest.approx(2 * info["gmacs"])
    assert cmd_info(argparse.Namespace(backbone="hrnetv2_w18_small", head="ocr", size="256x256")) == 0
    text = capsys.readouterr().out
    assert "GMACs @ 256x256" in text and "6,378,496" in text

    assert cmd_info(argparse.Namespace(backbone="hrnetv2_w18_small", head="fcn", size="64", json=True)) == 0
    assert json.loads(capsys.readouterr().out)["size"] == "64x64"  # a bare S is a square
    for bad in ("512x", "0x10", "axb"):
        with pytest.raises(ConfigError, match=f"bad size '{bad}'"):  # a user error: exit 2
            cmd_info(argparse.Namespace(backbone="hrnetv2_w18_small", head="fcn", size=bad))
    with pytest.raises(Exception, match="unknown head"):
        cmd_info(argparse.Namespace(backbone="hrnetv2_w18", head="nope", size="64x64"))
