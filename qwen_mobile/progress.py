"""Named steps of long work (an export at 0.8B runs for minutes), reported to whoever
listens: the CLI shows each step as it starts and its duration when it ends. Library
callers that install no listener hear nothing."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

# (step, seconds): seconds is None when the step starts, its duration when it ends
Listener = Callable[[str, "float | None"], None]

_listeners: list[Listener] = []


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    for listener in _listeners:
        listener(name, None)
    start = time.perf_counter()
    yield
    for listener in _listeners:
        listener(name, time.perf_counter() - start)


@contextlib.contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
