"""Start-up phase marks: when the driver and each worker reached each step of a run's start-up.

benchmarks/bench_overhead.py breaks the time from `ray job submit` to the first logged step down with them.
With OCR_CLUSTER_STARTUP_TRACE=<local dir> in the job's environment (its runtime env reaches the driver
and every worker), each process appends one JSON line per mark to <dir>/startup.jsonl: the phase, the wall
clock (epoch seconds, comparable across the processes of one machine), the process's CPU seconds so far
(on a loaded machine the wall clock says little), the pid, and for the first mark of a process when that
process started. Unset (the default), a mark costs one environment lookup.

Plain Python (no torch, no ray): the driver marks before it imports either.
"""

from __future__ import annotations

import json
import os
import time

STARTUP_ENV = "OCR_CLUSTER_STARTUP_TRACE"
_marked = False  # this process wrote a mark already


def process_started_at() -> float | None:
    """When this process started, in epoch seconds (Linux /proc), else None."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as machine:
            boot = next(int(line.split()[1]) for line in machine if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def mark(phase: str, **extra) -> None:
    """Record that this process reached `phase` now (extra: small JSON values, e.g. rank=0)."""
    global _marked
    directory = os.environ.get(STARTUP_ENV)
    if not directory:
        return
    line = {"phase": phase, "t": time.time(), "cpu": time.process_time(), "pid": os.getpid(), **extra}
    if not _marked:
        _marked = True
        line["process_start"] = process_started_at()
    with open(os.path.join(directory, "startup.jsonl"), "a") as out:
        out.write(json.dumps(line) + "\n")
