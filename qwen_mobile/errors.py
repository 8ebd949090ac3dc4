"""The one exception type users see: its message is a single line naming the file, field or flag."""


class QwenMobileError(Exception):
    """Bad input or an unmet requirement; the CLI prints the message and exits non-zero."""


def first_line(error: Exception) -> str:
    """A library's exception as one line of an error message (its type when it has no text)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__
