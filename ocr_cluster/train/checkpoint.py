"""Training checkpoints: one directory per report, uploaded by Ray Train to
<storage.checkpoint_uri>/<run_id>/checkpoint_iter=NNNNNNN/ (the names are train/layout.py's).

    model.pt   this project's model checkpoint format (ocr_cluster.models.convert): loadable by
               `ocr-cluster eval --checkpoint`, `models convert` and `model.pretrained`
    state.pt   optimizer state (momentum buffers), iteration, the AMP scaler, every rank's RNG states, and
               the run's clock (train/clock.py: when its first attempt started, its training seconds over
               all attempts so far)

The LR schedule is a function of the iteration and the config, so the iteration is its whole state; so is
the training stream's position (data.pipeline.stream_position). With the RNG states of every rank, a
resumed run's next step is the uninterrupted run's next step.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ocr_cluster.models.convert import checkpoint_dict, load_checkpoint
from ocr_cluster.train.clock import SECONDS_KEY, STARTED_KEY
from ocr_cluster.train.layout import MODEL_FILE, STATE_FILE


def rng_state() -> dict:
    """This process's generators, as plain values and tensors (torch.load(weights_only=True) reads them):
    torch's CPU generator, every CUDA device's where CUDA is in use, numpy's global and Python's."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "python": list(mt), "python_gauss": gauss_next}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """The generators as `rng_state` saved them (a checkpoint from before numpy's Gaussian cache and
    Python's were kept restores without them)."""
    torch.set_rng_state(state["torch"])
    keys, pos, *gauss = state["numpy"]
    has_gauss, cached = gauss or (0, 0.0)
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
         meta: dict, scaler: torch.amp.GradScaler | None = None, clock: dict | None = None,
         rng: list[dict] | None = None) -> Path:
    """`clock`: the run's clock state (RunClock.state()), so that a resumed attempt adds to its time.
    `rng`: every rank's `rng_state()`, in rank order (default: this process's only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bare = getattr(model, "module", model)
    torch.save(checkpoint_dict(bare, {**meta, "iteration": iteration}), directory / MODEL_FILE)
    state = {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_ranks": rng or [rng_state()],
        **(clock or {}),
    }
    # Write then rename, so an upload never picks up a half-written state file.
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    return directory


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, keeping what is this run's setting rather than the saved run's state:

    - the kernels (fused, foreach; cluster.optimizer_impl): load_state_dict would take the saved run's, and a
      fused optimizer stepped as unfused under the fp16 scaler skips unscaling its gradients;
    - the memory format (cluster.channels_last): the saved momentum buffers come back contiguous, and torch's
      fused SGD steps a parameter with a buffer of other strides element by element in memory order, a wrong
      update without an error (torch 2.13). Each buffer is given its parameter's strides.
    """
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)
        for param in group["params"]:
            per_param = optimizer.state.get(param, {})
            for key, value in per_param.items():
                if (torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride()):
                    per_param[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler | None = None, rank: int = 0,
         world: int = 1) -> tuple[int, dict, dict | None]:
    """Restore model, optimizer, scaler and this rank's RNG states in place; returns the iteration to continue
    from, the run's clock state as of the checkpoint (for RunClock.start; empty for a checkpoint written
    without one), and the RNG states restored: None when the checkpoint has none for this rank (written by a
    run of another world size, or by an earlier version, which kept rank 0's only)."""
    directory = Path(directory)
    load_checkpoint(getattr(model, "module", model), str(directory / MODEL_FILE), strict=True)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    load_optimizer_state(optimizer, state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or ([state["rng"]] if "rng" in state else [])
    restored = len(ranks) == world or (rank == 0 and len(ranks) == 1 and "rng" in state)
    if restored:
        set_rng_state(ranks[rank])
    clock = {key: state[key] for key in (STARTED_KEY, SECONDS_KEY) if key in state}
    return int(state["iteration"]), clock, ranks[rank] if restored else None
