"""Mixed precision: a 4-bit plan with the weights that matter most kept at 8 bits (one scale
per output channel), within a size budget.

`auto` measures each planned tensor's sensitivity: the mean KL divergence of the next-token
distribution from the float model's, over calibration text, when ONLY that tensor takes its
4-bit form (the method's own: RTN or GPTQ integers) and every other weight stays float. It
then keeps the most sensitive tensors at 8 bits, most sensitive first, skipping any whose
extra bytes would overrun the budget (default: +10% over the plan's plain 4-bit bytes). The
plan records what it kept and why: each kept tensor's KL and added bytes, every tensor's KL,
and the budget's figures, so the manifest can list them (plan.to_manifest's "calibration").

A tied embedding and lm_head are one tensor here, named embed_tokens.weight: its sensitivity
is both uses at 4 bits, and keeping it keeps both.

Size is counted as a backend stores a plan: each distinct integer tensor at its bits per
value (int4 packed two to a byte) plus one bf16 scale per group (zero points are 0 and
XNNPACK stores none). Float parts of the model are the same under any plan and left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen_mobile import progress
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.gptq import GptqOptions, calibration_logits, gptq_plan, rtn_plan, weight_specs
from qwen_mobile.quant.plan import QuantPlan, QuantScheme

DEFAULT_SIZE_BUDGET = 0.10  # fraction over the plain 4-bit plan's bytes
SENSITIVITY_SAMPLES = 32  # calibration samples the sensitivities are measured on
SCALE_BYTES = 2  # bf16


def plan_bytes(plan: QuantPlan) -> int:
    """Bytes of the plan's weights as stored: integers at their bits, a bf16 scale per group;
    a tensor shared by two weights (a tied lm_head) counted once."""
    seen, total = set(), 0
    for weight in plan.weights.values():
        if id(weight.qdata) in seen:
            continue
        seen.add(id(weight.qdata))
        total += (weight.qdata.numel() * weight.bits + 7) // 8 + weight.scale.numel() * SCALE_BYTES
    return total


def _tensor_names(plan: QuantPlan) -> list[str]:
    """One name per distinct integer tensor (a tied lm_head is its embedding)."""
    seen, names = set(), []
    for name, weight in plan.weights.items():
        if id(weight.qdata) not in seen:
            seen.add(id(weight.qdata))
            names.append(name)
    return names


def _sharing(plan: QuantPlan, name: str) -> dict:
    """The plan entries of one tensor: itself and any weight sharing its integers."""
    integers = plan.weights[name].qdata
    return {n: w for n, w in plan.weights.items() if w.qdata is integers}


def added_bytes(plan: QuantPlan, name: str) -> int:
    """What keeping `name` at 8 bits per channel adds to the plan's bytes."""
    weight = plan.weights[name]
    rows, columns = weight.qdata.shape
    now = (rows * columns * weight.bits + 7) // 8 + weight.scale.numel() * SCALE_BYTES
    return rows * columns + rows * SCALE_BYTES - now


@torch.no_grad()
def sensitivities(model: Qwen35, plan: QuantPlan, samples: Sequence[Sequence[int]]) -> dict[str, float]:
    """Mean KL(float || only this tensor quantized) per token, in nats, over `samples`, for
    each distinct tensor of the plan, most sensitive first."""
    references = [calibration_logits(model, s).log_softmax(-1) for s in samples]
    tokens = sum(r.shape[0] for r in references)
    figures = {}
    names = _tensor_names(plan)
    for i, name in enumerate(names):
        with progress.step(f"sensitivity {i + 1} of {len(names)}: {name}"):
            total = 0.0
            with dequantized(model, QuantPlan(plan.scheme, _sharing(plan, name))):
                for sample, reference in zip(samples, references):
                    quantized = calibration_logits(model, sample).log_softmax(-1)
                    total += (reference.exp() * (reference - quantized)).sum().item()
            figures[name] = total / tokens
    return dict(sorted(figures.items(), key=lambda item: -item[1]))


def choose_8bit(plan: QuantPlan, figures: dict[str, float], size_budget: float = DEFAULT_SIZE_BUDGET) -> dict:
    """The tensors to keep at 8 bits: most sensitive first, each one that still fits in
    `size_budget` x the plan's bytes. Returns {name: {"kl_at_4bit", "added_bytes"}}."""
    if size_budget < 0:
        raise ValueError(f"size budget {size_budget}: must be >= 0")
    allowance = int(plan_bytes(plan) * size_budget)
    kept = {}
    for name, kl in figures.items():
        if plan.weights[name].bits >= 8:
            continue
        cost = added_bytes(plan, name)
        if cost <= allowance:
            kept[name] = {"kl_at_4bit": kl, "added_bytes": cost}
            allowance -= cost
    return kept


def _method_plan(model, scheme, samples, method, keep_8bit, options) -> QuantPlan:
    if method == "gptq":
        return gptq_plan(model, scheme, samples, keep_8bit, options)
    if method == "rtn":
        return rtn_plan(model, scheme, keep_8bit)
    raise ValueError(f"method {method!r}: choose rtn or gptq")


def mixed_plan(
    model: Qwen35,
    scheme: QuantScheme,
    samples: Sequence[Sequence[int]],
    method: str = "gptq",
    keep_8bit: Sequence[str] | str = "auto",
    size_budget: float = DEFAULT_SIZE_BUDGET,
    options: GptqOptions | None = None,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
) -> QuantPlan:
    """A `method` plan (rtn or gptq) with `keep_8bit` at 8 bits per channel: a list of weight
    names, or "auto" (measured, see the module doc; needs `samples`). The size budget bounds
    "auto" only: named weights are kept whatever they cost, and the record says so."""
    base = _method_plan(model, scheme, samples, method, (), options)
    budget = {"fraction": size_budget, "4bit_bytes": plan_bytes(base)}
    if keep_8bit == "auto":
        if not samples:
            raise ValueError("keep_8bit auto measures sensitivities on calibration samples; none were given")
        figures = sensitivities(model, base, samples[:sensitivity_samples])
        kept = choose_8bit(base, figures, size_budget)
        rule = (
            f"most sensitive first (mean KL vs float with only that tensor at {scheme.weight_bits} bits), "
            "each that fits the size budget"
        )
    else:
        weight_specs(model, scheme, keep_8bit)  # checks the names
        figures = {}
        kept = {name: {"requested": True} for name in keep_8bit}
        rule = "named"
    plan = _method_plan(model, scheme, samples, method, list(kept), options) if kept else base
    budget["bytes"] = plan_bytes(plan)
    budget["limit_bytes"] = int(budget["4bit_bytes"] * (1 + size_budget))
    plan.calibration = {
        **(plan.calibration or {"method": plan.method}),
        "keep_8bit": {
            "rule": rule,
            "kept": kept,
            "size": budget,
            "sensitivity_samples": min(len(samples), sensitivity_samples) if figures else 0,
            "sensitivity": figures,
        },
    }
    return plan

