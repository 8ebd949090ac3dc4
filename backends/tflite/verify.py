"""The parity gate (qwen_mobile.parity) run on a written .tflite through the LiteRT interpreter,
once with XNNPACK (the default CPU path) and once on TFLite's own builtin kernels."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_mobile.bundle import load_source
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.parity import Parity, References, Spans, compare, references
from qwen_mobile.quant.plan import QuantPlan

from . import runtime

RUNTIMES = {"xnnpack": True, "builtin_kernels": False}


def run_pass(model: runtime.TFLiteModel, tokens: torch.Tensor, spans: Spans) -> torch.Tensor:
    return torch.stack([torch.from_numpy(model.step(tokens[0, s:e].numpy(), s).copy()) for s, e in spans])


def measure(
    path: Path, feeds: dict[str, str], model: Qwen35, max_context: int, chunk: int, plan: QuantPlan, tokenizer_dir: Path
) -> dict[str, Parity]:
    """The gate per runtime configuration, in RUNTIMES order, stopping at the first that fails
    (the artifact is refused either way). One interpreter serves both passes of a
    configuration, so the second pass also proves that input_pos 0 starts a new sequence."""
    refs = references(model, max_context, chunk, plan, tokenizer_dir=tokenizer_dir)
    results = {}
    for name, xnnpack in RUNTIMES.items():
        results[name] = compare_runtime(path, feeds, max_context, xnnpack, refs)
        if not results[name].passed:
            break
    return results


def compare_runtime(path: Path, feeds: dict[str, str], max_context: int, xnnpack: bool, refs: References) -> Parity:
    """The gate on one runtime configuration. Its interpreter is released on return, before the
    next is built: at the 0.8B shape the XNNPACK one holds 14 GiB (it unpacks every dequantized
    weight to float32, per signature)."""
    artifact = runtime.TFLiteModel(path, feeds, max_context, xnnpack=xnnpack)
    return compare(lambda tokens, spans: run_pass(artifact, tokens, spans), refs)


def to_manifest(results: dict[str, Parity]) -> dict:
    """The XNNPACK figures at the top level (what `verify` prints), every runtime under `runtimes`;
    `passed` only when every runtime was measured and passed."""
    first = next(iter(results.values())).to_manifest()
    return {
        **first,
        "passed": set(results) == set(RUNTIMES) and all(p.passed for p in results.values()),
        "runtimes": {name: p.to_manifest() for name, p in results.items()},
    }


def require_parity(
    path: Path, feeds, model: Qwen35, max_context: int, chunk: int, plan: QuantPlan, tokenizer_dir: Path
) -> dict:
    results = measure(path, feeds, model, max_context, chunk, plan, tokenizer_dir)
    for name, parity in results.items():
        if not parity.passed:
            raise QwenMobileError(
                f"{path.name}: the LiteRT interpreter ({name}) disagrees with the eager model: {parity.summary()}"
            )
    return to_manifest(results)


def verify_bundle(bundle: Path, manifest: dict) -> dict:
    """`qwen-mobile verify`: the gate again on the bundle's model.tflite against its source checkpoint."""
    loaded, plan = load_source(bundle, manifest)
    results = measure(
        Path(bundle) / manifest["artifact"], manifest["state_feeds"], loaded.model, manifest["max_context"],
        manifest["max_seq_len"], plan, Path(bundle),
    )
    return to_manifest(results)
