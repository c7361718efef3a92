#!/usr/bin/env python3
"""Fixtures that pin inference, the LR schedule, OHEM and label maps to mmseg itself (issue 14).

Three steps, in two Python environments; the tests (tests/test_fidelity_*.py) need only the project venv:

  weights  (project venv)   Builds HRNet-W18-Small + OCR (K=4) with `seeded_model` (fixed random weights
                            from a seed, BN statistics calibrated on a random batch) and saves it as an
                            mmseg-style checkpoint in --dir. The tests rebuild the same model from the seed,
                            so no weights are stored in the repository.
  export   (mmseg env)      Loads that checkpoint into mmseg 1.2.2's own OCRNet (strict, same keys) and writes
                            to tests/data/:
      mmseg_fidelity_slide.npz   `EncoderDecoder.slide_inference` of a 1x3x1024x2048 input, crop 512x1024,
                                 stride 341x682 (3x3 windows; up to 4 overlap): the logits at every 16th
                                 pixel (rows 5::16, cols 7::16, fp32) and the full-resolution argmax.
      mmseg_fidelity_msflip.npz  multi-scale + flip (ratios 0.5, 1.75) of a 1x3x96x160 input: per view mmseg's
                                 `inference` (whole) + `postprocess_result` (flip undone, resized to the
                                 original size), merged by `SegTTAModel.merge_preds` (softmax mean). The
                                 views are fed the same bilinear resamples of the normalised input as ours;
                                 the argmax of the logit mean is stored too (it must differ).
                                 And the scaled sizes: mmseg 0.x `MultiScaleFlipAug(img_scale, img_ratios)`
                                 sizes, by mmcv's `rescale_size` (0.x: Resize(keep_ratio) to
                                 (int(W*r), int(H*r)) from the ORIGINAL image), and mmseg 1.x `TestTimeAug`
                                 sizes (`Resize(scale_factor=r, keep_ratio=True)` of the original).
      mmseg_fidelity_ohem.npz    `OHEMPixelSampler` + `CrossEntropyLoss` through `BaseDecodeHead.loss_by_feat`
                                 (logits resized to the label first) on a batch of 3, for two (thresh,
                                 min_kept): the kept-pixel weights and the loss; plus plain CE.
      mmseg_fidelity_tables.json lr values of mmengine's PolyLR / LinearLR (run as mmengine's runner steps
                                 them) and of mmcv 0.x's PolyLrUpdaterHook + linear warm-up (mmcv
                                 1.x mmcv/runner/hooks/lr_updater.py, transcribed in `mmcv_lr`, since mmcv
                                 1.x does not install beside mmcv 2); the label maps of mmseg's
                                 tools/dataset_converters (coco_stuff164k.py and coco_stuff10k.py
                                 `clsID_to_trID`, pascal_context.py `_mapping`), read from the .mim copy in
                                 the wheel with `ast` (pascal_context.py imports the Detail API).

Usage (the env is the one of scripts/mmseg_parity.py; see its docstring for how it was built):
  .venv/bin/python scripts/mmseg_fidelity.py weights            # -> /tmp/mmseg_fidelity/hr18s_ocr_k4.pth
  /tmp/mmseg_env/bin/python scripts/mmseg_fidelity.py export    # -> tests/data/mmseg_fidelity_*
The slide export runs 9 windows of 512x1024 on CPU (about a minute unloaded).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
NUM_CLASSES = 4
SEED = 0
MMSEG_CONFIG = "ocrnet/ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py"

SLIDE = dict(size=(1024, 2048), crop=(512, 1024), stride=(341, 682), rows=slice(5, None, 16), cols=slice(7, None, 16))
MSFLIP = dict(size=(96, 160), ratios=(0.5, 1.75))
# ADE20K-like: test scale 2048x512, a 640x480 original (test-resized to 683x512)
MS_SIZES = dict(scale=(2048, 512), original_hw=(480, 640), ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75))
OHEM = dict(batch=3, size=(32, 48), logit_size=(8, 12), cases=((0.7, 40), (0.05, 300)))
# (iters, power, min_lr, warmup_iters, warmup_ratio); 40k/80k/160k = jobs/, 1000 with warm-up for the warm-up form
SCHEDULES = ((40000, 0.9, 1e-4, 0, 0.1), (80000, 0.9, 1e-4, 0, 0.1), (160000, 0.9, 0.0, 0, 0.1),
             (1000, 0.9, 0.0, 100, 0.1), (1000, 1.0, 0.0, 100, 1e-6))
BASE_LR = 0.01
RESIDUAL_BN = re.compile(r"(\.bn3|branches\.\d+\.\d+\.bn2)$")  # last BN of a Bottleneck / HRNet BasicBlock


def sample_iters(total: int) -> list[int]:
    return sorted({0, 1, 2, 10, 99, 100, 101, total // 3, total // 2, total - 2, total - 1})


# ----------------------------------------------------------------------------- shared by both sides


def seeded_model(seed: int = SEED, num_classes: int = NUM_CLASSES):
    """Our HRNet-W18-Small + OCR with fixed random weights (eval mode).

    Conv weights Kaiming-normal, biases N(0, 0.1^2), BN affine U(0.5, 1.5) / N(0, 0.1^2) (the last BN of
    each residual branch x0.1, so the random net stays well conditioned, as scripts/mmseg_parity.py), then
    BN running statistics from the eval-mode input each BN sees on a random batch, one BN at a time.
    """
    import torch
    from torch import nn

    from ocr_cluster.models import build_model

    model = build_model("hrnetv2_w18_small", "ocr", num_classes).eval()
    gen = torch.Generator().manual_seed(seed)
    bns = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                    * (2.0 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                if RESIDUAL_BN.search(name):
                    module.weight.mul_(0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                bns.append(module)

        def set_stats(mod, args):
            if getattr(mod, "_calibrated", False):
                return
            mod._calibrated = True
            x = args[0].double().transpose(0, 1).flatten(1)
            mean, var = x.mean(1), x.var(1, unbiased=False)
            mod.running_mean.copy_(mean)
            # the floor keeps BNs whose input is nearly constant on this batch (OCR context) from amplifying
            mod.running_var.copy_(var + 0.25 * mean ** 2 + 0.5 * var.mean() + 1e-3)

        calib = smooth_input((1, 3, 128, 256), seed=seed + 100)
        handles = [bn.register_forward_pre_hook(set_stats) for bn in bns]
        model(calib)
        for handle in handles:
            handle.remove()
        for bn in bns:
            if not getattr(bn, "_calibrated", False):  # BNs unused in eval mode keep plain statistics
                bn.running_var.fill_(1.0)
            bn.__dict__.pop("_calibrated", None)
        # Random OCR context is nearly constant over the image, so raw logits are large per-class offsets
        # with little spatial variation; standardise each classifier's outputs (zero mean, unit std per
        # class on the calibration image) so that the class map varies and the views of ms+flip disagree.
        # One at a time, in execution order: the FCN head's logits are the OCR head's soft regions.
        for conv in [m for n, m in model.named_modules() if n.endswith("conv_seg")]:
            outputs = []
            handle = conv.register_forward_hook(lambda mod, args, out: outputs.append(out))
            model(calib)
            handle.remove()
            out = outputs[0].double()
            mean, std = out.mean((0, 2, 3)), out.std((0, 2, 3)).clamp(min=1e-6)
            conv.weight.div_(std.view(-1, 1, 1, 1).float())
            conv.bias.copy_(((conv.bias.double() - mean) / std).float())
    return model


def smooth_input(shape, seed: int):
    """A normalised image with structure at several scales: upsampled coarse noise plus fine noise."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    coarse = torch.randn((n, c, max(h // 32, 2), max(w // 32, 2)), generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) \
        + 0.3 * torch.randn(shape, generator=gen)


