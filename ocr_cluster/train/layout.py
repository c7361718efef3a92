"""A run's layout, derived once from its config: how the global batch splits over the workers, and
where everything of the run lives.

    <storage.checkpoint_uri>/<run_id>/              Ray Train's RunConfig(storage_path, name)
        checkpoint_iter=NNNNNNN/model.pt, state.pt  one per checkpoint (train/checkpoint.py)
        tensorboard/                                rank 0's TensorBoard event files, one per attempt

Plain Python, no ray or torch: the driver, the worker loop, the result row and a sweep planner share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocr_cluster import storage

if TYPE_CHECKING:
    from ocr_cluster.config import Config

MODEL_FILE, STATE_FILE = "model.pt", "state.pt"
TENSORBOARD_DIR = "tensorboard"
_CHECKPOINT_DIR = re.compile(r"checkpoint_iter=(\d+)")


def checkpoint_dir(iteration: int) -> str:
    """The directory name of the checkpoint taken after `iteration` iterations."""
    return f"checkpoint_iter={iteration:07d}"


def checkpoint_iteration(name: str) -> int | None:
    """The iteration of a checkpoint directory name, None for any other name."""
    match = _CHECKPOINT_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def split_batch(cfg: Config) -> tuple[int, int, int]:
    """(world, micro_batch, accum_steps): data.batch_size over `world` workers, each running accum_steps
    forwards of micro_batch samples per optimizer step. cluster.num_workers 0 (Ray's local mode) is one."""
    world = max(cfg.cluster.num_workers, 1)
    per_worker = cfg.data.batch_size // world
    micro = cfg.cluster.micro_batch or per_worker
    return world, micro, per_worker // micro if micro > 0 else 0


@dataclass(frozen=True)
class RunLayout:
    run_id: str
    run_uri: str          # <storage.checkpoint_uri>/<run_id>
    iters: int            # the final checkpoint's iteration
    world: int            # Ray Train workers
    micro_batch: int      # samples per worker per forward
    accum_steps: int      # forwards per optimizer step
    num_gpus: int         # one per worker on GPU, 0 on CPU

    @classmethod
    def from_config(cls, cfg: Config) -> RunLayout:
        world, micro, accum = split_batch(cfg)
        run_id = cfg.run_id
        return cls(run_id=run_id, run_uri=storage.join(cfg.storage.checkpoint_uri, run_id),
                   iters=cfg.schedule.iters, world=world, micro_batch=micro, accum_steps=accum,
                   num_gpus=world if cfg.cluster.use_gpu else 0)

    @property
    def tensorboard_uri(self) -> str:
        return storage.join(self.run_uri, TENSORBOARD_DIR)

    def checkpoint_uri(self, iteration: int) -> str:
        return storage.join(self.run_uri, checkpoint_dir(iteration))

    def model_uri(self, iteration: int) -> str:
        """The model file of the checkpoint at `iteration` (loadable by `ocr-cluster eval --checkpoint`)."""
        return storage.join(self.checkpoint_uri(iteration), MODEL_FILE)

    @property
    def final_model_uri(self) -> str:
        return self.model_uri(self.iters)
