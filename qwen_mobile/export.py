"""`qwen-mobile export`: pick the backend, load the checkpoint, decide the quantization plan,
hand all three to the backend's exporter."""

from __future__ import annotations

from pathlib import Path

from qwen_mobile import progress
from qwen_mobile.checkpoint import load
from qwen_mobile.quant.plan import make_plan, resolve_scheme
from qwen_mobile.registry import get_backend


def default_out(source: str, backend: str, quant: str) -> Path:
    return Path(f"{Path(source).name}-{backend}-{quant}")


def export_bundle(
    model: str | None,
    backend: str,
    quant: str | None,
    out: Path | None,
    group_size: int | None = None,
    embeddings_8bit: bool = False,
    max_context: int | None = None,
) -> Path:
    """Validates the request before any slow work, then runs the backend's exporter,
    which writes the bundle atomically to `out` and returns its path. `max_context`
    None keeps the backend's own default."""
    spec, quant = get_backend(backend, quant)
    scheme = resolve_scheme(quant, group_size, embeddings_8bit)
    with progress.step("loading the checkpoint"):
        loaded = load(model)
    out = out or default_out(loaded.checkpoint.source, backend, quant)
    with progress.step(f"planning {quant} quantization"):
        plan = make_plan(loaded.model, scheme)
    lengths = {} if max_context is None else {"max_context": max_context}
    return spec.load_exporter()(loaded, plan=plan, out=out, **lengths)
