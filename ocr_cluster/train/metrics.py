"""mmseg's IoUMetric: dataset-wide intersection / union areas, classes absent from both excluded.

A K x K confusion matrix (rows: label, columns: prediction) holds every area exactly (int64), so
workers evaluate their share of the images and one all-reduce sums the matrices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class IoUMetric:
    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """`pred` and `label`: integer class maps of the same shape (H, W) or (B, H, W)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        pred = pred.reshape(-1).to("cpu", torch.int64)
        label = label.reshape(-1).to("cpu", torch.int64)
        if self.reduce_zero_label:  # 0 ("other") is ignored and every class id moves down by one
            label = torch.where(label == 0, torch.full_like(label, 255), label - 1)
            label = torch.where(label == 254, torch.full_like(label, 255), label)
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        if label.numel() and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(f"label values outside [0, {self.num_classes}) and not {self.ignore_index}")
        k = self.num_classes
        self.confusion += torch.bincount(label * k + pred.clamp(0, k - 1), minlength=k * k).reshape(k, k)

    def all_reduce(self, device: torch.device | None = None) -> None:
        """Sum the confusion matrices of every rank (no-op outside torch.distributed). Under NCCL on `device`,
        the worker's GPU (default: the current CUDA device)."""
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() != "nccl":
                device = torch.device("cpu")
            elif device is None or device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            total = self.confusion.to(device)
            dist.all_reduce(total)
            self.confusion = total.cpu()

    def compute(self) -> dict:
        """{'aAcc', 'mIoU', 'mAcc'} in percent rounded to 2 decimals as mmseg, and 'IoU' / 'Acc' per class
        (NaN for a class absent from both prediction and label)."""
        conf = self.confusion.double().numpy()
        intersect = np.diag(conf)
        area_label = conf.sum(axis=1)
        area_pred = conf.sum(axis=0)
        union = area_label + area_pred - intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersect / union
            acc = intersect / area_label
            aacc = intersect.sum() / area_label.sum()
        return {
            "aAcc": round(float(aacc) * 100, 2),
            "mIoU": round(float(np.nanmean(iou)) * 100, 2) if np.isfinite(iou).any() else float("nan"),
            "mAcc": round(float(np.nanmean(acc)) * 100, 2) if np.isfinite(acc).any() else float("nan"),
            "IoU": [round(float(v) * 100, 2) for v in iou],
            "Acc": [round(float(v) * 100, 2) for v in acc],
        }
