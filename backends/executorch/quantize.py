"""A core quantization plan encoded as torchao tensors, the form ExecuTorch lowers.

Each planned weight becomes torchao's IntxUnpackedToInt8Tensor built from the plan's
own integers, scales and zero points (never from float), so the program holds exactly
the plan. torch.export turns it into dequantize_affine (+ per-token activation
quantization for 8da4w) in front of each linear, which the XNNPACK partitioner fuses
into its int8/int4 kernels (weight-only int8 through partition.py's rule), and in front
of the embedding lookup, which ExecuTorch's quant fusion turns into
quantized_decomposed::embedding_{byte,4bit}.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.eager import INT8_ASYMMETRIC_PER_TOKEN
from qwen_mobile.quant.plan import QuantizedWeight, QuantPlan, replaced_weights

# What XNNPACK's quantized linears and ExecuTorch's quantized embeddings take.
ENCODABLE_BITS = {4, 8}
ENCODABLE_ACTIVATIONS = {None, INT8_ASYMMETRIC_PER_TOKEN}


def check_encodable(plan: QuantPlan) -> None:
    for name, weight in plan.weights.items():
        if weight.bits not in ENCODABLE_BITS:
            raise QwenMobileError(
                f"{name}: {weight.bits}-bit weights cannot be encoded by the executorch backend "
                f"(it encodes {sorted(ENCODABLE_BITS)}-bit)"
            )
        if weight.activations not in ENCODABLE_ACTIVATIONS:
            raise QwenMobileError(
                f"{name}: activation quantization {weight.activations!r} cannot be encoded by the executorch "
                f"backend (it encodes float activations or {INT8_ASYMMETRIC_PER_TOKEN})"
            )
        if name == "embed_tokens.weight":
            continue  # quantized_decomposed::embedding_{byte,4bit} take any of these
        per_channel = weight.group_size == weight.qdata.shape[1]
        if weight.activations is None and (weight.bits != 8 or not per_channel):
            raise QwenMobileError(
                f"{name}: XNNPACK has no kernel for float activations with {weight.bits}-bit "
                f"{'per-channel' if per_channel else 'group-wise'} weights; the executorch backend encodes "
                "weight-only int8 per channel, or int4 groups with int8 dynamic activations (8da4w)"
            )
        if torch.any(weight.zero_point != 0):
            raise QwenMobileError(
                f"{name}: XNNPACK's quantized linears take symmetric weights only; this plan has nonzero zero points"
            )


def torchao_weight(weight: QuantizedWeight):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    activations = (
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
        if weight.activations == INT8_ASYMMETRIC_PER_TOKEN
        else None
    )
    return IntxUnpackedToInt8Tensor(
        weight.qdata, weight.scale, weight.zero_point, getattr(torch, f"int{weight.bits}"), weight.block_size,
        torch.float32, activations,
    )


@contextlib.contextmanager
def planned_weights(model: nn.Module, plan: QuantPlan):
    """Inside the block the model's planned weights are the plan's torchao tensors; the
    float weights come back afterwards (the gate's reference needs them)."""
    check_encodable(plan)
    with replaced_weights(model, {name: torchao_weight(weight) for name, weight in plan.weights.items()}):
        yield model
