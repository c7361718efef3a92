"""Bad input found by a worker ends the run at once, as one line, exit 2.

Preflight finds what it can without a worker; some bad input only shows when a worker reads it: a label
out of range inside a shard whose size and checksum match its manifest, say. Retrying cannot fix that,
yet Ray Train V2 restarts the worker group on every worker error (FailureConfig has no per-error
switch). So:

- the train function runs in `bad_input_ends_the_run`, which turns a DataError or CheckpointError in its
  exception chain (Ray Data and Ray Core wrap them) into `WorkerInputError` with the bare one-line message;
- `StopOnInputError`, a Ray Train callback run by the controller, raises `InputRejected` when it sees
  that error among the workers' failures; a callback error is a controller error, which Ray Train does not
  retry: the worker group is shut down and `fit()` raises it;
- the driver finds the line with `input_error_line` and reports it (failed row, exit 2).
"""

from __future__ import annotations

import contextlib
import logging
import re

from ocr_cluster.errors import UserInputError

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_MARKER = re.compile(r"WorkerInputError: (.+)$")


class WorkerInputError(UserInputError):
    """Raised by the train function: bad input that a retry would meet again. One line."""


class InputRejected(UserInputError):
    """Raised by `StopOnInputError` on the controller, to end the run without a retry. One line."""


def clean_line(text: str) -> str:
    """The first non-empty line of `text` without ANSI escapes (Ray colours some of its messages)."""
    lines = [line.strip() for line in ANSI.sub("", str(text)).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps: __cause__, __context__, RayTaskError.cause, ControllerError.controller_failure,
    WorkerGroupError.worker_failures, and the exception inside Ray Train's traceback wrapper."""
    found, todo, seen = [], [exc], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        found.append(current)
        todo += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                 getattr(current, "_base_exc", None), current.__cause__, current.__context__,
                 *(getattr(current, "worker_failures", None) or {}).values()]
    return found


def _is_ray_wrapper(exc: BaseException) -> bool:
    """Ray's RayTaskError(DataError) is a DataError too, but its text is a remote traceback."""
    return type(exc).__module__.startswith("ray.")


def bad_input_line(exc: BaseException) -> str | None:
    """The message of the first DataError or CheckpointError in `exc`'s chain, one clean line; None when
    there is none. (Ray Data appends its retry advice to the message on later lines; ours are one line.)
    Other errors, a store or endpoint that may come back, stay Ray Train's to retry."""
    from ocr_cluster.data.errors import DataError, DataUnreachable
    from ocr_cluster.models.convert import CheckpointError

    final, passing = (DataError, CheckpointError), (DataUnreachable,)
    causes = _causes(exc)
    for cause in causes:
        if isinstance(cause, passing):
            return None
        if isinstance(cause, final) and not _is_ray_wrapper(cause):
            return clean_line(str(cause)) or None
    # Pickling drops __cause__: what Ray Data's tasks raised reaches the worker only as traceback text.
    for cause in causes:
        for kind, message in _RAISED.findall(ANSI.sub("", str(cause))):
            found = _our_class(kind)
            if found is not None and issubclass(found, passing):
                return None
            if found is not None and issubclass(found, final):
                return message.strip()
    return None


_RAISED = re.compile(r"^\s*(ocr_cluster(?:\.\w+)+): (.+)$", re.M)  # a traceback's 'module.Class: message'


def _our_class(dotted: str) -> type | None:
    """The exception class `dotted` (ocr_cluster.module.Class) names, if it is one."""
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


@contextlib.contextmanager
def bad_input_ends_the_run():
    """Around the train function: a DataError or CheckpointError, however Ray wrapped it, leaves as
    WorkerInputError, on which `StopOnInputError` ends the run. Anything else is Ray Train's to retry."""
    try:
        yield
    except Exception as exc:
        line = bad_input_line(exc)
        if line is None:
            raise
        quiet_the_stop(WORKER_LOGGER)
        raise WorkerInputError(line) from None


def input_error_line(exc: BaseException) -> str | None:
    """The line of a WorkerInputError / InputRejected inside what Ray Train raised or reported; None if none."""
    for cause in _causes(exc):
        if isinstance(cause, (WorkerInputError, InputRejected)) and not _is_ray_wrapper(cause):
            return clean_line(str(cause))
        marked = _MARKER.search(ANSI.sub("", str(cause)).strip())  # the worker's traceback, as text
        if marked:
            return clean_line(marked.group(1))
    return None


def _callback_base():
    import ray.train

    return ray.train.UserCallback


class StopOnInputError(_callback_base()):
    """Ends the run at the first worker error that is bad input: raising here makes it a controller error,
    which Ray Train's failure policy does not retry."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank in sorted(worker_exceptions):
            line = input_error_line(worker_exceptions[rank])
            if line is not None:
                quiet_the_stop(CONTROLLER_LOGGER)  # its traceback of our own raise: no news to the user
                raise InputRejected(line)


# Who logs the stop with a traceback: Ray Train's worker (the train function's error) and its controller.
WORKER_LOGGER = "ray.train.v2._internal.util"
CONTROLLER_LOGGER = "ray.train.v2._internal.execution.controller.controller"


class _QuietStop(logging.Filter):
    """Records about our deliberate stop become DEBUG: Ray's log files keep them, the console does not."""

    def filter(self, record: logging.LogRecord) -> bool:
        stopped = record.exc_info and isinstance(record.exc_info[1], (WorkerInputError, InputRejected))
        if stopped or "WorkerInputError: " in record.getMessage() or "InputRejected" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def quiet_the_stop(logger_name: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _QuietStop) for f in logger.filters):
        logger.addFilter(_QuietStop())
