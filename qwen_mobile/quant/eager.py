"""A plan applied to the eager model: the reference a quantized artifact is gated against.

Same dequantized weights, same dynamic activation quantization, and for static activations
(a8w8, a16w8) the same integer linear, rounded where and as the artifact's kernels round
(quant/static.py static_linear): whatever error is left between this and an artifact was
added by the lowering, not by the quantization.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from qwen_mobile.memory import linear, narrowest_exact

from .plan import QuantizedWeight, QuantPlan, planned_modules, replaced_weights
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


def _linear_on_quantized_tokens(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(quantize_per_token(x), self.weight, self.bias)


def _perturbed(x: torch.Tensor, seed: int | torch.Tensor, ulps: float) -> torch.Tensor:
    # a hash of each value's bits, so that equal inputs are rounded equally, as by a real kernel;
    # a tensor of seeds gives each batch row its own
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64).view(-1, *[1] * (x.dim() - 1))
    uniform = ((bits * 2654435761 + seed * 40503) % 65536).to(x.dtype) / 32767.5 - 1
    return x * (1 + uniform * ulps * 2.0**-23)


def _perturbed_linear(seed: int, ulps: float):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(quantize_per_token(_perturbed(x, seed, ulps)), self.weight, self.bias)

    return forward


def _static_linear(qdata: torch.Tensor, scale: torch.Tensor, spec: StaticRange, jitter: tuple[int, float] | None):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return static_linear(x if jitter is None else _perturbed(x, *jitter), qdata, scale, spec)

    return forward


@contextlib.contextmanager
def dequantized(model: nn.Module, plan: QuantPlan, jitter: tuple[int, float] | None = None, keep_float: bool = True):
    """Inside the block, `model` computes with the plan's dequantized weights and fake-quantized
    activations; its float weights come back afterwards (see replaced_weights). keep_float=False,
    for a caller with no further use for the float weights: they are replaced for good, one weight
    at a time (dequantize_in_place), so the float model and its dequantized copy (3 GB each at
    0.8B) are never held whole together; the model keeps the dequantized weights afterwards.

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
    on_quantized_tokens = [modules[name] for name, weight in plan.weights.items()
                           if weight.activations == INT8_ASYMMETRIC_PER_TOKEN]
    on_static_ranges = {modules[name]: _static_linear(weight.qdata, weight.scale, plan.activation_ranges[name], jitter)
                        for name, weight in plan.weights.items() if is_static(weight.activations)}
    forward = _linear_on_quantized_tokens if jitter is None else _perturbed_linear(*jitter)
    if keep_float:
        weights = replaced_weights(model, {name: value for names, value in dequantized_weights(plan) for name in names})
    else:
        dequantize_in_place(model, plan)
        weights = contextlib.nullcontext()
    with weights:
        previous = {}  # forwards set before (memory.widened's), given back on the way out
        try:
            for module in on_quantized_tokens:
                previous[module] = vars(module).get("forward")
                module.forward = types.MethodType(forward, module)
            for module, static_forward in on_static_ranges.items():
                previous[module] = vars(module).get("forward")
                module.forward = types.MethodType(static_forward, module)
            yield model
        finally:
            for module, forward_before in previous.items():
                if forward_before is None:
                    del module.forward
                else:
                    module.forward = forward_before


def sharing_groups(plan: QuantPlan) -> list[tuple[QuantizedWeight, list[str]]]:
    """Each of the plan's integer tensors once, with the names of the weights that hold it (a tied
    lm_head shares the embedding's)."""
    sharing: dict[int, tuple[QuantizedWeight, list[str]]] = {}
    for name, weight in plan.weights.items():
        sharing.setdefault(id(weight.qdata), (weight, []))[1].append(name)
    return list(sharing.values())


def dequantized_weights(plan: QuantPlan) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(names, dequantized value) for each of the plan's integer tensors, each made only when asked for."""
    for weight, names in sharing_groups(plan):
        yield names, weight.dequantize()


def dequantize_in_place(model: nn.Module, plan: QuantPlan) -> None:
    """Every planned weight of `model` replaced for good by its dequantized value, one integer
    tensor at a time: each float weight is freed as soon as its modules hold the replacement, so
    no more than one weight is held in both forms. A weight already replaced from the same
    integers is left as it is: the gate's plan pass and noise-floor passes each ask, and making
    the 0.8B embedding again beside the one held cost 1 GiB of peak per pass.

    Each replacement is held in the narrowest float dtype that holds it exactly (memory.py):
    4-bit integers times bf16 scales fit fp16, half of float32, and `dequantized` widens them
    as the model computes inside memory.widened, which the caller enters."""
    modules = planned_modules(model)
    for weight, names in sharing_groups(plan):
        if all(getattr(modules[name].weight, "dequantized_from", None) is weight.qdata for name in names):
            continue
        value = nn.Parameter(narrowest_exact(weight.dequantize_rows, tuple(weight.qdata.shape)), requires_grad=False)
        value.dequantized_from = weight.qdata
        for name in names:
            modules[name].weight = value
