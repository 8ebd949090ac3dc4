"""Finds the backends installed under `qwen_mobile.backends` without importing their runtimes."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from qwen_mobile.errors import QwenMobileError

DEFAULT_BACKEND = "executorch"


@dataclass(frozen=True)
class BackendSpec:
    """What a backend declares in its package `__init__.py` (as `BACKEND`)."""

    name: str  # the --backend value
    summary: str  # one line for --help and error messages
    artifact: str  # the artifact's file name inside a bundle
    quant_schemes: tuple[str, ...]  # the --quant values it encodes; the first is the default
    # "module:function" entry points, imported only when used:
    exporter: str  # (loaded: LoadedModel, plan: QuantPlan, out, max_context=...) -> bundle Path; encodes the plan as it is
    verifier: str  # (bundle Path, manifest dict) -> parity dict with "passed", on the artifact as written
    runner: str  # (bundle Path, manifest dict) -> Runner, through the backend's runtime on this CPU

    def require_scheme(self, quant: str) -> None:
        """A --quant this backend does not encode is a one-line error naming what it does."""
        if quant not in self.quant_schemes:
            raise QwenMobileError(
                f"--quant {quant!r} is not supported by the {self.name} backend; "
                f"it supports {', '.join(self.quant_schemes)}"
            )

    def load_exporter(self) -> Callable:
        return _entry_point(self.exporter)

    def load_verifier(self) -> Callable:
        return _entry_point(self.verifier)

    def load_runner(self) -> Callable:
        return _entry_point(self.runner)


@dataclass
class Runner:
    """A loaded artifact, driven the way generate.generate_tokens drives the eager model."""

    step: Callable  # (token ids, start position) -> last position's logits [vocab]
    max_context: int
    max_chunk: int  # the most tokens one step takes


def _entry_point(spec: str) -> Callable:
    module_name, _, function = spec.partition(":")
    return getattr(importlib.import_module(module_name), function)


def discover() -> dict[str, BackendSpec]:
    import qwen_mobile.backends as package

    specs = {}
    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            spec = getattr(importlib.import_module(f"{package.__name__}.{module.name}"), "BACKEND", None)
            if isinstance(spec, BackendSpec):
                specs[spec.name] = spec
    return dict(sorted(specs.items()))


def describe_available(specs: dict[str, BackendSpec]) -> str:
    if not specs:
        return "no backend is installed yet"
    return "available: " + ", ".join(specs)


def get_backend(name: str, quant: str | None) -> tuple[BackendSpec, str]:
    """The backend named by --backend and the quant scheme to use, or a one-line error."""
    specs = discover()
    if name not in specs:
        raise QwenMobileError(f"--backend {name!r} is unknown; {describe_available(specs)}")
    spec = specs[name]
    quant = quant or spec.quant_schemes[0]
    spec.require_scheme(quant)
    return spec, quant
