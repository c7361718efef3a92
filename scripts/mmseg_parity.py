#!/usr/bin/env python3
"""Numerical parity of ocr_cluster's models with mmsegmentation 1.2.2 (CPU, random weights).

Two halves, run in two different Python environments:

  export  (inside a throwaway mmsegmentation env, NOT a project dependency)
      Builds the mmseg config of a model named in shared/reference/mmseg_state_dicts.json
      (or one DERIVED from it, e.g. the R-101-D16 variants), checks its state_dict against
      the JSON, random-initialises it from a fixed seed with data-dependent, perturbed BN
      running statistics (see `randomise`; eval-mode BN is far from the identity), runs
      mmseg's `encode_decode` (whole mode) on a fixed random batch (default 2x3x256x512), in
      float32 and again in float64, and writes to OUT/MODEL/:
        checkpoint.pth  {'state_dict': ..., 'meta': {...}}   (an mmseg-style checkpoint)
        io.pth          input, logits (float32 and float64), backbone features, aux logits
        trace.pth       (with --trace) the output of every conv / BN / linear module, by name

  check   (in the project venv; needs no mmseg)
      Builds the same network with `ocr_cluster.models.build_model`, loads checkpoint.pth
      with `ocr_cluster.models.convert.load_checkpoint` (strict), runs the same input and
      prints the relative max error max|ours - mmseg| / max|mmseg| of the final logits
      (float32 and float64), of the backbone features and of the aux logits. With a
      trace.pth it also names the first module whose output disagrees.

Measured (seed 0; 2x3x256x512 for all 13 MODELS, 1x3x256x512 and 1x3x249x503 for the 11
JSON models): fp64 logits agree to <= 2.5e-15 relative max error everywhere. fp32 logits are
bit-identical except where our SelfAttentionBlock hands a permuted (channels-last strided)
context to the next 1x1 conv where mmseg makes it contiguous first: OCR heads at batch 2
(3.9e-7 .. 6.8e-7) and ISA (1.3e-6 .. 1.9e-6); both become bit-identical with `.contiguous()`
there. A mismatch is localised with `export --trace` and the `trace:` line of `check`
(`--trace-dtype float32` finds the first fp32 round-off difference); `check --perturb KEY`
shows that the trace finds a deliberately wrong tensor.

Usage:
  /tmp/mmseg_env/bin/python scripts/mmseg_parity.py export --model ocrnet_hr18s_cityscapes
  .venv/bin/python scripts/mmseg_parity.py check --model ocrnet_hr18s_cityscapes
  (both default to --dir /tmp/mmseg_parity; --all runs every model in MODELS below)

How the mmseg reference env was built (Python 3.11, torch 2.13.0+cpu from the local wheel
cache; these are the commands that worked):

  python3 -m venv /tmp/mmseg_env
  /tmp/mmseg_env/bin/pip install torch==2.13.0+cpu
  /tmp/mmseg_env/bin/pip install mmcv-lite==2.1.0 mmengine mmsegmentation==1.2.2 ftfy regex
      # resolved: mmengine 0.10.7, numpy 2.4.6, opencv-python 5.0.0.93 (+ matplotlib, scipy, ...)
  # mmcv-lite ships mmcv/ops/*.py but not the compiled mmcv._ext they load at import time
  # (mmseg imports mmcv.ops.point_sample at import). Stub it with a sitecustomize.py:
  cat > /tmp/mmseg_env/lib/python3.11/site-packages/sitecustomize.py <<'PY'
  import sys, types
  _ext = types.ModuleType("mmcv._ext")
  def _missing(name):
      def op(*args, **kwargs):
          raise NotImplementedError(f"mmcv._ext.{name} is a stub in this mmcv-lite env")
      return op
  def _getattr(name):
      if name.startswith("__"):
          raise AttributeError(name)
      return _missing(name)
  _ext.__getattr__ = _getattr
  sys.modules["mmcv._ext"] = _ext
  PY
  # The configs ship inside the wheel: <site-packages>/mmseg/.mim/configs/<mmseg_config>.
  # No compiled op is used by OCRNet / FCN / ASPP / DeepLabV3+ / ISA on CPU. SyncBN in the
  # configs is built as plain BN here (identical keys, identical eval-mode maths).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
def _spec_json() -> Path:
    """shared/reference/mmseg_state_dicts.json beside the checkout, inside it, or beside the main
    checkout of a `git worktree` (whose .git is a file naming <main>/.git/worktrees/<name>)."""
    candidates = [REPO.parent, REPO]
    git = REPO / ".git"
    if git.is_file() and git.read_text().startswith("gitdir:"):
        candidates.append(Path(git.read_text().split(":", 1)[1].strip()).parents[2].parent)
    paths = [c / "shared" / "reference" / "mmseg_state_dicts.json" for c in candidates]
    return next((p for p in paths if p.exists()), paths[0])


SPEC_JSON = _spec_json()

# mmseg model name -> (our backbone, our head, num_classes). Options for build_model are
# passed as --option key=value on the command line when needed.
MODELS = {
    "ocrnet_hr18s_cityscapes": ("hrnetv2_w18_small", "ocr", 19),
    "ocrnet_hr18_cityscapes": ("hrnetv2_w18", "ocr", 19),
    "ocrnet_hr48_cityscapes": ("hrnetv2_w48", "ocr", 19),
    "ocrnet_r101-d8_cityscapes": ("resnet101_d8", "ocr", 19),
    "ocrnet_hr18_ade20k": ("hrnetv2_w18", "ocr", 150),
    "ocrnet_hr18_voc12aug": ("hrnetv2_w18", "ocr", 21),
    "fcn_hr18_cityscapes": ("hrnetv2_w18", "fcn", 19),
    "deeplabv3_r101-d8_cityscapes": ("resnet101_d8", "deeplabv3", 19),
    "deeplabv3plus_r101-d8_cityscapes": ("resnet101_d8", "deeplabv3plus", 19),
    "fcn_r50-d8_cityscapes": ("resnet50_d8", "fcn", 19),
    "isanet_r50-d8_cityscapes": ("resnet50_d8", "isa", 19),
}
# Models with no mmseg config of their own: (the JSON / config they derive from, overrides of
# cfg.model as dotted key -> value). Their state_dict layout is the base's (dilation is no weight).
DERIVED = {
    "ocrnet_r101-d16_cityscapes": ("ocrnet_r101-d8_cityscapes", {
        "backbone.strides": (1, 2, 2, 1), "backbone.dilations": (1, 1, 1, 2)}),
    "deeplabv3plus_r101-d16_cityscapes": ("deeplabv3plus_r101-d8_cityscapes", {
        "backbone.strides": (1, 2, 2, 1), "backbone.dilations": (1, 1, 1, 2),
        "decode_head.dilations": (1, 6, 12, 18)}),
}
MODELS.update({
    "ocrnet_r101-d16_cityscapes": ("resnet101_d16", "ocr", 19),
    "deeplabv3plus_r101-d16_cityscapes": ("resnet101_d16", "deeplabv3plus", 19),
})
DEFAULT_SET = [
    "ocrnet_hr18s_cityscapes",
    "ocrnet_hr48_cityscapes",
    "ocrnet_r101-d8_cityscapes",
    "deeplabv3plus_r101-d8_cityscapes",
    "isanet_r50-d8_cityscapes",
]


def rel_max_err(ours, ref) -> float:
    ours = ours.double()
    ref = ref.double()
    denom = ref.abs().max().item()
    return (ours - ref).abs().max().item() / (denom if denom > 0 else 1.0)


# ----------------------------------------------------------------------------- export (mmseg)


def _mmseg_model(name: str):
    import mmseg
    from mmengine.config import Config
    from mmseg.registry import MODELS as MM_MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    base, overrides = DERIVED.get(name, (name, {}))
    spec = json.loads(SPEC_JSON.read_text())[base]
    path = Path(mmseg.__file__).parent / ".mim" / "configs" / spec["mmseg_config"]
    cfg = Config.fromfile(str(path))
    for dotted, value in overrides.items():
        node = cfg.model
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value

    def no_sync(node):
        if isinstance(node, dict):
            if node.get("type") == "SyncBN":
                node["type"] = "BN"
            for value in node.values():
                no_sync(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                no_sync(value)

    model_cfg = cfg.model
    no_sync(model_cfg)
    model_cfg.pop("pretrained", None)
    model_cfg.backbone.pop("init_cfg", None)
    model = MM_MODELS.build(model_cfg)
    # Same keys and shapes as the reference JSON (the JSON was made from the same classes).
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: list(v) for k, v in spec["state_dict"].items()}
    if got != want:
        raise SystemExit(f"{name}: mmseg state_dict differs from {SPEC_JSON.name}")
    config = spec["mmseg_config"] + "".join(f" {k}={v}" for k, v in overrides.items())
    return model, config, mmseg.__version__


RESIDUAL_BN = re.compile(r"(\.bn3|branches\.\d+\.\d+\.bn2)$")


def randomise(model, seed: int, calib_shape=(2, 3, 128, 256)):
    """Seeded random weights, then data-dependent BN running statistics.

    Conv weights are Kaiming-normal (fan_in, gain sqrt 2), conv biases N(0, 0.1^2), BN affine
    weight U(0.5, 1.5) and bias N(0, 0.1^2), except the last BN of each residual branch
    (`*.bn3` of a Bottleneck, `branches.*.*.bn2` of an HRNet BasicBlock) whose weight is
    U(0.05, 0.15): with full-size residual branches a random ResNet-101 is chaotic (an input
    perturbation of 1e-7 moved the logits by 3e-4 relative), so fp32 round-off alone gave
    ~1e-3 logit differences and a 1e-5 fp32 parity bound would be meaningless. With the
    smaller branches mmseg's own fp32-vs-fp64 difference is ~1e-6..2e-5 (printed by export). The BN running statistics are then set one BN at
    a time, in execution order, from the eval-mode input that BN sees on a random batch: mean +
    0.1 std N(0,1) noise and (var + 0.25 mean^2 + 1e-3) * U(0.7, 1.3). The mean^2 term keeps
    the BNs of the OCR key/value projections (whose inputs are the K region vectors, nearly
    equal under random weights) from amplifying tiny differences, so fp32 logits stay well
    conditioned; the noise makes sure eval-mode BN is not the identity.
    """
    import torch
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    gen = torch.Generator().manual_seed(seed)
    bns = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, _BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                if RESIDUAL_BN.search(name):
                    module.weight.mul_(0.1)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
                bns.append(module)
        done = set()

        def set_stats(mod, args):
            if id(mod) in done:
                return
            done.add(id(mod))
            x = args[0].double().transpose(0, 1).flatten(1)  # (C, N*H*W)
            mean, var = x.mean(1), x.var(1, unbiased=False)
            c = mean.numel()
            noise = torch.randn(c, generator=gen, dtype=torch.float64)
            mod.running_mean.copy_(mean + 0.1 * var.sqrt() * noise)
            scale = torch.rand(c, generator=gen, dtype=torch.float64) * 0.6 + 0.7
            mod.running_var.copy_((var + 0.25 * mean**2 + 1e-3) * scale)

        model.eval()
        handles = [bn.register_forward_pre_hook(set_stats) for bn in bns]
        x = torch.randn(calib_shape, generator=gen)
        metas = [dict(img_shape=tuple(calib_shape[2:]), pad_shape=tuple(calib_shape[2:]))] * calib_shape[0]
        model.encode_decode(x, metas)
        for h in handles:
            h.remove()
        unset = [bn for bn in bns if id(bn) not in done]
        for bn in unset:  # BNs that did not run in eval mode (e.g. an auxiliary head)
            c = bn.running_mean.numel()
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=gen) * 0.6 + 0.7)
    model.eval()


def _tracer(model, store: dict):
    from torch import nn

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)):
            def hook(mod, inp, out, name=name):
                store[name] = out.detach().clone()
            handles.append(module.register_forward_hook(hook))
    return handles


def export(name: str, out_dir: Path, size, seed: int, trace, trace_size, batch: int = 2) -> None:
    """`trace`: None, or (batch, dtype) of the traced run."""
    import torch

    torch.manual_seed(seed)
    model, config, version = _mmseg_model(name)
    randomise(model, seed, calib_shape=(2, 3, *size))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((batch, 3, *size), generator=gen)
    metas = [dict(img_shape=tuple(size), pad_shape=tuple(size))] * batch
    cascade = type(model).__name__ == "CascadeEncoderDecoder"

    grabbed = {}

    def grab_backbone(mod, inp, out):
        grabbed["backbone"] = [t.detach().clone() for t in out]

    handle = model.backbone.register_forward_hook(grab_backbone)
    t0 = time.time()
    with torch.no_grad():
        logits32 = model.encode_decode(x, metas)
    t32 = time.time() - t0
    handle.remove()
    if cascade:  # encode_decode calls decode_head[0].forward directly, so no hook fires on it
        with torch.no_grad():
            grabbed["aux"] = model.decode_head[0].forward(grabbed["backbone"]).detach().clone()
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.double()
        logits64 = model.encode_decode(x.double(), metas)
        model.float()

    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    meta = dict(mmseg_version=version, config=config, seed=seed, input_size=list(size),
                generator="scripts/mmseg_parity.py export")
    torch.save({"state_dict": state_dict, "meta": meta}, target / "checkpoint.pth")
    torch.save(dict(input=x, logits=logits32, logits64=logits64, backbone=grabbed["backbone"],
                    aux=grabbed.get("aux"), meta=meta), target / "io.pth")
    print(f"{name}: exported to {target} (logits {tuple(logits32.shape)}, "
          f"|max| {logits32.abs().max().item():.4g}, std {logits32.std().item():.4g}; "
          f"fp32 forward {t32:.1f}s; fp32 vs fp64 rel max err {rel_max_err(logits32, logits64):.3g})")
    if trace:
        trace_batch, trace_dtype = trace if isinstance(trace, tuple) else (1, torch.float64)
        xt = torch.randn((trace_batch, 3, *trace_size), generator=gen)
        store: dict = {}
        handles = _tracer(model, store)
        with torch.no_grad():
            model.to(trace_dtype)
            logits_t = model.encode_decode(xt.to(trace_dtype), [dict(img_shape=tuple(trace_size),
                                                                     pad_shape=tuple(trace_size))] * trace_batch)
            model.float()
        for h in handles:
            h.remove()
        torch.save(dict(input=xt, logits=logits_t, order=list(store), outputs=store), target / "trace.pth")
        print(f"{name}: trace of {len(store)} modules at {trace_batch}x3x{trace_size[0]}x{trace_size[1]} "
              f"({str(trace_dtype).replace('torch.', '')}) saved")


# ----------------------------------------------------------------------------- check (ours)


def _parse_options(pairs):
    options = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def check(name: str, in_dir: Path, options: dict, tol: float, perturb: str | None = None) -> bool:
    import torch

    from ocr_cluster.models import build_model
    from ocr_cluster.models.convert import load_checkpoint

    backbone, head, num_classes = MODELS[name]
    target = in_dir / name
    io = torch.load(target / "io.pth", weights_only=True)
    model = build_model(backbone, head, num_classes, **options)
    spec = json.loads(SPEC_JSON.read_text())[DERIVED.get(name, (name,))[0]]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: list(v) for k, v in spec["state_dict"].items()}
    if ours != want:
        missing = sorted(set(want) - set(ours))
        extra = sorted(set(ours) - set(want))
        shape = sorted(k for k in set(want) & set(ours) if want[k] != ours[k])
        print(f"{name}: KEY MISMATCH with mmseg: missing {missing[:10]} ({len(missing)}), "
              f"unexpected {extra[:10]} ({len(extra)}), shape {shape[:10]} ({len(shape)})")
    load_checkpoint(model, str(target / "checkpoint.pth"), strict=True)
    model.eval()
    if perturb:  # self-test of the trace: a wrong value here must be found by the trace
        with torch.no_grad():
            model.state_dict()[perturb].add_(0.05)
        print(f"  (perturbed {perturb} by +0.05)")

    grabbed = {}

    def grab_backbone(mod, inp, out):
        grabbed["backbone"] = [t.detach().clone() for t in out]

    handles = [model.backbone.register_forward_hook(grab_backbone)]
    aux_module = None
    if io.get("aux") is not None:
        aux_module = dict(model.named_modules()).get("decode_head.0")
        if aux_module is not None:
            def grab_aux(mod, inp, out):
                grabbed["aux"] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()
            handles.append(aux_module.register_forward_hook(grab_aux))
    with torch.no_grad():
        logits32 = model(io["input"])
    for h in handles:
        h.remove()
    with torch.no_grad():
        model.double()
        logits64 = model(io["input"].double())
        model.float()

    err32 = rel_max_err(logits32, io["logits"])
    err64 = rel_max_err(logits64, io["logits64"])
    floor = rel_max_err(io["logits"], io["logits64"])
    parts = [f"logits fp32 {err32:.3g} (mmseg's own fp32-vs-fp64 {floor:.3g})", f"fp64 {err64:.3g}"]
    if "backbone" in grabbed:
        errs = [rel_max_err(a, b) for a, b in zip(grabbed["backbone"], io["backbone"])]
        parts.append("backbone " + "/".join(f"{e:.2g}" for e in errs))
    if "aux" in grabbed:
        parts.append(f"aux {rel_max_err(grabbed['aux'], io['aux']):.3g}")
    # fp64 isolates structural differences from fp32 round-off (which for these deep nets is
    # itself ~1e-5 relative, see the floor printed above).
    # fp32 passes below tol, or below twice mmseg's own fp32 round-off when that is larger.
    ok = err32 <= max(tol, 2 * floor) and err64 <= 1e-9 and tuple(logits32.shape) == tuple(io["logits"].shape)
    print(f"{name} ({backbone}+{head}, K={num_classes}) rel max err: " + ", ".join(parts)
          + f"  -> {'OK' if ok else 'FAIL'} (tol {tol:g})")

    trace_path = target / "trace.pth"
    if trace_path.exists() and (not ok or os.environ.get("PARITY_TRACE")):
        trace = torch.load(trace_path, weights_only=True)
        store: dict = {}
        handles = _tracer(model, store)
        dtype = trace["logits"].dtype
        with torch.no_grad():
            model.to(dtype)
            model(trace["input"].to(dtype))
            model.float()
        for h in handles:
            h.remove()
        first = None
        for mod_name in trace["order"]:
            if mod_name not in store:
                print(f"  trace: module {mod_name} not run (or not present) in ours")
                continue
            a, b = store[mod_name], trace["outputs"][mod_name]
            if a.shape != b.shape:
                print(f"  trace: {mod_name} shape ours {tuple(a.shape)} vs mmseg {tuple(b.shape)}")
                first = first or mod_name
                break
            e = rel_max_err(a, b)
            if e > 1e-9:
                print(f"  trace: first divergent module (mmseg execution order): {mod_name} rel err {e:.3g}")
                first = mod_name
                break
        if first is None:
            print(f"  trace: all {len(trace['order'])} conv/BN outputs agree ({dtype}, rel <= 1e-9)")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("export", "check"))
    parser.add_argument("--model", action="append", help="mmseg model name (repeatable)")
    parser.add_argument("--all", action="store_true", help=f"every model in MODELS (default set: {DEFAULT_SET})")
    parser.add_argument("--dir", default="/tmp/mmseg_parity", help="where export writes and check reads")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2, help="export: images in the input batch")
    parser.add_argument("--trace", action="store_true", help="export: also save every conv/BN output")
    parser.add_argument("--trace-size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--trace-batch", type=int, default=1)
    parser.add_argument("--trace-dtype", choices=("float64", "float32"), default="float64",
                        help="float32 finds where fp32 round-off first differs (bit-exactness)")
    parser.add_argument("--option", action="append", help="check: build_model option key=json_value")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--perturb", metavar="KEY", help="check: add 0.05 to this state_dict entry (trace self-test)")
    args = parser.parse_args(argv)
    names = list(MODELS) if args.all else (args.model or DEFAULT_SET)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    out = Path(args.dir)
    if args.mode == "export":
        for name in names:
            trace = (args.trace_batch, getattr(__import__("torch"), args.trace_dtype)) if args.trace else None
            export(name, out, tuple(args.size), args.seed, trace, tuple(args.trace_size), args.batch)
        return 0
    sys.path.insert(0, str(REPO))
    results = [check(name, out, _parse_options(args.option), args.tol, args.perturb) for name in names]
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
