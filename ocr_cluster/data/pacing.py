"""Ray Data's streaming executor, paced when a step moves nothing.

Why: Ray Data 2.60's scheduling loop waits for its running tasks in `ray.wait(timeout=0.1)`, but when
no task runs because every operator is held back (the output waits for a consumer slower than the
data: training's steady state), there is nothing to wait for and the loop goes round again at once, as
fast as the CPU lets it (py-spy: the executor thread holds the GIL in nearly every sample, `ray.wait`
in 2 % of them). In `make quickstart` that loop, inside streaming_split's
SplitCoordinator actor, used as much CPU as one training worker on a 2-core machine
(benchmarks/README.md, "Ray Data's split coordinator").

`pace_idle_executor()` wraps `StreamingExecutor._scheduling_loop_step` in the calling process: a step
after which no operator moved (the same test as Ray's own NoProgressGuard: outputs taken, blocks
queued in or out, plus tasks submitted or running) sleeps until IDLE_PAUSE_S has passed since it
began. A step that moved something is followed by the next at once, as before, so a busy pipeline is
not slowed; an idle one wakes within IDLE_PAUSE_S of its consumer taking a block.

It must run in the process that runs the executor: the SplitCoordinator for a streaming_split, the
consumer's for a plain iteration. The datasource's `get_read_tasks` runs there (the executor asks for
the read tasks when it starts), so pipeline.py calls it from there. It changes nothing when Ray's
executor lacks what it wraps (another Ray version): the loop then runs as Ray ships it, as it does with
OCR_CLUSTER_DATA_PACING=0 in the workers' environment (benchmarks/bench_split.py compares the two).
"""

from __future__ import annotations

import functools
import os
import time

IDLE_PAUSE_S = 0.05  # half of Ray's own wait for running tasks (0.1 s)
SWITCH = "OCR_CLUSTER_DATA_PACING"

_installed = False


def _signature(topology) -> tuple | None:
    """What changes when an operator makes progress (NoProgressGuard's test, plus task starts); None when an
    operator lacks these counters (another Ray version): the step then runs unpaced."""
    try:
        return tuple((op.metrics.num_outputs_taken, op.metrics.num_tasks_submitted, op.num_active_tasks(),
                      state.total_enqueued_input_blocks(), state.total_enqueued_output_blocks())
                     for op, state in topology.items())
    except Exception:  # noqa: BLE001 - never let the pacing break the executor's thread
        return None


def paced(step, pause_s: float = IDLE_PAUSE_S, clock=time.monotonic, sleep=time.sleep):
    """`step(executor, topology) -> bool` (go on?), made to sleep out `pause_s` after a step that moved nothing."""

    @functools.wraps(step)
    def paced_step(self, topology):
        began = clock()
        before = _signature(topology)
        more = step(self, topology)
        if more and before is not None and _signature(topology) == before:
            sleep(max(0.0, pause_s - (clock() - began)))
        return more

    return paced_step


def pace_idle_executor(pause_s: float = IDLE_PAUSE_S) -> bool:
    """Install the pacing in this process (once); True when it is installed."""
    global _installed
    if _installed:
        return True
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return False
    step = getattr(StreamingExecutor, "_scheduling_loop_step", None)
    if step is None:
        return False
    StreamingExecutor._scheduling_loop_step = paced(step, pause_s)
    _installed = True
    return True
