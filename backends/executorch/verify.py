"""The parity gate (qwen_mobile.parity) run on a written .pte through the ExecuTorch runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_mobile.bundle import load_source
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.parity import Parity, Spans, compare, references
from qwen_mobile.quant.plan import QuantPlan

from . import runtime


def runtime_logits(method, tokens: torch.Tensor, spans: Spans) -> torch.Tensor:
    return torch.cat([runtime.step(method, tokens[:, start:end], start) for start, end in spans])


def measure(
    pte: Path, model: Qwen35, max_context: int, max_seq_len: int, plan: QuantPlan, tokenizer_dir: Path
) -> Parity:
    """Load the program once and run the gate's passes on that one method, so the second
    pass also proves that input_pos 0 resets the state held in the program."""
    method = runtime.load_forward(pte)
    refs = references(model, max_context, max_seq_len, plan, tokenizer_dir=tokenizer_dir)
    return compare(lambda tokens, spans: runtime_logits(method, tokens, spans), refs)


def require_parity(
    pte: Path, model: Qwen35, max_context: int, max_seq_len: int, plan: QuantPlan, tokenizer_dir: Path
) -> Parity:
    parity = measure(pte, model, max_context, max_seq_len, plan, tokenizer_dir)
    if not parity.passed:
        raise QwenMobileError(f"{pte.name}: the ExecuTorch runtime disagrees with the eager model: {parity.summary()}")
    return parity


def verify_bundle(bundle: Path, manifest: dict) -> dict:
    """`qwen-mobile verify`: the gate again, on the bundle's model.pte against its source checkpoint."""
    loaded, plan = load_source(bundle, manifest)
    parity = measure(bundle / "model.pte", loaded.model, manifest["max_context"], manifest["max_seq_len"], plan, bundle)
    return parity.to_manifest()
