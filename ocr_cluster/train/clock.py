"""A run's training time over all its attempts (Ray Train restarts, resubmissions).

Each checkpoint's state.pt carries the run's clock as of that checkpoint: when the first attempt started
training and the training seconds of all attempts so far. An attempt that resumes from the checkpoint
adds its own seconds to those. What a crashed attempt spent after its last checkpoint is in no checkpoint
and is not counted: the total is the time the checkpoints kept, plus the last attempt's. Time between
attempts (queueing, restarts, model set-up) is not training time either.

Plain Python: the worker loop keeps one, checkpoint.py stores its state, result rows read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Keys in state.pt. A checkpoint written before the clock existed has neither: the run counts from its resume.
STARTED_KEY, SECONDS_KEY = "run_started_at", "run_train_s"


@dataclass(frozen=True)
class RunClock:
    started_at: float     # epoch seconds: when the run's first attempt started training
    earlier_s: float      # training seconds of earlier attempts, as of the checkpoint this attempt resumed from
    attempt_start: float  # epoch seconds: when this attempt started training

    @classmethod
    def start(cls, resumed: dict | None = None, now: float | None = None) -> RunClock:
        """This attempt's clock, from the resumed checkpoint's state (None on a fresh start)."""
        now = time.time() if now is None else now
        resumed = resumed or {}
        return cls(float(resumed.get(STARTED_KEY, now)), float(resumed.get(SECONDS_KEY, 0.0)), now)

    def attempt_s(self, now: float | None = None) -> float:
        """This attempt's training seconds so far."""
        return (time.time() if now is None else now) - self.attempt_start

    def total_s(self, now: float | None = None) -> float:
        """The run's training seconds so far: the earlier attempts' (as checkpointed) plus this one's."""
        return self.earlier_s + self.attempt_s(now)

    def state(self, now: float | None = None) -> dict:
        """What a checkpoint taken now records (plain floats: torch.load(weights_only=True) reads them)."""
        return {STARTED_KEY: self.started_at, SECONDS_KEY: self.total_s(now)}


def gpu_hours(seconds: float | None, num_gpus: int | None) -> float | None:
    """GPU-hours of `seconds` on `num_gpus` GPUs; None for a CPU run (no GPU) or an unknown time."""
    if seconds is None or not num_gpus:
        return None
    return seconds * num_gpus / 3600.0
