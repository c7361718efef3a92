"""The pacing of Ray Data's scheduling loop (ocr_cluster/data/pacing.py): a step that moved nothing sleeps out
the pause, a step that moved something does not, a finished execution never waits. No Ray cluster: the
wrapper is driven with a stand-in step and topology; that it is installed on Ray's executor is checked
against the installed Ray (a Ray without the method would silently run unpaced)."""

from types import SimpleNamespace

from ocr_cluster.data import pacing


class Op:
    """An operator as _moved reads it."""

    def __init__(self):
        self.metrics = SimpleNamespace(num_outputs_taken=0, num_tasks_submitted=0)
        self.active = 0

    def num_active_tasks(self):
        return self.active


class State:
    def __init__(self):
        self.queued_in = self.queued_out = 0

    def total_enqueued_input_blocks(self):
        return self.queued_in

    def total_enqueued_output_blocks(self):
        return self.queued_out


def run(step, topology, more=True):
    slept, now = [], [100.0]
    wrapped = pacing.paced(lambda executor, topo: (step(topo), more)[1], pause_s=0.05,
                           clock=lambda: now[0], sleep=slept.append)
    assert wrapped(object(), topology) is more
    return slept


def test_an_idle_step_sleeps_out_the_pause():
    topology = {Op(): State()}
    assert run(lambda topo: None, topology) == [0.05]


def test_a_step_that_moves_anything_does_not_sleep():
    def take(topo):
        next(iter(topo)).metrics.num_outputs_taken += 1

    def submit(topo):
        next(iter(topo)).metrics.num_tasks_submitted += 1

    def finish(topo):
        next(iter(topo)).active -= 1

    def enqueue(topo):
        next(iter(topo.values())).queued_out += 1

    for moves in (take, submit, finish, enqueue):
        assert run(moves, {Op(): State()}) == [], moves.__name__


def test_the_last_step_never_waits():
    assert run(lambda topo: None, {Op(): State()}, more=False) == []


def test_installed_on_rays_streaming_executor():
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    assert pacing.pace_idle_executor() is True
    assert StreamingExecutor._scheduling_loop_step.__wrapped__ is not None
    assert pacing.pace_idle_executor() is True  # once: not wrapped twice
    assert not hasattr(StreamingExecutor._scheduling_loop_step.__wrapped__, "__wrapped__")


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(pacing, "_installed", False)
    monkeypatch.setenv(pacing.SWITCH, "0")
    assert pacing.pace_idle_executor() is False


def test_operators_without_the_counters_run_unpaced():
    assert run(lambda topo: None, {object(): State()}) == []
