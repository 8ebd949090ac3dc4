"""The one exception type users see: its message is a single line naming the file, field or flag."""


class QwenMobileError(Exception):
    """Bad input or an unmet requirement; the CLI prints the message and exits non-zero."""
