"""The live log line and TensorBoard scalars of a training run (rank 0 prints and writes).

    [r3f9c2a1b7d0] iter 120/1000 | loss 0.812 (decode 0.611, aux 0.502) | lr 9.01e-03 | 14.2 img/s | data 12% | eta 3m05s

On object storage the events are staged in a temp dir of this attempt's own and uploaded to the run's
tensorboard/ at every checkpoint (upload()) and at the end, also when the run fails (close(), through
`with progress:`). Each attempt writes its own events file (tensorboardX names it by time and host, and the
pid is added), so no attempt overwrites another's; TensorBoard reads them all as one run.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time

import torch

from ocr_cluster import storage
from ocr_cluster.train.layout import RunLayout


def say(message: str) -> None:
    """One log line from a worker. Not print(): Ray Train patches print in workers to log through the root
    logger and tee to stdout, which shows every line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, cfg, layout: RunLayout, start_iter: int, rank: int, images_per_iter: int):
        self.cfg, self.layout, self.run_id, self.rank = cfg, layout, layout.run_id, rank
        self.total = cfg.schedule.iters
        self.images_per_iter = images_per_iter
        self.window_start, self.window_iters, self.window_wait = time.perf_counter(), 0, 0.0
        self.start_iter = start_iter
        self.sums: dict[str, torch.Tensor] = {}  # on the device: read back only when reported (synced())
        self.count = 0
        self.window_from = start_iter  # the sums cover the iterations after this one
        self.host: dict[str, float] | None = None  # the sums as floats, once read back
        self.last_scores: dict | None = None
        self.staging: str | None = None  # the attempt's own local dir for events bound for object storage
        self.writer = self._tensorboard() if rank == 0 else None

    def _tensorboard(self):
        from tensorboardX import SummaryWriter

        uri = self.layout.tensorboard_uri
        if storage.is_remote(uri):
            self.staging = tempfile.mkdtemp(prefix=f"ocr_tb_{self.run_id}_")  # under TMPDIR
        return SummaryWriter(self.staging or storage.local_path(uri), filename_suffix=f".{os.getpid()}")

    def data_wait(self, seconds: float) -> None:
        self.window_wait += seconds

    def add_loss(self, total: torch.Tensor, parts: dict[str, torch.Tensor], accum: int) -> None:
        """Adds a micro-step's losses on their device, without reading them back: a float() here would make
        the CPU wait for the GPU at every step."""
        for name, loss in {"loss": total, **parts}.items():
            self.sums[name] = self.sums.get(name, 0) + loss.detach().float() / accum
        self.count += 1 / accum
        self.host = None

    def losses(self) -> dict[str, float]:
        """The mean losses since the last log line, read back from the device in one go (a host sync)."""
        if self.host is None:
            names = list(self.sums)
            values = torch.stack([self.sums[n] for n in names]).tolist() if names else []
            self.host = dict(zip(names, values))
        return {f"loss_{k}" if k != "loss" else k: v / max(self.count, 1e-9) for k, v in self.host.items()}

    def synced(self, done: int) -> dict[str, float]:
        """losses(), checked: the loss is read back only where it is reported (log lines, evaluations,
        checkpoints, the end), so a NaN or inf is caught there, within log_interval iterations of it."""
        losses = self.losses()
        if "loss" in losses and not math.isfinite(losses["loss"]):
            raise FloatingPointError(f"the loss became {losses['loss']} between iterations "
                                     f"{self.window_from + 1} and {done}")
        return losses

    def step(self, done: int, lr: float) -> None:
        self.window_iters += 1
        if done % self.cfg.schedule.log_interval and done != self.total:
            return
        losses = self.synced(done)  # the wait for the GPU: before the clock is read
        elapsed = time.perf_counter() - self.window_start
        if self.rank == 0:
            heads = ", ".join(f"{k[5:]} {v:.3f}" for k, v in losses.items() if k != "loss")
            ips = self.window_iters * self.images_per_iter / max(elapsed, 1e-9)
            eta = (self.total - done) * elapsed / max(self.window_iters, 1)
            say(f"[{self.run_id}] iter {done}/{self.total} | loss {losses['loss']:.3f} ({heads}) | lr {lr:.2e} | "
                f"{ips:.1f} img/s | data {100 * self.window_wait / max(elapsed, 1e-9):.0f}% | "
                f"eta {_duration(eta)}")
            for key, value in losses.items():
                self.writer.add_scalar(f"train/{key}", value, done)
            self.writer.add_scalar("train/lr", lr, done)
            self.writer.add_scalar("train/img_per_s", ips, done)
        self.window_start, self.window_iters, self.window_wait = time.perf_counter(), 0, 0.0
        self.sums, self.count, self.host, self.window_from = {}, 0, None, done

    def evaluated(self, done: int, scores: dict) -> None:
        self.last_scores = scores
        if self.rank == 0:
            say(f"[{self.run_id}] eval at iter {done}: mIoU {scores['mIoU']:.2f} | mAcc {scores['mAcc']:.2f} | "
                f"aAcc {scores['aAcc']:.2f}")
            for key in ("mIoU", "mAcc", "aAcc"):
                self.writer.add_scalar(f"val/{key}", scores[key], done)

    def upload(self) -> None:
        """Rank 0: events to disk and, on object storage, the staged file to the run's tensorboard/ (replacing
        its own earlier upload). A failed upload is a warning: the events are not worth the run."""
        if self.writer is None:
            return
        self.writer.flush()
        if self.staging is None:
            return
        try:
            fs, path = storage.filesystem(self.layout.tensorboard_uri)
            fs.put(self.staging + "/", path + "/", recursive=True)
        except Exception as exc:  # noqa: BLE001 - endpoint, credentials: one warning line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            say(f"[{self.run_id}] warning: TensorBoard events not uploaded to {self.layout.tensorboard_uri}: "
                f"{type(exc).__name__}: {first}")

    def close(self) -> None:
        """Rank 0: the last upload, then the staging dir removed."""
        if self.writer is None:
            return
        try:
            self.upload()
            self.writer.close()
        finally:
            self.writer = None
            if self.staging:
                shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
