"""Named steps of long work (an export at 0.8B runs for minutes), reported to whoever
listens: the CLI shows each step as it starts and its duration when it ends, and any
notice (something the user should know, such as a stale directory removed). Library
callers that install no listener hear nothing."""

from __future__ import annotations

import contextlib
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