def weight_checksum(state_dict) -> float:
    return float(sum(v.double().abs().sum() for v in state_dict.values() if v.is_floating_point()))


def mmcv_lr(it: int, total: int, power: float, min_lr: float, warmup_iters: int, warmup_ratio: float,
            base_lr: float = BASE_LR) -> float:
    """mmcv 1.x (mmseg 0.x) PolyLrUpdaterHook(by_epoch=False) with warmup='linear', at runner.iter = it:
    regular = (base - min_lr) * (1 - it / max_iters) ** power + min_lr; for it < warmup_iters
    lr = regular * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio))  (LrUpdaterHook.get_warmup_lr)."""
    lr = (base_lr - min_lr) * (1 - it / total) ** power + min_lr
    if warmup_iters and it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
    return lr


# ----------------------------------------------------------------------------- weights (project venv)


def write_weights(out_dir: Path) -> Path:
    import torch

    model = seeded_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"hr18s_ocr_k{NUM_CLASSES}.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"seed": SEED, "generator": "mmseg_fidelity weights"}}, path)
    print(f"wrote {path} (checksum {weight_checksum(model.state_dict()):.6f})")
    return path


# ----------------------------------------------------------------------------- export (mmseg env)


def _mmseg_ocrnet(checkpoint: Path):
    import mmseg
    import torch
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / "configs" / MMSEG_CONFIG))
    model_cfg = cfg.model
    model_cfg.pop("pretrained", None)
    model_cfg.backbone.pop("init_cfg", None)
    for head in model_cfg.decode_head:
        head.num_classes = NUM_CLASSES
        head.norm_cfg = dict(type="BN", requires_grad=True)
    model_cfg.backbone.norm_cfg = dict(type="BN", requires_grad=True)
    model = MODELS.build(model_cfg)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    model.load_state_dict(state, strict=True)
    return model.eval(), state, mmseg.__version__


