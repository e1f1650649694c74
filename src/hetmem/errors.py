"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero."""


class HetmemError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2
