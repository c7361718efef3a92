"""The errors the CLI turns into one line and an exit code (see ocr_cluster/cli.py).

Every package's bad-input error derives from `UserInputError`, so the CLI needs no list of them:

    UserInputError (ValueError)      exit 2: config, arguments, URLs, datasets, result queries, checkpoints
    ReportedFailure (RuntimeError)   exit 1: failed for good; the message already names the cause
    NotAvailable                     exit 3: the capability has not landed in this version

This module imports nothing, so any module (and the CLI's parser) can import it for free.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input; the message is one line meant for the user, naming the problem and the valid choices."""


class ReportedFailure(RuntimeError):
    """A failure whose message is one line already naming its cause (no type name or traceback hint)."""


class NotAvailable(Exception):
    """The capability has not landed in this version."""

