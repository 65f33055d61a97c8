"""One exception type for bad user input: the CLI prints it as one line and exits non-zero."""


class LTHError(Exception):
    """A user-facing error: the message names the bad value and what is allowed."""
