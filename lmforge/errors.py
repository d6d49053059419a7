"""The one exception type lmforge raises for bad input at its boundaries."""


class LmforgeError(Exception):
    """A user-facing error: bad file, config, request or data. The message says what and where."""
