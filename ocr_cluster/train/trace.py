"""A record of what each training step read and computed, for the tests of exact resume.

With OCR_CLUSTER_STEP_TRACE=<local dir> in the workers' environment, every rank appends one JSON line per
iteration to <dir>/rank<r>.jsonl: the iteration, the keys and a SHA-256 of the images of its micro-batches,
its loss and lr, the process id (which attempt wrote it), and when the step ended: `t` (epoch seconds) and
`cpu` (this process's CPU seconds so far, all its threads), which benchmarks/bench_overhead.py reads for the
step time of the same loop with and without Ray. Unset (the default), nothing is computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

TRACE_ENV = "OCR_CLUSTER_STEP_TRACE"


def wanted() -> bool:
    """Whether steps are traced (the batches must then carry their sample keys)."""
    return bool(os.environ.get(TRACE_ENV))


class StepTrace:
    def __init__(self, rank: int):
        directory = os.environ.get(TRACE_ENV)
        self.path = Path(directory, f"rank{rank}.jsonl") if directory else None
        self.keys: list[str] = []
        self.digest = hashlib.sha256()
        self.loss = 0.0

    def batch(self, batch: dict, loss: torch.Tensor, accum: int) -> None:
        if self.path is None:
            return
        self.keys += batch["key"]
        self.digest.update(batch["image"].detach().cpu().numpy().tobytes())
        self.loss += loss.item() / accum

    def step(self, done: int, lr: float) -> None:
        if self.path is None:
            return
        line = {"iter": done, "keys": self.keys, "images_sha256": self.digest.hexdigest(), "loss": self.loss,
                "lr": lr, "pid": os.getpid(), "t": time.time(), "cpu": time.process_time()}
        with self.path.open("a") as out:
            out.write(json.dumps(line) + "\n")
        self.keys, self.digest, self.loss = [], hashlib.sha256(), 0.0
