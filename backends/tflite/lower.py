"""Qwen35 -> one .tflite flatbuffer with two signatures, `prefill` and `decode`, sharing weights.

Shapes are static everywhere, which NPU compilers require:

- `prefill(tokens int32[1, C], input_pos int32[1], length int32[1], <state>)`: a chunk
  of C tokens of which the first `length` are real. Padding never reaches the state:
  padded tokens have beta = 0 and decay g = 0 in the recurrence (no write, no decay),
  the conv state is taken from the last real tokens, and KV slots are written only for
  real tokens. The logits are the last real token's.
- `decode(tokens int32[1, 1], input_pos int32[1], <state>)`: one token.

State (per linear-attention layer a conv state and an fp32 recurrent state, per
full-attention layer a key and a value cache of max_context slots) is an explicit input
and output of both signatures: the output `<name>_out` feeds the input `<name>` on the
next call (see `state_feeds`). litert-torch 0.10's default converter drops buffer
mutations (a mutated buffer becomes a constant), and its V2 converter, which keeps
resource variables, needs a TensorFlow nightly, so state cannot live in the model yet.

Everything lowers to TFLite builtin ops: the recurrent-state op through the core's
decomposition (`qwen_mobile.ops.gated_delta_rule.decompositions`: one chunk of the
matmul-only chunked form for prefill, the recurrent step for decode), KV writes as
one-hot arithmetic (no scatter, no dynamic slice), the last real token through GATHER.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen35Config
from qwen_mobile.models.qwen3_5 import GatedAttention, GatedDeltaNet, Qwen35, init_state
from qwen_mobile.ops.gated_delta_rule import decompositions
from qwen_mobile.quant.plan import QuantPlan

from . import quantize

DEFAULT_MAX_CONTEXT = 512
DEFAULT_PREFILL_CHUNK = 32

PREFILL, DECODE = "prefill", "decode"
# State names per layer type, in the order of the core model's (first, second) state pair.
STATE_NAMES = {LINEAR_ATTENTION: ("conv_state", "recurrent_state"), FULL_ATTENTION: ("key_cache", "value_cache")}
OUTPUT_SUFFIX = "_out"


def state_name(layer: int | str, kind: str) -> str:
    return f"layer{layer}_{kind}"


def state_specs(config: Qwen35Config, max_context: int) -> list[tuple[str, torch.Tensor]]:
    """(input name, zero tensor) for every state tensor, in signature order."""
    specs = []
    for layer, (layer_type, pair) in enumerate(zip(config.layer_types, init_state(config, max_context))):
        for kind, tensor in zip(STATE_NAMES[layer_type], pair):
            specs.append((state_name(layer, kind), tensor))
    return specs


def state_feeds(config: Qwen35Config) -> dict[str, str]:
    """Output name -> the input name it feeds on the next call (prefill and decode alike)."""
    return {
        state_name(layer, kind) + OUTPUT_SUFFIX: state_name(layer, kind)
        for layer, layer_type in enumerate(config.layer_types)
        for kind in STATE_NAMES[layer_type]
    }


class _Masks:
    """The current call's padding, read by the patched layers while the signature is traced."""

    valid: torch.Tensor | None = None  # bool [C]: which chunk positions hold real tokens
    length: torch.Tensor | None = None  # int32 [1]


def weight_inputs(model: nn.Module, plan: QuantPlan | None) -> dict[str, str]:
    """Signature input name -> parameter name, for every planned weight (a tied lm_head is the
    embedding's parameter, so it is one input). See convert for why weights are inputs."""
    if plan is None:
        return {}
    parameters = dict(model.named_parameters())  # tied parameters appear once
    return {quantize.input_name(name): name for name in plan.weights if name in parameters}


def call_with_weights(model: nn.Module, inputs: dict[str, str], given: dict[str, torch.Tensor], *args, **kwargs):
    """model(*args, **kwargs) with each weight in `inputs` taken from the signature input `given` of that name."""
    weights = {inputs[key]: tensor for key, tensor in given.items()}
    return torch.func.functional_call(model, weights, args, kwargs)


