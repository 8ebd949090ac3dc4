"""The parity gate (qwen_mobile.parity) run on a written model.mlpackage through the emulator
(or Core ML on macOS), on the files as written."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_mobile.bundle import load_source
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.parity import REDUCED_PRECISION_GATE, Parity, Spans, compare, references
from qwen_mobile.quant.plan import QuantPlan

from . import runtime


def gate_for(plan: QuantPlan):
    """fp16 compute: top-1 against the float model (mean KL reported); otherwise the core's
    default (fp32: 1e-3 x std; quantized: against the same plan applied in eager)."""
    if plan.scheme.compute_dtype == "float16" and not plan.weights:
        return REDUCED_PRECISION_GATE
    return None


def session_logits(session, tokens: torch.Tensor, spans: Spans, chunk: int) -> torch.Tensor:
    ids = tokens[0].tolist()
    return torch.stack([runtime.step(session, ids[start:end], start, chunk) for start, end in spans])


def measure(
    package: Path, model: Qwen35, max_context: int, chunk: int, plan: QuantPlan, tokenizer_dir: Path
) -> Parity:
    """One session for both of the gate's passes, so the second also proves that a call at
    input_pos 0 starts a new sequence on states that already hold one."""
    session = runtime.open_session(package)
    refs = references(model, max_context, chunk, plan, gate_for(plan), tokenizer_dir)
    return compare(lambda tokens, spans: session_logits(session, tokens, spans, chunk), refs)


def require_parity(
    package: Path, model: Qwen35, max_context: int, chunk: int, plan: QuantPlan, tokenizer_dir: Path
) -> Parity:
    parity = measure(package, model, max_context, chunk, plan, tokenizer_dir)
    if not parity.passed:
        raise QwenMobileError(f"{package.name}: the Core ML program disagrees with the eager model: {parity.summary()}")
    return parity


def verify_bundle(bundle: Path, manifest: dict) -> dict:
    """`qwen-mobile verify`: the gate again on the bundle's model.mlpackage against its source checkpoint."""
    loaded, plan = load_source(bundle, manifest)
    package = Path(bundle) / manifest["artifact"]
    return measure(package, loaded.model, manifest["max_context"], manifest["max_seq_len"], plan, Path(bundle)).to_manifest()
