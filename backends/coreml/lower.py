"""Qwen35 -> a stateful, multifunction Core ML ML Program (iOS 18 / macOS 15).

Two functions share one weight blob:
- `prefill(tokens int32[1, C], input_pos int32[1], length int32[1]) -> logits [1, vocab]`:
  a fixed chunk of C tokens of which the first `length` are real; the logits are those
  of position length-1. Padded tokens never touch the state: their beta and log-decay
  are zeroed (the recurrence neither decays nor writes), the conv state is taken from
  the last real inputs, and the KV caches are written only at real positions.
- `decode(tokens int32[1, 1], input_pos int32[1]) -> logits [1, vocab]`: one token.

Conv, recurrent and KV state are Core ML states (`ct.StateType`), updated in place by
the program. Core ML states are fp16 only, so a state kept at fp32 precision (all of them
under fp32 compute) is a pair of fp16 states, hi + lo (see stored_states); a call at input_pos 0 starts a new sequence (the conv and recurrent states
are zeroed there, as in the core model; KV slots beyond a query's position are masked).
All shapes are static. KV writes are one-hot matmuls plus a select rather than a
slice_update at a dynamic offset, so a prefill chunk never writes past the cache.

With a quantized plan (int8, int4), each planned weight is stored as the plan's own
integers, scales and zero points in a constexpr_blockwise_shift_scale op (compress.py);
the program computes in the scheme's compute dtype on the decompressed weights.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.config import FULL_ATTENTION, LINEAR_ATTENTION, Qwen35Config
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35, init_state, l2_normalize, rotate_half
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import QuantPlan

from . import composite, compress

DEFAULT_MAX_CONTEXT = 512
DEFAULT_PREFILL_CHUNK = 32
FUNCTIONS = ("prefill", "decode")
DEFAULT_FUNCTION = "decode"
STATE_NAMES = {LINEAR_ATTENTION: ("conv_state", "recurrent_state"), FULL_ATTENTION: ("key_cache", "value_cache")}


def state_name(layer: int | str, kind: str) -> str:
    return f"layer{layer}_{kind}"


def state_tensors(config: Qwen35Config, max_context: int) -> list[dict[str, torch.Tensor]]:
    """Per layer, its zero state by kind, in the core model's layout (KV [1, kv_heads, context, head_dim])."""
    return [dict(zip(STATE_NAMES[t], pair)) for t, pair in zip(config.layer_types, init_state(config, max_context))]


