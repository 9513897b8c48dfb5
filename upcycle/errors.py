"""The one exception type the CLI turns into a one-line message."""


class UpcycleError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
