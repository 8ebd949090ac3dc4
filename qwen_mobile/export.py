"""`qwen-mobile export`: pick the backend, load the checkpoint, hand both to the backend's exporter."""

from __future__ import annotations

from pathlib import Path

from qwen_mobile.checkpoint import load
from qwen_mobile.registry import get_backend


def default_out(source: str, backend: str, quant: str) -> Path:
    return Path(f"{Path(source).name}-{backend}-{quant}")


def export_bundle(model: str | None, backend: str, quant: str | None, out: Path | None) -> Path:
    """Validates the request before any slow work, then runs the backend's exporter,
    which writes the bundle atomically to `out` and returns its path."""
    spec, quant = get_backend(backend, quant)
    loaded = load(model)
    out = out or default_out(loaded.checkpoint.source, backend, quant)
    return spec.load_exporter()(loaded, quant=quant, out=out)
