"""The base of the results store's bad-input errors (a UserInputError: exit 2 in the CLI)."""

from ocr_cluster.errors import UserInputError


class ResultsError(UserInputError):
    """Bad input (a row, a table option, a manifest); the message is one line for the user."""
