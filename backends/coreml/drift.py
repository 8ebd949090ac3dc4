"""How far an fp16-stored recurrent state drifts from an fp32 one over a long sequence.

Core ML states are fp16 only. The fp16 export computes the recurrence in fp32 either
way (the composite's ops are kept out of fp16); the question is only how the state is
stored between calls: one fp16 tensor, or an fp16 hi/lo pair holding fp32 precision.
This feeds the eager model one token per call (a decode loop, the worst case: the
state is rounded after every token) with conv and KV state rounded to fp16 in both
arms, so the two arms differ only in the recurrent state's storage.
"""

from __future__ import annotations

import torch

from qwen_mobile.models.qwen3_5 import DeltaNetState, KVState, Qwen35
from qwen_mobile.parity import mean_kl, sample_tokens, top1_agreement

DRIFT_TOKENS = 2048
# the state is kept as an fp32 hi/lo pair when fp16 storage flips more than this share of
# greedy tokens or moves the logits by more than this fraction of their std
MATERIAL_TOP1_LOSS = 0.01
MATERIAL_RATIO = 0.05


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _round(state, recurrent_fp16: bool):
    """Each layer's state as Core ML would store it: conv and KV in fp16, the recurrent state as chosen."""
    return [
        DeltaNetState(_fp16(s.conv), _fp16(s.recurrent) if recurrent_fp16 else s.recurrent)
        if isinstance(s, DeltaNetState) else KVState(_fp16(s.keys), _fp16(s.values))
        for s in state
    ]


@torch.no_grad()
def measure(model: Qwen35, tokens: int = DRIFT_TOKENS) -> dict:
    config = model.config
    sequence = sample_tokens(config.vocab_size, tokens)
    states = {arm: model.init_state(tokens) for arm in ("fp32", "fp16")}
    logits = {"fp32": [], "fp16": []}
    for position in range(tokens):
        for arm, state in states.items():
            out, state = model(sequence[:, position : position + 1], torch.tensor([position]), state)
            states[arm] = _round(state, recurrent_fp16=arm == "fp16")
            logits[arm].append(out)
    reference, stored = torch.cat(logits["fp32"]), torch.cat(logits["fp16"])
    relative = max(
        ((a.recurrent - b.recurrent).norm() / b.recurrent.norm()).item()
        for a, b in zip(states["fp16"], states["fp32"])
        if isinstance(a, DeltaNetState)
    )
    ratio = ((stored - reference).abs().max() / reference.std()).item()
    agreement = top1_agreement(reference, stored)
    last = slice(tokens - 256, tokens)
    return {
        "tokens": tokens,
        "feeding": "one token per call, conv and KV state fp16 in both arms",
        "state_relative_error": relative,  # worst layer, after the last token
        "logits_max_diff_ratio_to_std": ratio,
        "top1_agreement": agreement,
        "mean_kl": mean_kl(reference, stored),
        "last_256_top1_agreement": top1_agreement(reference[last], stored[last]),
        "material": bool(agreement < 1 - MATERIAL_TOP1_LOSS or ratio > MATERIAL_RATIO),
        "rule": f"material if top-1 agreement < {1 - MATERIAL_TOP1_LOSS:g} or max|diff| > {MATERIAL_RATIO:g} x std",
    }
