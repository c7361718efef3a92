"""The one error type of ocr_cluster.data."""

from __future__ import annotations

from ocr_cluster.errors import UserInputError


class DataError(UserInputError):
    """Bad data or bad data arguments; the message is one line meant for the user.

    Errors about one sample name its shard and key, errors about one shard name the shard.
    """


class DataUnreachable(DataError):
    """The data could not be reached (endpoint, credentials, network): bad input before a run starts,
    but maybe passing trouble once workers read, so a worker's is retried like any other failure."""