class SignatureModule(nn.Module):
    """One signature: tokens, input_pos (and length for prefill), the state and the planned
    weights in; logits and state out."""

    def __init__(self, model: Qwen35, max_context: int, chunk: int | None, weights: dict[str, str]):
        super().__init__()
        self.model = model
        self.chunk = chunk  # None: the decode signature (one token, nothing to mask)
        self.names = [name for name, _ in state_specs(model.config, max_context)]
        self.weights = weights
        self.masks = _Masks()

    def sample_inputs(self, max_context: int) -> dict[str, torch.Tensor]:
        length = self.chunk or 1
        inputs = {"tokens": torch.zeros(1, length, dtype=torch.int32), "input_pos": torch.zeros(1, dtype=torch.int32)}
        if self.chunk is not None:
            inputs["length"] = torch.full((1,), length, dtype=torch.int32)
        inputs.update(state_specs(self.model.config, max_context))
        parameters = dict(self.model.named_parameters())
        inputs.update({key: parameters[name].detach() for key, name in self.weights.items()})
        return inputs

    def forward(self, tokens, input_pos, length=None, **named):
        flat = [named[name] for name in self.names]
        pairs = list(zip(flat[0::2], flat[1::2]))
        weights = {key: named[key] for key in self.weights}
        if self.chunk is None:
            logits, new_state = call_with_weights(self.model, self.weights, weights, tokens, input_pos, pairs)
        else:
            self.masks.valid = torch.arange(self.chunk, dtype=torch.int32) < length
            self.masks.length = length
            logits, new_state = call_with_weights(
                self.model, self.weights, weights, tokens, input_pos, pairs, all_positions=True
            )
            logits = logits.reshape(1, -1)  # the last real position only: see _LastReal
        outputs = {"logits": logits}
        for name, tensor in zip(self.names, (t for pair in new_state for t in pair)):
            outputs[name + OUTPUT_SUFFIX] = tensor
        return outputs


class _LastReal(nn.Module):
    """Stands in for the final norm during prefill: keeps the last real token before norm and lm_head."""

    def __init__(self, norm: nn.Module, masks: _Masks):
        super().__init__()
        self.norm, self.masks = norm, masks

    def forward(self, x):
        return self.norm(x.index_select(1, self.masks.length - 1))


def _masked_gated_delta_rule(masks: _Masks, chunk_size: int):
    """The op through the core's builtin decomposition, padded tokens neither writing nor decaying."""
    (decompose,) = decompositions(chunk_size).values()

    def op(q, k, v, g, beta, state):
        if masks.valid is not None and q.shape[1] > 1:
            real = masks.valid.to(g.dtype)[None, :, None]
            g, beta = g * real, beta * real
        return decompose(q, k, v, g, beta, state)

    return op


# TFLite's builtin DEPTHWISE_CONV_2D (the CPU path without XNNPACK, and what NPU delegates fall
# back to) stalls above 4,832 channels, the size of its per-row accumulator: with ai-edge-litert
# 2.3.0 one call over 6,144 channels (Qwen3.5-0.8B's conv) ran for minutes where 4,096 took 0.4 ms.
MAX_DEPTHWISE_CHANNELS = 4096


def split_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, max_channels: int = MAX_DEPTHWISE_CHANNELS):
    """F.conv1d(x, weight, groups=channels) as one depthwise conv per block of at most max_channels."""
    if x.shape[1] <= max_channels:
        return F.conv1d(x, weight, groups=x.shape[1])
    blocks = zip(x.split(max_channels, dim=1), weight.split(max_channels, dim=0))
    return torch.cat([F.conv1d(part, kernel, groups=kernel.shape[0]) for part, kernel in blocks], dim=1)


def _masked_causal_conv(masks: _Masks):
    def causal_conv(self, mixed, conv_state):
        """GatedDeltaNet.causal_conv with the conv split by channels (MAX_DEPTHWISE_CHANNELS); after
        a padded prefill chunk the new state is the kernel-1 inputs before the first padded token."""
        window = torch.cat((conv_state, mixed.transpose(1, 2).to(conv_state.dtype)), dim=-1)
        out = F.silu(split_depthwise_conv1d(window.to(mixed.dtype), self.conv1d.weight))
        keep = conv_state.shape[-1]
        if masks.valid is None:
            return out.transpose(1, 2), window[..., window.shape[-1] - keep :]
        index = masks.length + torch.arange(keep, dtype=torch.int32)
        return out.transpose(1, 2), window.index_select(-1, index)

    return causal_conv


