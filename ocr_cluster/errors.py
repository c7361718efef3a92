"""The errors the CLI turns into one line and an exit code (see ocr_cluster/cli.py).

Every package's bad-input error derives from `UserInputError`, so the CLI needs no list of them:

    UserInputError (ValueError)      exit 2: config, arguments, URLs, datasets, result queries, checkpoints
    ReportedFailure (RuntimeError)   exit 1: failed for good; the message already names the cause
    NotAvailable                     exit 3: the capability has not landed in this version

It imports nothing heavy and nothing of this project, so any module (and the CLI's parser) can import it.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserInputError(ValueError):
    """Bad input; the message is one line meant for the user, naming the problem and the valid choices."""


class ReportedFailure(RuntimeError):
    """A failure whose message is one line already naming its cause (no type name or traceback hint)."""


class NotAvailable(Exception):
    """The capability has not landed in this version."""


def unknown_choice(what: str, value: object, choices: Iterable[str]) -> UserInputError:
    """The one wording for a value outside a fixed set, e.g. an action a commands module does not have."""
    return UserInputError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
