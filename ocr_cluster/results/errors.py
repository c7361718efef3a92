"""One base class for bad input to the results store, so the CLI can map all of it to exit code 2."""


class ResultsError(ValueError):
    """Bad input (a row, a table option, a manifest); the message is one line for the user."""
