"""A plan applied to the eager model: the reference a quantized artifact is gated against.

Same dequantized weights, same dynamic activation quantization, and for static activations
(a8w8, a16w8) the same integer linear, rounded where and as the artifact's kernels round
(quant/static.py static_linear): whatever error is left between this and an artifact was
added by the lowering, not by the quantization.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from qwen_mobile.memory import linear

from .plan import QuantizedWeight, QuantPlan, planned_modules, release_planned_weights
from .static import StaticRange, is_static, static_linear

INT8_ASYMMETRIC_PER_TOKEN = "int8_asymmetric_per_token"


def quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """int8 asymmetric quantize-dequantize with one scale and zero point per token (last dim),
    the dynamic activation quantization that 8da4w kernels apply."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero_point = choose_qparams_affine(
        x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127, zero_point_dtype=torch.int8
    )
    q = quantize_affine(x, block, scale, zero_point, torch.int8, -128, 127)
    return dequantize_affine(q, block, scale, zero_point, torch.int8, -128, 127, output_dtype=x.dtype)


def _perturbed(x: torch.Tensor, seed: int | torch.Tensor, ulps: float) -> torch.Tensor:
    # a hash of each value's bits, so that equal inputs are rounded equally, as by a real kernel;
    # a tensor of seeds gives each batch row its own
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64).view(-1, *[1] * (x.dim() - 1))
    uniform = ((bits * 2654435761 + seed * 40503) % 65536).to(x.dtype) / 32767.5 - 1
    return x * (1 + uniform * ulps * 2.0**-23)


def _integer_linear(weight: QuantizedWeight, activations: str | None, jitter: tuple[int, float] | None):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if activations == INT8_ASYMMETRIC_PER_TOKEN:
            x = quantize_per_token(x if jitter is None else _perturbed(x, *jitter))
        return linear(x, weight, self.bias)

    return forward


def _static_linear(qdata: torch.Tensor, scale: torch.Tensor, spec: StaticRange, jitter: tuple[int, float] | None):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return static_linear(x if jitter is None else _perturbed(x, *jitter), qdata, scale, spec)

    return forward


def _integer_embedding(weight: QuantizedWeight):
    # a lookup copies rows: dequantizing the rows looked up is the same as looking them up dequantized
    def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return weight.dequantize_rows(ids.reshape(-1)).view(*ids.shape, -1)

    return forward


@contextlib.contextmanager
def dequantized(model: nn.Module, plan: QuantPlan, jitter: tuple[int, float] | None = None, keep_float: bool = True):
    """Inside the block, `model` computes with the plan's dequantized weights and fake-quantized
    activations. Each planned Linear and Embedding computes from the plan's integers a block of
    rows at a time (memory.linear), so no dequantized copy of a weight is ever held: 1 byte per
    weight, where a float32 copy of the 0.8B model's was 3 GB. keep_float=False, for a caller with
    no further use for the float weights: they are released for good on the way in
    (quant.plan.release_planned_weights), and the model can no longer compute without a plan.

    jitter (seed, ulps): every activation entering a dynamic or static quantizer is first moved by up to
    `ulps` units in the last place, pseudo-randomly but as a function of its value: what another
    correct fp32 kernel's summation order does to it. The parity gate measures its noise floor
    with this (parity.noise_floor), one seed per batch row when `seed` is a tensor of them."""
    for name, weight in plan.weights.items():
        if weight.activations not in (None, INT8_ASYMMETRIC_PER_TOKEN) and not is_static(weight.activations):
            raise ValueError(f"{name}: unknown activation quantization {weight.activations!r}")
        if is_static(weight.activations) and name not in plan.activation_ranges:
            raise ValueError(f"{name}: static activations without a range in the plan")
    modules = planned_modules(model)
    forwards = {}
    for name, weight in plan.weights.items():
        if isinstance(modules[name], nn.Embedding):
            forwards[modules[name]] = _integer_embedding(weight)
        elif is_static(weight.activations):
            forwards[modules[name]] = _static_linear(weight.qdata, weight.scale, plan.activation_ranges[name], jitter)
        else:
            forwards[modules[name]] = _integer_linear(weight, weight.activations, jitter)
    if not keep_float:
        release_planned_weights(model, plan)
    previous = {}  # forwards set before (memory.widened's), given back on the way out
    try:
        for module, forward in forwards.items():
            previous[module] = vars(module).get("forward")
            module.forward = types.MethodType(forward, module)
        yield model
    finally:
        for module, forward_before in previous.items():
            if forward_before is None:
                del module.forward
            else:
                module.forward = forward_before
