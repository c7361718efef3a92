"""The GPU fast path's wiring: the autocast dtype (cluster.amp), channels-last memory format,
torch.compile, the optimizer's kernels (cluster.channels_last, cluster.compile, cluster.optimizer_impl),
DDP's options, and cuDNN's benchmark mode (always on for training on CUDA: loop.Trainer.start; off for
evaluation and the fps run).

The order is fixed here once, because each step depends on the one before:

1. SyncBN conversion (Trainer._build_model), first: the modules the later steps see are the final ones;
2. channels-last, before DDP: DDP lays out its gradient buckets with the parameters' strides;
3. DDP (Ray's prepare_model, which also moves the model to the device);
4. torch.compile of the DDP module, DDP's documented order: dynamo splits the graph at DDP's bucket
   boundaries (DDPOptimizer) so the gradient all-reduces still overlap the backward.

The compiled wrapper is only ever called. Checkpoints, evaluation, the fps run and the optimizer use the
module it wraps, so state_dict keys never gain `_orig_mod.`, a checkpoint loads with or without the option,
and evaluation (image sizes that vary, each of which would recompile) runs eager.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from ocr_cluster.config import ClusterSection, ConfigError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def fused_devices() -> list[str]:
    """Device types with torch's fused optimizer kernels (CUDA since torch 2.0; CPU since 2.4 for SGD/AdamW)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # pragma: no cover - older torch
        return ["cuda"]
    return list(_get_fused_kernels_supported_devices())


def optimizer_impl(impl: str, optimizer_type: str, device_type: str) -> dict:
    """cluster.optimizer_impl as keyword arguments of the optimizer's constructor. A ConfigError (one line)
    where this torch has no such implementation of the optimizer for `device_type`."""
    if impl == "auto":
        return {}
    cls = OPTIMIZERS[optimizer_type]
    if impl not in inspect.signature(cls).parameters:
        raise ConfigError(f"cluster.optimizer_impl {impl}: torch {torch.__version__} has no {impl} "
                          f"{cls.__name__}; use auto")
    if impl == "fused" and device_type not in fused_devices():
        raise ConfigError(f"cluster.optimizer_impl fused: torch {torch.__version__} has no fused {cls.__name__} "
                          f"for {device_type} parameters (only for {', '.join(fused_devices())}); use foreach "
                          "or auto")
    return {impl: True}


def check(cluster: ClusterSection, optimizer_type: str) -> None:
    """Before a run (driver preflight): the options are possible with this torch on the device the config
    asks for. Raises ConfigError with one line."""
    optimizer_impl(cluster.optimizer_impl, optimizer_type, "cuda" if cluster.use_gpu else "cpu")
    if cluster.compile:
        from torch._dynamo.eval_frame import is_dynamo_supported

        if not is_dynamo_supported():
            raise ConfigError(f"cluster.compile: torch {torch.__version__} cannot compile on this Python or "
                              "platform; set it false")


def prepare(model: nn.Module, cluster: ClusterSection,
            wrap: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, Callable]:
    """`model` (SyncBN already converted) made ready to train: (the module to checkpoint, evaluate and optimize,
    DDP or bare as `wrap` returns it; the callable the training step runs, that module or its compiled wrapper)."""
    if cluster.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap(model)
    return model, torch.compile(model) if cluster.compile else model


def training_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A training batch in the model's memory format (a copy on the device; a no-op when already so)."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def amp_dtype(amp: str, device: torch.device, capability: tuple[int, int] | None = None,
              cpu_bf16: bool | None = None) -> torch.dtype | None:
    """cluster.amp as a dtype (None = fp32). Native bf16 means a GPU of compute capability >= 8.0 (Ampere on;
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated, V100 and T4, which is slower
    than fp32) or a CPU with AVX512-BF16 (Intel Cooper Lake / Sapphire Rapids on, AMD Zen 4 on). `auto`:
    bf16 on GPUs where native, else fp16 with the GradScaler; fp32 on CPU. `native-bf16`: bf16 where native,
    else fp32. `capability` and `cpu_bf16` default to the device's own."""
    if amp in ("auto", "native-bf16"):
        if device.type == "cuda":
            major, _ = capability or torch.cuda.get_device_capability(device)
            return torch.bfloat16 if major >= 8 else (torch.float16 if amp == "auto" else None)
        if device.type == "cpu" and amp == "native-bf16":
            return torch.bfloat16 if (native_cpu_bf16() if cpu_bf16 is None else cpu_bf16) else None
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16), which oneDNN's bf16 convolutions use."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, hence the fallback
    return bool(check and check())


def ddp_options(model: nn.Module) -> dict:
    """DistributedDataParallel's options for `model`. With SyncBN every rank computes the same running
    statistics (from the global batch), so DDP's broadcast of rank 0's buffers each forward is redundant."""
    syncbn = any(isinstance(module, nn.SyncBatchNorm) for module in model.modules())
    return {"broadcast_buffers": False} if syncbn else {}


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN's autotuner on or off for a block, restored after. On for training (fixed-size crops: each
    convolution's fastest algorithm is found once); off for evaluation and the fps run, whose image sizes
    vary and where mmseg measures without it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def normalize_on_device(normalize_on: str, device: torch.device) -> bool:
    """cluster.normalize_on for this worker's device: whether the decode tasks hand over uint8 crops that the
    training loop normalises on the device (auto: on a GPU, which does it for free; a CPU rank would take the
    work from the decode tasks onto its own training thread)."""
    return normalize_on == "device" or (normalize_on == "auto" and device.type == "cuda")