@torch.library.custom_op("qwen_mobile_coreml::pair_join", mutates_args=())
def pair_join(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """A state held as an fp16 hi/lo pair, as fp32. Its own op so that the converter can keep
    it in fp32 inside an fp16 program (composite.build_pair_join)."""
    return high.float() + low.float()


@torch.library.custom_op("qwen_mobile_coreml::pair_split", mutates_args=())
def pair_split(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (hi = fp16-representable part, lo = the rest), both fp32 (composite.build_pair_split)."""
    high = value.float().to(torch.float16).float()
    return high, value.float() - high


def stored_states(config: Qwen35Config, max_context: int, split: frozenset[str]) -> list[tuple[str, str, tuple]]:
    """(Core ML state name, kind, shape) for every state the program holds, in order.

    Core ML states are fp16 only (coremltools refuses any other dtype). A kind in `split`
    keeps fp32 precision as two fp16 states, `_hi` = fp16(x) and `_lo` = fp16(x - hi):
    the same bytes as one fp32 tensor, and 22 significant bits instead of 11."""
    stored = []
    for layer, tensors in enumerate(state_tensors(config, max_context)):
        for kind, tensor in tensors.items():
            parts = ("_hi", "_lo") if kind in split else ("",)
            stored += [(state_name(layer, kind) + part, kind, tuple(tensor.shape)) for part in parts]
    return stored


class CoreMLQwen35(nn.Module):
    """The core model's layers driven for Core ML: state in registered buffers assigned in
    place (which coremltools turns into states), a fixed chunk with a `length` mask."""

    def __init__(self, model: Qwen35, max_context: int, size: int, split: frozenset[str]):
        super().__init__()
        # sizes are Python ints, never read from traced shapes: the program is static
        self.model, self.max_context, self.size, self.split = model, max_context, size, split
        self.kinds = []
        for name, kind, shape in stored_states(model.config, max_context, split):
            self.register_buffer(name, torch.zeros(shape))
        for layer, tensors in enumerate(state_tensors(model.config, max_context)):
            self.kinds.append([(state_name(layer, kind), kind) for kind in tensors])

    def read(self, name: str, kind: str, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The state's value; `scale` (0 or 1) multiplies the stored parts, which is exact in fp16."""
        parts = [getattr(self, name + part) for part in (("_hi", "_lo") if kind in self.split else ("",))]
        if scale is not None:
            parts = [part * scale for part in parts]
        return pair_join(*parts) if kind in self.split else parts[0]

    def write(self, name: str, kind: str, value: torch.Tensor) -> None:
        """Slice assignment of the whole buffer: coremltools' form of an in-place state update."""
        if kind in self.split:
            high, low = pair_split(value)
            getattr(self, name + "_hi")[:] = high
            getattr(self, name + "_lo")[:] = low
        else:
            getattr(self, name)[:] = value

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, length: torch.Tensor | None = None):
        model, size = self.model, self.size
        steps = torch.arange(size, dtype=torch.int32)
        positions = input_pos[:1] + steps
        if length is None:  # decode: every token is real
            real, pick = None, None
        else:
            real = (steps < length).float()  # [T]
            pick = (steps == length - 1).float()[None, None, :]  # [1, 1, T]: selects position length-1
        continuing = (input_pos[:1] > 0).float()
        x = model.embed_tokens(tokens)
        cos, sin = model.rotary(positions)
        for layer, ((first_name, first_kind), (second_name, second_kind)) in zip(model.layers, self.kinds):
            normed = layer.input_layernorm(x)
            if layer.is_linear:  # a call at input_pos 0 starts from zero conv and recurrent state
                first, second = self.read(first_name, first_kind, continuing), self.read(second_name, second_kind, continuing)
                mixed, first, second = self.linear(layer.linear_attn, normed, first, second, real, length)
            else:
                first, second = self.read(first_name, first_kind), self.read(second_name, second_kind)
                mixed, first, second = self.attention(layer.self_attn, normed, cos, sin, positions, first, second, real)
            self.write(first_name, first_kind, first)
            self.write(second_name, second_kind, second)
            x = x + mixed
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = x[:, -1:] if pick is None else pick @ x  # [1, 1, hidden]
        return model.lm_head(model.norm(last))[:, 0]

    def linear(self, attn, x, conv_state, recurrent, real, length):
        """GatedDeltaNet.forward with padded tokens kept out of the conv and recurrent state."""
        batch, size = 1, self.size
        kernel = self.model.config.linear_conv_kernel_dim - 1
        window = torch.cat((conv_state, attn.in_proj_qkv(x).transpose(1, 2)), dim=-1)  # [B, conv_dim, K-1+T]
        mixed = F.silu(F.conv1d(window, attn.conv1d.weight, groups=self.model.config.conv_dim)).transpose(1, 2)
        if real is None:
            new_conv = window[..., size:]
        else:  # the last kernel-1 inputs up to the last real token: columns length .. length+K-2
            columns = torch.arange(size + kernel, dtype=torch.int32)[:, None]
            select = (columns == length + torch.arange(kernel, dtype=torch.int32)[None, :]).float()
            new_conv = window @ select
        query, key, value = mixed.split((attn.key_dim, attn.key_dim, attn.value_dim), dim=-1)
        query = l2_normalize(query.reshape(batch, size, attn.key_heads, attn.key_head_dim)) * attn.key_head_dim**-0.5
        key = l2_normalize(key.reshape(batch, size, attn.key_heads, attn.key_head_dim))
        value = value.reshape(batch, size, attn.value_heads, attn.value_head_dim)
        beta = torch.sigmoid(attn.in_proj_b(x))
        decay = -attn.A_log.exp() * F.softplus(attn.in_proj_a(x) + attn.dt_bias)
        if real is not None:  # a padded token neither decays nor writes the recurrent state
            beta, decay = beta * real[None, :, None], decay * real[None, :, None]
        out, recurrent = torch.ops.qwen_mobile.gated_delta_rule(query, key, value, decay, beta, recurrent)
        z = attn.in_proj_z(x).reshape(batch, size, attn.value_heads, attn.value_head_dim)
        out = attn.norm(out, z)
        return attn.out_proj(out.reshape(batch, size, attn.value_dim)), new_conv, recurrent

    def attention(self, attn, x, cos, sin, positions, keys, values, real):
        """GatedAttention.forward over caches written at real positions only (one-hot matmul + select)."""
        batch, size = 1, self.size
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        query, gate = attn.q_proj(x).view(batch, size, heads, 2 * dim).chunk(2, dim=-1)
        query = attn.q_norm(query).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(x).view(batch, size, kv_heads, dim)).transpose(1, 2)
        value = attn.v_proj(x).view(batch, size, kv_heads, dim).transpose(1, 2)
        rotary = self.model.config.rotary_dim
        query, key = partial_rotary(query, cos, sin, rotary), partial_rotary(key, cos, sin, rotary)

        slots = torch.arange(self.max_context, dtype=torch.int32)
        write = (slots[:, None] == positions[None, :]).float()  # [context, T]: slot <- token
        if real is not None:
            write = write * real[None, :]
        written = write.sum(-1, keepdim=True) > 0  # [context, 1]
        keys = torch.where(written, write @ key, keys)
        values = torch.where(written, write @ value, values)

        # GQA without repeating the cache: each KV head's query heads are stacked along rows, as in
        # GatedAttention.attend_cache, whose dtype casts (fp32 softmax for bf16 eager models) the
        # coremltools torch frontend cannot convert ("input to cast must be ... a scalar")
        groups = heads // kv_heads
        mask = torch.where(slots[None, :] <= positions[:, None], 0.0, float("-inf"))  # [T, context]
        grouped = query.reshape(batch, kv_heads, groups * size, dim)
        scores = (grouped @ keys.transpose(-1, -2)) * dim**-0.5 + mask.repeat(groups, 1)
        out = (torch.softmax(scores, dim=-1) @ values).reshape(batch, heads, size, dim)
        out = out.transpose(1, 2).reshape(batch, size, -1) * torch.sigmoid(gate.reshape(batch, size, -1))
        return attn.o_proj(out), keys, values


def partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """qwen3_5.apply_partial_rotary with rotary_dim a Python int (the core reads it from cos.shape)."""
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


@dataclass
class Lowered:
    """What the export wrote and measured, for the manifest."""

    seconds: float = 0.0
    operations: dict[str, dict[str, int]] = field(default_factory=dict)  # function -> op type -> count
    encoded: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # function -> planned weight -> constexpr ops


def split_kinds(compute_dtype: str, recurrent_dtype: str) -> frozenset[str]:
    """The state kinds held as fp16 hi/lo pairs: all of them when computing in fp32, the
    recurrent state alone when computing in fp16 with an fp32 recurrent state."""
    if compute_dtype == "float32":
        return frozenset(("conv_state", "recurrent_state", "key_cache", "value_cache"))
    return frozenset(("recurrent_state",)) if recurrent_dtype == "float32" else frozenset()


def trace(model: Qwen35, max_context: int, chunk: int | None, split: frozenset[str]) -> torch.jit.ScriptModule:
    size = chunk or 1
    wrapper = CoreMLQwen35(model, max_context, size, split).eval()
    example = (torch.zeros(1, size, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    if chunk is not None:
        example = (*example, torch.full((1,), size, dtype=torch.int32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about buffers assigned in place
        return torch.jit.trace(wrapper, example, check_trace=False)


def convert_function(
    model: Qwen35, max_context: int, chunk: int | None, compute_dtype: str, split: frozenset[str], plan: QuantPlan
):
    """One function (prefill when `chunk` is given, else decode) as an ML Program MLModel, with
    the plan's weights encoded as constexpr_blockwise_shift_scale (compress.py), and what
    was encoded: planned weight -> constexpr op names."""
    import coremltools as ct

    composite.register()
    traced = trace(model, max_context, chunk, split)
    size = chunk or 1
    inputs = [ct.TensorType(name="tokens", shape=(1, size), dtype=np.int32),
              ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32)]
    if chunk is not None:
        inputs.append(ct.TensorType(name="length", shape=(1,), dtype=np.int32))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
              for name, _, shape in stored_states(model.config, max_context, split)]
    if compute_dtype == "float16":
        # everything in fp16 except the recurrence's composite (its ops carry GDR_TAG)
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: composite.GDR_TAG not in op.name)
    else:
        precision = ct.precision.FLOAT32
    with quiet(), compress.pipeline_with(plan) as (pipeline, encoder):
        mlmodel = ct.convert(
            traced, inputs=inputs, states=states,
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
            convert_to="mlprogram", skip_model_load=True, pass_pipeline=pipeline,
        )
    return mlmodel, ({} if encoder is None else encoder.encoded)


def numpy_dtype(name: str):
    return {"float32": np.float32, "float16": np.float16}[name]


@contextlib.contextmanager
def quiet():
    """coremltools reports progress bars and untested-version notes on stderr; keep the CLI's output clean."""
    import logging

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def lower(model: Qwen35, plan: QuantPlan, out: Path, max_context: int, chunk: int, recurrent_dtype: str) -> Lowered:
    """Convert both functions and save them as one multifunction mlpackage at `out`."""
    import coremltools as ct

    if next(model.parameters()).dtype != torch.float32:
        raise QwenMobileError("the coreml export needs the model loaded in float32")
    compute_dtype = plan.scheme.compute_dtype
    started = time.perf_counter()
    lowered = Lowered()
    # the plan's dequantized weights in place of the float ones: the program's constants are
    # then exactly the values the encoding pass replaces with the plan's integers
    with tempfile.TemporaryDirectory(prefix="coreml-functions-") as scratch, dequantized(model, plan):
        descriptor = ct.utils.MultiFunctionDescriptor()
        for function, size in (("prefill", chunk), ("decode", None)):
            mlmodel, lowered.encoded[function] = convert_function(
                model, max_context, size, compute_dtype, split_kinds(compute_dtype, recurrent_dtype), plan
            )
            path = Path(scratch) / f"{function}.mlpackage"
            mlmodel.save(str(path))
            del mlmodel
            descriptor.add_function(str(path), src_function_name="main", target_function_name=function)
        descriptor.default_function_name = DEFAULT_FUNCTION
        with quiet():
            ct.utils.save_multifunction(descriptor, str(out))
    lowered.seconds = time.perf_counter() - started
    return lowered
