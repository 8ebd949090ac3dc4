"""A plan applied to the eager model: the reference a quantized artifact is gated against.

Same dequantized weights, same dynamic activation quantization: whatever error is left
between this and an artifact was added by the lowering, not by the quantization.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from .plan import QuantPlan, planned_modules

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


def _linear_on_quantized_tokens(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(quantize_per_token(x), self.weight, self.bias)


@contextlib.contextmanager
def dequantized(model: nn.Module, plan: QuantPlan):
    """Inside the block, `model` computes with the plan's dequantized weights and fake-quantized
    activations; its float weights come back afterwards. Swapped in place rather than copied,
    so a 0.8B model is not held twice."""
    modules = planned_modules(model)
    originals = {name: modules[name].weight for name in plan.weights}
    try:
        for name, weight in plan.weights.items():
            module = modules[name]
            module.weight = nn.Parameter(weight.dequantize(), requires_grad=False)
            if weight.activations is not None:
                if weight.activations != INT8_ASYMMETRIC_PER_TOKEN:
                    raise ValueError(f"{name}: unknown activation quantization {weight.activations!r}")
                module.forward = types.MethodType(_linear_on_quantized_tokens, module)
        yield model
    finally:
        for name, weight in originals.items():
            modules[name].weight = weight
            modules[name].__dict__.pop("forward", None)