def _one_hot_attend(masks: _Masks):
    def attend(self, query, key, value, positions, cache):
        """GatedAttention.attend with the cache write as one-hot arithmetic (builtin ops, static
        shapes); padded tokens write nothing. The attention itself is the core's."""
        keys, values = cache
        slots = torch.arange(keys.shape[2], device=query.device)
        write = positions[:, None] == slots[None, :]  # [T, slots]
        if masks.valid is not None:
            write = write & masks.valid[:, None]
        write = write.to(keys.dtype)
        keep = (1.0 - write.sum(0))[:, None]  # [slots, 1]
        keys = keys * keep + write.transpose(0, 1) @ key.to(keys.dtype)
        values = values * keep + write.transpose(0, 1) @ value.to(values.dtype)
        return self.attend_cache(query, keys, values, positions), (keys, values)

    return attend


@contextlib.contextmanager
def traceable(model: Qwen35, signature: SignatureModule, chunk_size: int):
    """While inside: the model runs as `signature` needs it traced (masked padding, builtin-op
    recurrence, one-hot KV writes). Everything is restored afterwards, so the eager model
    (the parity reference) keeps its own layers."""
    masks = signature.masks
    namespace = torch.ops.qwen_mobile
    packet = namespace.gated_delta_rule
    deltanets = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    attentions = [m for m in model.modules() if isinstance(m, GatedAttention)]
    norm = model.norm
    try:
        setattr(namespace, "gated_delta_rule", _masked_gated_delta_rule(masks, chunk_size))
        for layer in deltanets:
            layer.causal_conv = types.MethodType(_masked_causal_conv(masks), layer)
        for layer in attentions:
            layer.attend = types.MethodType(_one_hot_attend(masks), layer)
        if signature.chunk is not None:
            model.norm = _LastReal(norm, masks)
        yield signature
    finally:
        setattr(namespace, "gated_delta_rule", packet)
        for layer in deltanets:
            layer.__dict__.pop("causal_conv", None)
        for layer in attentions:
            layer.__dict__.pop("attend", None)
        model.norm = norm
        masks.valid = masks.length = None


@dataclass
class Lowered:
    flatbuffer: bytes
    prefill_chunk: int
    max_context: int


def clamp_lengths(model: Qwen35, max_context: int, chunk: int) -> tuple[int, int]:
    max_context = min(max_context, model.config.max_position_embeddings)
    return max_context, min(chunk, max_context)


def fold_constants(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Evaluate every computation that depends on no input and no weight (torch.eye in the
    chunk inverse, aranges, causal masks) and keep its result as a constant.

    The converter lowers such factory ops to STABLEHLO_IOTA and leaves it unfolded, and the
    LiteRT interpreter has no kernel for it. Weights and inputs are never folded."""
    graph = module.graph
    values: dict[torch.fx.Node, object] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inputs = [*node.args, *node.kwargs.values()]
        flat = []
        torch.fx.node.map_arg(inputs, flat.append)
        if all(n in values for n in flat):
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
    folded = 0
    for node, value in values.items():
        if not isinstance(value, torch.Tensor) or all(user in values for user in node.users):
            continue
        name = f"_folded_constant_{folded}"
        folded += 1
        module.register_buffer(name, value.clone(), persistent=False)
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        node.replace_all_uses_with(constant)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def convert(model: Qwen35, max_context: int, chunk: int, plan: QuantPlan | None = None) -> bytes:
    """Both signatures through litert-torch. Each signature is traced inside its own
    `traceable` block: litert-torch exports every signature when convert() runs, so the
    exports happen one at a time here and are handed over already traced.

    With a quantization plan, every planned weight is converted as a signature input rather
    than a constant, and quantize.encode then makes each such input a constant holding the
    plan's integers. As constants, the converter would carry every weight in float32 through
    its passes and into the flatbuffer (at the 0.8B shape: over 15 GiB resident and past
    flatbuffers' 2 GB limit); as inputs it never sees their values."""
    import litert_torch

    if plan is not None and plan.weights:
        quantize.check_encodable(plan)
    weights = weight_inputs(model, plan)
    converter = litert_torch.Converter()
    for name, signature_chunk in ((PREFILL, chunk), (DECODE, None)):
        signature = SignatureModule(model, max_context, signature_chunk, weights).eval()
        inputs = signature.sample_inputs(max_context)
        with torch.no_grad(), traceable(model, signature, chunk_size=chunk):
            exported = torch.export.export(signature, (), inputs, strict=False)
        converter.signature(name, fold_constants(exported.module()), sample_kwargs=inputs)
    with torch.no_grad():
        edge = converter.convert(strict_export=False)
    flatbuffer = bytes(edge.model_content())
    return quantize.encode(flatbuffer, plan) if weights else flatbuffer
