"""Named steps of long work (an export at 0.8B runs for minutes), reported to whoever
listens: the CLI shows each step as it starts and its duration when it ends, and any
notice (something the user should know, such as a stale directory removed). Library
callers that install no listener hear nothing.

With QWEN_MOBILE_MEMORY=1 in the environment each step's end also writes the process's
resident memory and its peak so far to stderr (Linux), whoever listens: a cheap way to
tell which step of an export holds its peak memory."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

# (step, seconds): seconds is None when the step starts, its duration when it ends
Listener = Callable[[str, "float | None"], None]
NoticeListener = Callable[[str], None]

_listeners: list[Listener] = []
_notice_listeners: list[NoticeListener] = []


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    for listener in _listeners:
        listener(name, None)
    start = time.perf_counter()
    yield
    for listener in _listeners:
        listener(name, time.perf_counter() - start)
    if os.environ.get(MEMORY_VARIABLE, "") not in ("", "0"):
        log_memory(name)


MEMORY_VARIABLE = "QWEN_MOBILE_MEMORY"


def memory_use() -> tuple[int, int] | None:
    """(resident bytes now, peak resident bytes) of this process, or None where /proc does not say."""
    try:
        with open("/proc/self/status") as file:
            status = file.read()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))
    except (KeyError, ValueError, IndexError):
        return None


def log_memory(name: str) -> None:
    use = memory_use()
    if use is not None:
        sys.stderr.write(f"[memory] {name}: rss {use[0] / 2**30:.2f} GiB, peak {use[1] / 2**30:.2f} GiB\n")
        sys.stderr.flush()


def notice(message: str) -> None:
    for listener in _notice_listeners:
        listener(message)


@contextlib.contextmanager
def reporting(listener: Listener, notices: NoticeListener | None = None) -> Iterator[None]:
    _listeners.append(listener)
    if notices is not None:
        _notice_listeners.append(notices)
    try:
        yield
    finally:
        _listeners.remove(listener)
        if notices is not None:
            _notice_listeners.remove(notices)
