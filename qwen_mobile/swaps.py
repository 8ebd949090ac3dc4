"""Named module swaps: the one way a backend changes the core model for its lowering.

A backend lists its swaps in one place (its `swaps.py`), each with the reason, as
ExecuTorch's source transforms and optimum's patching specs do. `swapped` applies them
while the backend traces and restores the core's modules afterwards, so the eager model
(the parity gate's reference) is never changed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn


@dataclass(frozen=True)
class ModuleSwap:
    target: type[nn.Module]  # every module of exactly this type is replaced
    replacement: Callable[[nn.Module], nn.Module]  # built from the module it replaces (sharing its weights)
    why: str


@contextlib.contextmanager
def swapped(model: nn.Module, swaps: tuple[ModuleSwap, ...]) -> Iterator[nn.Module]:
    by_type = {swap.target: swap for swap in swaps}
    replaced = []  # (parent, attribute, original)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swap = by_type.get(type(child))
            if swap is not None:
                setattr(parent, name, swap.replacement(child))
                replaced.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, original in replaced:
            setattr(parent, name, original)
