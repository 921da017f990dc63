"""The one exception type users see: a message that says what is wrong and what to do."""


class LowbitError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits with 2."""
