"""The GPU-only paths of the training loop whose logic can be checked on CPU: the AMP dtype chosen per
device capability, losses kept on the device between log lines, the CUDA RNG reseeded on a resume,
cuDNN's benchmark switched around evaluation, the training memory peak, fps with post-processing."""

from __future__ import annotations

import torch

from ocr_cluster.train.loop import amp_dtype


def test_amp_auto_picks_bf16_only_where_it_is_native():
    cuda = torch.device("cuda")
    assert amp_dtype("auto", cuda, capability=(8, 0)) is torch.bfloat16  # A100
    assert amp_dtype("auto", cuda, capability=(9, 0)) is torch.bfloat16  # H100
    assert amp_dtype("auto", cuda, capability=(7, 0)) is torch.float16   # V100: bf16 only emulated
    assert amp_dtype("auto", cuda, capability=(7, 5)) is torch.float16   # T4
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", cuda, capability=(7, 0)) is torch.bfloat16  # asked for explicitly: as asked
    assert amp_dtype("none", cuda, capability=(9, 0)) is None