def _export_slide(model, meta) -> None:
    import numpy as np
    import torch
    from mmengine.config import ConfigDict

    h, w = SLIDE["size"]
    x = smooth_input((1, 3, h, w), seed=1)
    model.test_cfg = ConfigDict(mode="slide", crop_size=SLIDE["crop"], stride=SLIDE["stride"])
    with torch.no_grad():
        logits = model.slide_inference(x, [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))])
    sub = logits[0, :, SLIDE["rows"], SLIDE["cols"]].numpy().astype(np.float32)
    np.savez_compressed(DATA / "mmseg_fidelity_slide.npz", logits_sub=sub,
                        argmax=logits[0].argmax(0).numpy().astype(np.uint8), meta=json.dumps(meta))
    print(f"slide: logits {tuple(logits.shape)}, sampled {sub.shape}, |max| {sub.__abs__().max():.3g}")


def _export_msflip(model, meta) -> None:
    import mmcv
    import numpy as np
    import torch
    import torch.nn.functional as F
    from mmcv.transforms import Resize
    from mmseg.models import SegTTAModel
    from mmseg.structures import SegDataSample

    h, w = MSFLIP["size"]
    x = smooth_input((1, 3, h, w), seed=2)
    views = []
    with torch.no_grad():
        for ratio in MSFLIP["ratios"]:
            size = (int(h * ratio + 0.5), int(w * ratio + 0.5))
            scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True):
                inp = scaled.flip(-1) if flip else scaled
                metas = dict(img_shape=size, ori_shape=(h, w), pad_shape=size, flip=flip,
                             flip_direction="horizontal", padding_size=[0, 0, 0, 0], img_path="x")
                logits = model.inference(inp, [metas])
                sample = SegDataSample(metainfo=metas)
                views.append(model.postprocess_result(logits, [sample])[0])
    tta = SegTTAModel(module=model)
    merged = tta.merge_preds([views])[0].pred_sem_seg.data.numpy().astype(np.uint8)
    logit_mean = torch.stack([v.seg_logits.data for v in views]).mean(0).argmax(0).numpy().astype(np.uint8)

    (sw, sh), (oh, ow) = MS_SIZES["scale"], MS_SIZES["original_hw"]
    img = np.zeros((oh, ow, 3), np.uint8)
    test_wh = mmcv.rescale_size((ow, oh), (sw, sh))
    v0 = [mmcv.rescale_size((ow, oh), (int(sw * r), int(sh * r))) for r in MS_SIZES["ratios"]]
    v1 = [Resize(scale_factor=r, keep_ratio=True)(dict(img=img.copy()))["img"].shape[1::-1]
          for r in MS_SIZES["ratios"]]
    np.savez_compressed(DATA / "mmseg_fidelity_msflip.npz", merged=merged, logit_mean=logit_mean,
                        test_resized_hw=np.array(test_wh[::-1]), sizes_0x_hw=np.array([s[::-1] for s in v0]),
                        sizes_1x_hw=np.array([s[::-1] for s in v1]), meta=json.dumps(meta))
    print(f"ms+flip: {int((merged != logit_mean).sum())} pixels where prob mean and logit mean disagree; "
          f"0.x sizes {v0}; 1.x sizes {v1}; test-resized {test_wh}")


def _export_ohem(meta) -> None:
    import numpy as np
    import torch
    from mmengine.structures import PixelData
    from mmseg.models.decode_heads import FCNHead
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(3)
    b, (h, w), (lh, lw) = OHEM["batch"], OHEM["size"], OHEM["logit_size"]
    logits = torch.randn((b, NUM_CLASSES, lh, lw), generator=gen) * 2
    label = torch.randint(0, NUM_CLASSES, (b, h, w), generator=gen)
    label[torch.rand((b, h, w), generator=gen) < 0.15] = 255
    label[1, :6] = 255
    samples = [SegDataSample(gt_sem_seg=PixelData(data=label[i:i + 1])) for i in range(b)]
    out = dict(logits=logits.numpy(), label=label.numpy().astype(np.uint8), meta=json.dumps(meta))
    for i, (thresh, min_kept) in enumerate(OHEM["cases"]):
        head = FCNHead(in_channels=8, channels=8, num_classes=NUM_CLASSES, align_corners=False,
                       sampler=dict(type="OHEMPixelSampler", thresh=thresh, min_kept=min_kept))
        weights = head.sampler.sample(torch.nn.functional.interpolate(
            logits, size=(h, w), mode="bilinear", align_corners=False), label.unsqueeze(1))
        loss = head.loss_by_feat(logits, samples)["loss_ce"]
        out[f"weights_{i}"] = weights.numpy().astype(np.uint8)
        out[f"loss_{i}"] = np.float64(loss.item())
        print(f"ohem thresh {thresh} min_kept {min_kept}: kept {int(weights.sum())} of "
              f"{int((label != 255).sum())} valid, loss {loss.item():.6f}")
    plain = FCNHead(in_channels=8, channels=8, num_classes=NUM_CLASSES, align_corners=False)
    out["loss_plain"] = np.float64(plain.loss_by_feat(logits, samples)["loss_ce"].item())
    np.savez_compressed(DATA / "mmseg_fidelity_ohem.npz", **out)


