"""Training checkpoints: one directory per report, uploaded by Ray Train to
<storage.checkpoint_uri>/<run_id>/checkpoint_iter=NNNNNNN/ (the names are train/layout.py's).

    model.pt   this project's model checkpoint format (ocr_cluster.models.convert): loadable by
               `ocr-cluster eval --checkpoint`, `models convert` and `model.pretrained`
    state.pt   optimizer state, iteration, the AMP scaler, RNG states, and the run's clock (train/clock.py:
               when its first attempt started, its training seconds over all attempts so far)

The LR schedule is a function of the iteration and the config, so the iteration is its whole state.
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


def _numpy_state() -> list:
    _, keys, pos, _, _ = np.random.get_state()
    return [keys.tolist(), int(pos)]  # plain values: torch.load(weights_only=True) reads them


def save(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
         meta: dict, scaler: torch.amp.GradScaler | None = None, clock: dict | None = None) -> Path:
    """`clock`: the run's clock state (RunClock.state()), so that a resumed attempt adds to its time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bare = getattr(model, "module", model)
    torch.save(checkpoint_dict(bare, {**meta, "iteration": iteration}), directory / MODEL_FILE)
    state = {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(),
                "python": list(random.getstate()[1])},
        **(clock or {}),
    }
    # Write then rename, so an upload never picks up a half-written state file.
    tmp = directory / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    return directory


def load(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True) -> tuple[int, dict]:
    """Restore model, optimizer and scaler in place; returns the iteration to continue from and the run's
    clock state as of the checkpoint (for RunClock.start; empty for a checkpoint written without one)."""
    directory = Path(directory)
    load_checkpoint(getattr(model, "module", model), str(directory / MODEL_FILE), strict=True)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        torch.set_rng_state(state["rng"]["torch"])
        keys, pos = state["rng"]["numpy"]
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), int(pos), 0, 0.0))
        random.setstate((3, tuple(state["rng"]["python"]), None))
    return int(state["iteration"]), {key: state[key] for key in (STARTED_KEY, SECONDS_KEY) if key in state}
