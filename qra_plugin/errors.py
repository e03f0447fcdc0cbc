"""One exception type for every user-facing mistake, so CLIs print one line and exit non-zero."""


class QRAError(ValueError):
    """Bad input: a plan, config or path the user can fix. The message is one line."""