def _mmengine_lrs(schedulers, total: int) -> list[float]:
    """lr used at each iteration 0..total-1, stepping as mmengine's ParamSchedulerHook does (after each iter)."""
    import torch
    from mmengine.optim.scheduler import LinearLR, PolyLR

    kinds = {"PolyLR": PolyLR, "LinearLR": LinearLR}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    built = [kinds[kind](opt, by_epoch=False, **kw) for kind, kw in schedulers]
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        for scheduler in built:
            scheduler.step()
    return lrs


def _schedules() -> list[dict]:
    rows = []
    for total, power, min_lr, warm, ratio in SCHEDULES:
        iters = sample_iters(total)
        poly = dict(eta_min=min_lr, power=power)
        if warm:
            recipes = {  # 1.x configs: LinearLR over the warm-up, then PolyLR from its end
                "mmengine_1x": [("LinearLR", dict(start_factor=ratio, begin=0, end=warm)),
                                ("PolyLR", dict(poly, begin=warm, end=total))],
                # the mmcv form in mmengine terms: both from 0, one step longer each
                "mmengine_as_mmcv": [("LinearLR", dict(start_factor=ratio, begin=0, end=warm + 1)),
                                     ("PolyLR", dict(poly, begin=0, end=total + 1))]}
        else:
            recipes = {"mmengine_1x": [("PolyLR", dict(poly, begin=0, end=total))],
                       "mmengine_as_mmcv": [("PolyLR", dict(poly, begin=0, end=total + 1))]}
        row = dict(iters=total, power=power, min_lr=min_lr, warmup_iters=warm, warmup_ratio=ratio,
                   base_lr=BASE_LR, at=iters, recipes={name: [(kind, kw) for kind, kw in sch]
                                                       for name, sch in recipes.items()})
        for name, sch in recipes.items():
            lrs = _mmengine_lrs(sch, total)
            row[name] = [lrs[i] for i in iters]
        row["mmcv_0x"] = [mmcv_lr(i, total, power, min_lr, warm, ratio) for i in iters]
        rows.append(row)
        print(f"schedule T={total} power={power} min_lr={min_lr} warm-up {warm}: done")
    return rows


def _label_maps() -> dict:
    import mmseg

    tools = Path(mmseg.__file__).parent / ".mim" / "tools" / "dataset_converters"

    def assigned(path: Path, name: str):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return node.value
        raise SystemExit(f"{path}: no {name} = ...")

    def table(path):
        return {int(k): int(v) for k, v in ast.literal_eval(assigned(path, "clsID_to_trID")).items()}

    mapping = assigned(tools / "pascal_context.py", "_mapping")  # np.sort(np.array([...]))
    ids = sorted(ast.literal_eval(mapping.args[0].args[0]))
    return {"coco_stuff164k_clsID_to_trID": table(tools / "coco_stuff164k.py"),
            "coco_stuff10k_clsID_to_trID": table(tools / "coco_stuff10k.py"),
            "pascal_context_mapping": ids,
            "source": f"mmsegmentation {mmseg.__version__} tools/dataset_converters (wheel .mim copy)"}


def export(in_dir: Path) -> None:
    import mmengine

    model, state, version = _mmseg_ocrnet(in_dir / f"hr18s_ocr_k{NUM_CLASSES}.pth")
    meta = dict(mmseg=version, mmengine=mmengine.__version__, config=MMSEG_CONFIG, num_classes=NUM_CLASSES,
                seed=SEED, checksum=weight_checksum(state), generator="scripts/mmseg_fidelity.py export")
    DATA.mkdir(parents=True, exist_ok=True)
    _export_ohem(meta)
    tables = dict(meta=meta, schedules=_schedules(), label_maps=_label_maps())
    (DATA / "mmseg_fidelity_tables.json").write_text(json.dumps(tables, indent=1) + "\n")
    _export_msflip(model, meta)
    _export_slide(model, meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("weights", "export"))
    parser.add_argument("--dir", default="/tmp/mmseg_fidelity", help="where weights writes and export reads")
    args = parser.parse_args(argv)
    if args.step == "weights":
        sys.path.insert(0, str(REPO))
        write_weights(Path(args.dir))
    else:
        export(Path(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
