"""The parity gate: the written `.pte`, run by the ExecuTorch runtime, against eager Qwen35 in fp32.

Both are fed one token sequence the same way an app would: a few prefill chunks of
uneven length (a ragged tail of the native kernel's chunking included), then
token-by-token decode. Every call returns the logits of its last position, and every
one of those is compared. The whole sequence is then fed a second time, from
input_pos 0, on the same loaded method: it must reproduce the first pass, which is
what a new conversation in an app does to the program's state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwen_mobile.checkpoint import load
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35, init_state

from . import runtime

# max |runtime - eager| over every compared logit, as a fraction of the reference logits' std
TOLERANCE = 1e-3
# uneven on purpose: 40 crosses the native kernel's 32-token chunk into a ragged tail, 7 never fills one
PREFILL_CHUNKS = (40, 17, 7)
DECODE_STEPS = 24
SEED = 0


@dataclass
class Parity:
    max_abs_diff: float
    reference_std: float
    ratio_to_std: float
    tolerance: float
    top1_agreement: float
    positions_checked: int  # logits compared per pass: one per call
    tokens_fed: int
    prefill_chunks: list[int]
    decode_steps: int
    reset_max_abs_diff: float  # second pass from input_pos 0 vs the first, on the same method

    @property
    def passed(self) -> bool:
        # written so that a NaN anywhere fails
        return bool(self.ratio_to_std <= self.tolerance) and bool(self.reset_max_abs_diff <= self.max_abs_diff_allowed)

    @property
    def max_abs_diff_allowed(self) -> float:
        return self.tolerance * self.reference_std

    def summary(self) -> str:
        return (
            f"max|diff| {self.max_abs_diff:.3g} = {self.ratio_to_std:.3g} x std (allowed {self.tolerance:g}), "
            f"after reset {self.reset_max_abs_diff:.3g}, top-1 agreement {self.top1_agreement:.3f} "
            f"over {self.positions_checked} positions"
        )

    def to_manifest(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def feeding_plan(max_context: int, max_seq_len: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, end) token spans, one per call: (prefill chunks no longer than max_seq_len, decode steps),
    cut to what max_context holds."""
    prefill = []
    position = 0
    for size in PREFILL_CHUNKS:
        while size > 0:
            length = min(size, max_seq_len)
            prefill.append((position, position + length))
            position, size = position + length, size - length
    decode = [(p, p + 1) for p in range(position, position + DECODE_STEPS)]
    return [s for s in prefill if s[1] <= max_context], [s for s in decode if s[1] <= max_context]


def sample_tokens(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(SEED))


@torch.no_grad()
def reference_logits(model: Qwen35, tokens: torch.Tensor, plan, max_context: int) -> torch.Tensor:
    """Eager fp32 logits [calls, vocab], fed exactly as the runtime is."""
    state = init_state(model.config, max_context)
    outputs = []
    for start, end in plan:
        logits, state = model(tokens[:, start:end], torch.tensor([start]), state)
        outputs.append(logits)
    return torch.cat(outputs)


def runtime_logits(method, tokens: torch.Tensor, plan) -> torch.Tensor:
    return torch.cat([runtime.step(method, tokens[:, start:end], start) for start, end in plan])


def check_parity(pte: Path, model: Qwen35, max_context: int, max_seq_len: int) -> Parity:
    """Run the gate and measure; raises QwenMobileError only if the program cannot load or run."""
    prefill, decode = feeding_plan(max_context, max_seq_len)
    plan = prefill + decode
    tokens = sample_tokens(model.config.vocab_size, plan[-1][1])
    reference = reference_logits(model, tokens, plan, max_context)

    method = runtime.load_forward(pte)
    first = runtime_logits(method, tokens, plan)
    second = runtime_logits(method, tokens, plan)

    max_abs_diff = (torch.cat((first, second)) - reference.repeat(2, 1)).abs().max().item()
    reference_std = reference.std().item()
    return Parity(
        max_abs_diff=max_abs_diff,
        reference_std=reference_std,
        ratio_to_std=max_abs_diff / reference_std if reference_std > 0 else float("inf"),
        tolerance=TOLERANCE,
        top1_agreement=(first.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        positions_checked=len(plan),
        tokens_fed=tokens.shape[1],
        prefill_chunks=[end - start for start, end in prefill],
        decode_steps=len(decode),
        reset_max_abs_diff=(second - first).abs().max().item(),
    )


def require_parity(pte: Path, model: Qwen35, max_context: int, max_seq_len: int) -> Parity:
    parity = check_parity(pte, model, max_context, max_seq_len)
    if not parity.passed:
        raise QwenMobileError(f"{pte.name}: the ExecuTorch runtime disagrees with the eager model: {parity.summary()}")
    return parity


def verify_bundle(bundle: Path, manifest: dict) -> dict:
    """`qwen-mobile verify`: the gate again, on the bundle's model.pte against its source checkpoint."""
    source = manifest.get("source", {})
    loaded = load(source.get("checkpoint"))
    if loaded.checkpoint.config_hash != source.get("config_hash"):
        raise QwenMobileError(
            f"{bundle / 'manifest.json'}: source {source.get('checkpoint')!r} no longer has the config it was "
            "exported from (config_hash differs)"
        )
    parity = check_parity(bundle / "model.pte", loaded.model, manifest["max_context"], manifest["max_seq_len"])
    return parity.to_manifest()
