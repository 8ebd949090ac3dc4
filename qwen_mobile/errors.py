"""The one exception type users see: its message is a single line naming the file, field or flag."""


class QwenMobileError(Exception):
    """Bad input or an unmet requirement; the CLI prints the message and exits with exit_code."""

    exit_code = 2


class LoweringFailed(QwenMobileError):
    """A backend's converter failed on a model that passed every check: not the user's input
    (exit 1), but still one line, with the converter's own words; the traceback is kept as the
    cause for QWEN_MOBILE_TRACEBACK=1."""

    exit_code = 1


def first_line(error: Exception) -> str:
    """A library's exception as one line of an error message (its type when it has no text)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__
