"""torch.compile of the zoo on CPU (eval mode).

Inductor compilation is slow on a 2-core CPU, so the full compile runs on the model whose graph
compiles fastest (ResNet-50-D16 + FCN, ~15 s); the OCRNet cascade is checked for graph breaks with
`fullgraph=True` on dynamo's eager backend (tracing only, a few seconds). Set
OCR_CLUSTER_SKIP_COMPILE=1 to skip both.
"""

from __future__ import annotations

import os

import pytest
import torch

from ocr_cluster.models import build_model

pytestmark = [
    pytest.mark.skipif(os.environ.get("OCR_CLUSTER_SKIP_COMPILE") == "1", reason="OCR_CLUSTER_SKIP_COMPILE=1"),
    pytest.mark.timeout(300),
]


def _eager_and_compiled(backbone: str, head: str, **compile_kwargs):
    torch.manual_seed(0)
    model = build_model(backbone, head, 3).eval()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        return model(x), torch.compile(model, **compile_kwargs)(x)


def test_ocr_cascade_traces_without_graph_breaks():
    ref, out = _eager_and_compiled("resnet50_d16", "ocr", backend="eager", fullgraph=True)
    assert torch.equal(ref, out)


def test_inductor_compile_eval_cpu():
    ref, out = _eager_and_compiled("resnet50_d16", "fcn")
    assert out.shape == ref.shape == (1, 3, 64, 64)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
