"""The seam between the core and its backends, and how the core finds them.

A backend is a folder under `backends/` (installed as `qwen_mobile.backends.<name>`). Its
`__init__.py` declares `BACKEND = BackendSpec(...)` and imports nothing heavy; the spec
names the class implementing `Backend`, imported only when an export, verify, run or
bench needs it. The core drives every flow (qwen_mobile/export.py, qwen_mobile/bundle.py,
qwen_mobile/bench.py): a backend only lowers a model to files and runs them.
backends/README.md walks through writing one.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qwen_mobile.errors import QwenMobileError

if TYPE_CHECKING:  # the CLI imports this module; torch loads only when a command needs it
    import torch

DEFAULT_BACKEND = "executorch"


@dataclass(frozen=True)
class BackendSpec:
    """What a backend declares in its package `__init__.py` (as `BACKEND`)."""

    name: str  # the --backend value
    summary: str  # one line for --help and error messages
    artifact: str  # the artifact's file (or directory) name inside a bundle
    quant_schemes: tuple[str, ...]  # the --quant values it encodes; the first is the default
    implementation: str  # "module:Class" implementing Backend, imported only when used
    # (scheme, why not) for schemes the backend refuses for a reason worth saying
    refused_schemes: tuple[tuple[str, str], ...] = ()

    def require_scheme(self, quant: str) -> None:
        """A --quant this backend does not encode is a one-line error naming what it does (and why
        not, where the backend says)."""
        why = dict(self.refused_schemes).get(quant)
        if why is not None:
            raise QwenMobileError(f"--quant {quant!r} is not supported by the {self.name} backend: {why}")
        if quant not in self.quant_schemes:
            raise QwenMobileError(
                f"--quant {quant!r} is not supported by the {self.name} backend; "
                f"it supports {', '.join(self.quant_schemes)}"
            )

    def load(self) -> "Backend":
        module_name, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module_name), name)(self)


@dataclass(frozen=True)
class Lengths:
    """The sequence lengths an artifact is built for."""

    max_context: int  # the longest sequence (prompt + output): KV cache slots
    max_chunk: int  # the most tokens one call takes (prefill chunk; the manifest's max_seq_len)


@dataclass
class Runner:
    """A loaded artifact, driven the way generate.generate_tokens drives the eager model."""

    step: Callable  # (token ids, start position) -> last position's logits [vocab]
    max_context: int
    max_chunk: int  # the most tokens one step takes


@dataclass
class ExportTarget:
    """Everything a backend's `lower` is given: the core has validated, loaded and planned it."""

    model: torch.nn.Module  # Qwen35, float32, eval mode
    plan: object  # qwen_mobile.quant.plan.QuantPlan: encode it as it is, never re-round
    lengths: Lengths
    special_tokens: dict  # {"bos": id or None, "eos": [ids]} as the manifest records them


class Backend:
    """What a backend implements. The defaults suit a backend that needs nothing special.

    Lifecycle, all driven by the core:
      export: check(plan, lengths) before any slow work -> lower(target, directory) writes the
              artifact -> the core gates it through open(directory, manifest, runtime) for every
              runtime in `runtimes` -> the core writes tokenizer and manifest, publishes atomically.
      verify: the core re-runs the gate through open(...) on the bundle as written.
      run / bench: open(bundle, manifest) with the first runtime.
    """

    # the runtime configurations a bundle is gated on (every one must pass); the first serves run and bench
    runtimes: tuple[str, ...] = ("default",)
    default_lengths = Lengths(max_context=2048, max_chunk=128)
    # the token the backend's runner uses as BOS, or None (the manifest's special_tokens.bos)
    bos_token: str | None = None
    # packages whose versions made the artifact (the manifest's `tools`)
    tools: tuple[str, ...] = ()
    # whether lower() reads the values of the weights a plan quantizes; a backend that encodes them
    # from the plan alone says False, and a single-plan export frees them before lowering (export.write_bundle)
    lowering_reads_planned_weights: bool = True

    def __init__(self, spec: BackendSpec):
        self.spec = spec

    def check(self, plan, lengths: Lengths) -> None:
        """Refuse, with a one-line error naming the weight or length, what this backend cannot
        encode. Runs before loading finishes anything slow."""

    def lower(self, target: ExportTarget, directory: Path) -> dict:
        """Write the artifact (and any extra files) into `directory`; return the manifest fields
        this backend adds (at least `methods`; see schemas/manifest.schema.json)."""
        raise NotImplementedError

    def stored_state(self, tensor, plan) -> list[dict]:
        """How the artifact made for `plan` stores one state tensor (a qwen_mobile.models.qwen3_5.StateTensor):
        [{"name", "shape", "dtype"}], for the manifest's `state`. Default: as the core lays it out."""
        return [{"name": tensor.name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}]

    def open(self, bundle: Path, manifest: dict, runtime: str | None = None) -> Runner:
        """The artifact in `bundle`, loaded into `runtime` (one of `runtimes`; None: the first),
        ready to step from position 0. Raise QwenMobileError if it cannot load."""
        raise NotImplementedError

    def missing_weights(self, bundle: Path, manifest: dict, plan) -> list[str] | None:
        """The planned weights whose integers or scales the artifact in `bundle` does not hold
        exactly as the plan has them (read back or found in its files), or None when this backend
        cannot look. The gate refuses an artifact with any."""
        return None

    def bench_refusal(self) -> str | None:
        """Why `bench` cannot time this backend's bundles on this machine, or None."""
        return None

    def thread_counts(self) -> dict:
        """The runtime's own thread settings, for `bench` to report."""
        return {}


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
