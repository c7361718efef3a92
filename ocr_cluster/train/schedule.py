"""SGD / AdamW with per-group lr multipliers, and the iteration-based poly schedule with warm-up.

poly: lr(t) = (base - min_lr) * (1 - t / T) ** power + min_lr   (mmseg's PolyLR; min_lr 0 = HRNet-OCR)
linear warm-up over the first `warmup_iters`: lr(t) * (1 - (1 - t / W) * (1 - warmup_ratio))   (mmcv)
"""

from __future__ import annotations

import torch
from torch import nn

from ocr_cluster.config import OptimizerSection, ScheduleSection


def build_optimizer(model: nn.Module, cfg: OptimizerSection, **impl) -> torch.optim.Optimizer:
    """Backbone parameters at lr, everything else at lr * head_lr_mult (weight decay on all, as mmseg).
    `impl`: the kernels, `foreach=True` or `fused=True` (fastpath.optimizer_impl); torch's choice when empty."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups = [
        {"params": [p for p in model.parameters() if id(p) in backbone_ids], "lr_mult": 1.0},
        {"params": [p for p in model.parameters() if id(p) not in backbone_ids], "lr_mult": cfg.head_lr_mult},
    ]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mult"]
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               **impl)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)


def lr_at(it: int, base_lr: float, cfg: ScheduleSection) -> float:
    """Learning rate for iteration `it` (0-based) of cfg.iters."""
    progress = min(it, cfg.iters) / cfg.iters
    lr = (base_lr - cfg.min_lr) * (1 - progress) ** cfg.power + cfg.min_lr
    if cfg.warmup_iters and it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, it: int, base_lr: float, cfg: ScheduleSection) -> float:
    lr = lr_at(it, base_lr, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr
