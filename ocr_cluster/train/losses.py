"""Segmentation losses: cross-entropy with mmseg's or PyTorch's normalisation, OHEM, class weights.

mmseg (`reduction='mmseg'`, avg_non_ignore=False) divides the summed per-pixel loss by the number of
ALL pixels, ignored ones included, and with class weights still takes a plain mean. PyTorch / HRNet-OCR
/ openseg (`reduction='valid'`) divide by the valid pixels (by the summed weights with class weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_to(logits: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


@torch.no_grad()
def ohem_weights(logits: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int,
                 ignore_index: int = 255) -> torch.Tensor:
    """mmseg's OHEMPixelSampler: keep valid pixels whose ground-truth probability is below
    max(thresh, the (min_kept * batch)-th smallest such probability); 1 = kept, 0 = dropped."""
    valid = label != ignore_index
    prob = logits.float().softmax(dim=1)
    target = torch.where(valid, label, torch.zeros_like(label))
    gt_prob = prob.gather(1, target.unsqueeze(1)).squeeze(1)
    valid_prob = gt_prob[valid]
    weights = torch.zeros_like(gt_prob)
    if valid_prob.numel():
        batch_kept = min_kept * label.shape[0]
        kth = valid_prob.sort().values[min(batch_kept, valid_prob.numel() - 1)]
        threshold = max(float(kth), thresh)
        weights[valid] = (valid_prob < threshold).to(weights.dtype)
    return weights


def cross_entropy(logits: torch.Tensor, label: torch.Tensor, *, reduction: str = "mmseg",
                  class_weight: torch.Tensor | None = None, ignore_index: int = 255,
                  align_corners: bool = False, ohem: tuple[float, int] | None = None) -> torch.Tensor:
    """CE of (B, K, h, w) logits against a (B, H, W) label map; logits are resized to the label first."""
    logits = resize_to(logits, label.shape[-2:], align_corners).float()
    label = label.long()
    per_pixel = F.cross_entropy(logits, label, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if ohem is not None:
        kept = ohem_weights(logits, label, ohem[0], ohem[1], ignore_index)
        per_pixel = per_pixel * kept
        if reduction == "valid":
            return per_pixel.sum() / kept.sum().clamp(min=1)
    if reduction == "mmseg":
        return per_pixel.mean()
    if reduction == "valid":
        valid = label != ignore_index
        if class_weight is None:
            denom = valid.sum()
        else:
            denom = class_weight[torch.where(valid, label, torch.zeros_like(label))][valid].sum()
        return per_pixel.sum() / denom.clamp(min=1e-12)
    raise ValueError(f"unknown reduction {reduction!r}; valid: mmseg, valid")


def segmentation_loss(outputs: dict[str, torch.Tensor], label: torch.Tensor, weights: dict[str, float], *,
                      reduction: str = "mmseg", class_weight: torch.Tensor | None = None,
                      align_corners: bool = False, ohem: tuple[float, int] | None = None,
                      final: str = "decode") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum over the heads' logits. OHEM applies to the final head only (as HRNet-OCR and
    openseg do); auxiliary heads keep plain CE. Returns (total, per-head losses detached)."""
    total = torch.zeros((), device=label.device)
    parts = {}
    for name, logits in outputs.items():
        loss = cross_entropy(logits, label, reduction=reduction, class_weight=class_weight,
                             align_corners=align_corners, ohem=ohem if name == final else None)
        total = total + weights[name] * loss
        parts[name] = loss.detach()
    return total, parts
