"""`ocr-cluster eval CONFIG --checkpoint URI`: mIoU of any checkpoint on the config's val split.

Runs in this process (no Ray): builds the config's model, loads the checkpoint through the model zoo's
loader (this project's, mmseg's or HRNet-OCR's format), evaluates every val image at its original
resolution and prints mmseg's per-class table.
"""

from __future__ import annotations

import argparse
import time

import torch

from ocr_cluster import config as config_mod
from ocr_cluster.data.pipeline import iter_eval, open_dataset
from ocr_cluster.models import build_model, load_checkpoint
from ocr_cluster.train import host
from ocr_cluster.train.inference import InferenceSettings, evaluate
from ocr_cluster.train.metrics import IoUMetric


def run_eval(cfg: config_mod.Config, checkpoint: str, *, ms_flip: bool = False, mode: str | None = None,
             device: str | None = None) -> tuple[dict, list[str]]:
    manifest = open_dataset(cfg.data)
    num_classes = cfg.model.num_classes or manifest.num_classes
    model = build_model(cfg.model.backbone, cfg.model.head, num_classes, align_corners=cfg.model.align_corners,
                        dropout_ratio=cfg.model.dropout_ratio)
    load_checkpoint(model, checkpoint)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    host.keep_freed_memory()
    model.to(target).eval()
    metric = IoUMetric(num_classes)
    settings = InferenceSettings.from_config(cfg.evaluation, model.final_head.align_corners, ms_flip=ms_flip, mode=mode,
                                             scale=cfg.data.scale)
    evaluate(model, iter_eval(cfg.data, manifest=manifest), metric, settings, target)
    return metric.compute(), list(manifest.classes)


def format_table(scores: dict, classes: list[str]) -> str:
    """mmseg's per-class table (Class | IoU | Acc) and the summary line."""
    width = max(len("Class"), *(len(c) for c in classes))
    lines = [f"| {'Class':<{width}} |  IoU  |  Acc  |", f"|{'-' * (width + 2)}|-------|-------|"]
    for name, iou, acc in zip(classes, scores["IoU"], scores["Acc"]):
        lines.append(f"| {name:<{width}} | {iou:5.2f} | {acc:5.2f} |")
    lines.append(f"aAcc {scores['aAcc']:.2f} | mIoU {scores['mIoU']:.2f} | mAcc {scores['mAcc']:.2f}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    start = time.perf_counter()
    scores, classes = run_eval(cfg, args.checkpoint, ms_flip=args.ms_flip, mode=args.mode)
    mode = (args.mode or cfg.evaluation.mode) + (" + ms/flip" if args.ms_flip else "")
    print(f"{args.checkpoint} on {cfg.data.dataset} val ({mode}, {time.perf_counter() - start:.0f}s)")
    print(format_table(scores, classes))
    return 0
