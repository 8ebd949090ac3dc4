"""Every change the TFLite lowering makes to the core model, in one place (applied with
qwen_mobile.swaps.swapped while each signature is exported, and by lower.convert's
decomposition table).

- The Gated DeltaNet's depthwise conv becomes ChannelSplitConv1d: at most 4,096 channels
  per DEPTHWISE_CONV_2D.
- CacheAttention becomes SliceCacheAttention: a call's keys and values are written into the
  cache with DYNAMIC_UPDATE_SLICE (a decode step writes one row; a prefill chunk writes its
  real rows only), where the core writes through a one-hot matmul and a SELECT over the
  whole cache. The slice write touches nothing else, so a runtime may bind one buffer as
  both the cache input and its `_out` output and the cache never moves (lower.in_place_state).
  Attention reads both caches as the left operand of its matmuls (values stored transposed),
  so XNNPACK never transposes or repacks a cache.
- DECOMPOSITIONS: the recurrent-state op as builtin ops, over the state stored transposed
  (per value head [value_dim, key_dim]): a decode step folds the decay into its two reads and
  writes the state once (decay plus one outer product), where the core's recurrent step decays
  the state, then reads it and writes it again; a prefill chunk transposes the state in and out
  of the core's own chunked form.

Every state tensor is stored without its batch dimension (the export is batch 1), so no op
reshapes a cache or a state before using it: `stored_shape` gives each one's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.models.qwen3_5 import CacheAttention, KVState, StateTensor
from qwen_mobile.ops import gated_delta_rule as gdr
from qwen_mobile.swaps import ModuleSwap

# TFLite's builtin DEPTHWISE_CONV_2D (the CPU path without XNNPACK, and what NPU delegates fall
# back to) stalls above 4,832 channels, the size of its per-row accumulator: with ai-edge-litert
# 2.3.0 one call over 6,144 channels (Qwen3.5-0.8B's conv) ran for minutes where 4,096 took 0.4 ms.
MAX_DEPTHWISE_CHANNELS = 4096


class ChannelSplitConv1d(nn.Module):
    """A depthwise nn.Conv1d (no bias, no padding) as one depthwise conv per block of at most
    max_channels channels. Holds the original's weight under the same name."""

    def __init__(self, original: nn.Conv1d, max_channels: int = MAX_DEPTHWISE_CHANNELS):
        super().__init__()
        self.weight = original.weight
        self.max_channels = max_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= self.max_channels:
            return F.conv1d(x, self.weight, groups=x.shape[1])
        blocks = zip(x.split(self.max_channels, dim=1), self.weight.split(self.max_channels, dim=0))
        return torch.cat([F.conv1d(part, kernel, groups=kernel.shape[0]) for part, kernel in blocks], dim=1)


# ------------------------------------------------------------------ stored state layouts

def stored_shape(tensor: StateTensor) -> tuple[int, ...]:
    """How the artifact stores one state tensor (batch 1, its dimension dropped):
    key cache [kv_heads, slots, head_dim]; value cache transposed [kv_heads, head_dim, slots];
    recurrent state transposed per head [value_heads, value_dim, key_dim]; conv state as the core."""
    if tensor.shape[0] != 1:
        raise ValueError(f"{tensor.name}: the tflite backend stores batch 1 only")
    shape = tensor.shape[1:]
    if tensor.field == "keys":
        return shape
    if tensor.field in ("values", "recurrent"):
        return (shape[0], shape[2], shape[1])
    return tensor.shape


# ------------------------------------------------------------------ KV writes and attention

def dynamic_update_slice(cache: torch.Tensor, update: torch.Tensor, start: torch.Tensor, axis: int) -> torch.Tensor:
    """cache with `update` written at `start` (a [1] integer tensor) along `axis`: TFLite's
    DYNAMIC_UPDATE_SLICE (through litert-torch's op, which lowers to stablehlo.dynamic_update_slice)."""
    import litert_torch.generative.custom_ops.dynamic_update_slice  # noqa: F401 (registers the op)

    zero = torch.zeros((), dtype=torch.int32)
    starts = [start.to(torch.int32)[0] if dim == axis else zero for dim in range(cache.dim())]
    return torch.ops.litert_torch.dynamic_update_slice(cache, update, starts)


def write_rows(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, valid, axis: int) -> torch.Tensor:
    """cache with this call's T rows (`new`, T along `axis`) written from slot positions[0] on,
    the padded ones (valid False) left out, as one DYNAMIC_UPDATE_SLICE.

    One row (decode) is written where it belongs. A chunk is written as a window of T slots
    that always fits in the cache (DYNAMIC_UPDATE_SLICE would otherwise clamp its start near
    the end of the context and overwrite earlier slots): the window starts at
    min(position, slots - T), and each of its slots takes this call's row for it if that row is
    real, else keeps the slot's own value (gathered first). Padding therefore writes nothing."""
    new = new.to(cache.dtype)
    count, slots = new.shape[axis], cache.shape[axis]
    start = positions[:1]
    if count == 1:
        return dynamic_update_slice(cache, new, start, axis)
    first = torch.clamp(start, max=slots - count)
    steps = torch.arange(count, dtype=positions.dtype, device=cache.device)
    source = steps - (start - first)  # the row of this call each window slot takes
    row = source.clamp(0, count - 1)
    real = torch.ones(count, dtype=torch.bool, device=cache.device) if valid is None else valid.index_select(0, row)
    take = (source >= 0) & real
    shape = [1] * cache.dim()
    shape[axis] = count
    merged = torch.where(take.reshape(shape), new.index_select(axis, row), cache.index_select(axis, first + steps))
    return dynamic_update_slice(cache, merged, first, axis)


class SliceCacheAttention(nn.Module):
    """CacheAttention over caches in the stored layouts (keys [kv, slots, D], values [kv, D, slots]),
    written by slices (write_rows). Attention is the core's (causal GQA through a mask over every
    slot, softmax in fp32) with each cache as the left operand of its matmul:
    scores^T = keys @ query^T and out^T = values^T @ weights^T."""

    def __init__(self, original: CacheAttention):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = original.num_heads, original.num_kv_heads, original.head_dim

    def forward(self, query, key, value, positions, cache: KVState, valid=None) -> tuple[torch.Tensor, KVState]:
        keys, values = cache
        batch, length, dim = query.shape[0], query.shape[2], self.head_dim
        keys = write_rows(keys, key[0], positions, valid, axis=1)
        values = write_rows(values, value[0].transpose(1, 2), positions, valid, axis=2)
        slots = torch.arange(keys.shape[1], device=query.device)
        mask = torch.where(slots[None, :] <= positions[:, None], 0.0, float("-inf"))  # [T, slots]
        groups = self.num_heads // self.num_kv_heads
        grouped = query[0].reshape(self.num_kv_heads, groups * length, dim)  # rows: (head in group, token)
        scores = (keys @ grouped.transpose(1, 2)).transpose(1, 2) * dim**-0.5 + mask.repeat(groups, 1)
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        out = (values @ weights.transpose(1, 2)).transpose(1, 2)  # [kv, groups * T, D]
        return out.reshape(batch, self.num_heads, length, dim), KVState(keys, values)


MODULE_SWAPS = (
    ModuleSwap(nn.Conv1d, ChannelSplitConv1d,
               f"DEPTHWISE_CONV_2D stalls in TFLite's builtin kernel above ~4,832 channels; split at "
               f"{MAX_DEPTHWISE_CHANNELS}"),
    ModuleSwap(CacheAttention, SliceCacheAttention,
               "KV writes by DYNAMIC_UPDATE_SLICE (in place where the runtime binds one buffer) instead of a one-hot "
               "matmul and a SELECT over the whole cache; caches as the left operand of attention's matmuls"),
)


# ------------------------------------------------------------------ the recurrent-state op

def decode_step(q, k, v, g, beta, state_t):
    """One token of the gated delta rule over the state stored transposed, state_t [Hv, V, K]
    (each head's S^T). The same math as gdr.recurrent_gated_delta_rule, with the decay folded in:
        d = exp(g);  S^T k, S^T q                     (products with the old state)
        delta = beta (v - d S^T k)
        S'^T = d S^T + delta k^T                      (one write of the state)
        o = S'^T q = d S^T q + (k . q) delta = [S^T q, delta] @ [d, k . q]
    S^T k and S^T q are a MUL and a SUM over key_dim each: as a matmul of the state with [k, q]
    (two columns) XNNPACK pads those two columns to its 32-wide tile, and at the 0.8B shape the
    matmul took 2-5x the time of the two passes. The output is a matmul rather than MUL, MUL,
    ADD: with the output an ADD, TFLite's builtin kernels (ai-edge-litert 2.3.0) returned a wrong o
    inside the whole layer (0.04 off; right with experimental_preserve_all_tensors, so their arena
    reused a buffer still needed). Returns (o [1, 1, Hv, V] fp32, the new state_t)."""
    value_heads = v.shape[2]
    q, k = gdr._group_key_heads(q, value_heads)[0, 0].float(), gdr._group_key_heads(k, value_heads)[0, 0].float()
    v, g, beta = v[0, 0].float(), g[0, 0].float(), beta[0, 0].float()  # [Hv, V], [Hv], [Hv]
    decay = g.exp()[:, None]  # [Hv, 1]
    from_k = (state_t * k[:, None, :]).sum(-1)  # [Hv, V]
    from_q = (state_t * q[:, None, :]).sum(-1)
    delta = beta[:, None] * (v - decay * from_k)  # [Hv, V]
    new_state = state_t * decay[..., None] + delta[..., :, None] * k[:, None, :]
    coefficients = torch.stack((decay[:, 0], (k * q).sum(-1)), dim=-1)[:, :, None]  # [Hv, 2, 1]
    out = (torch.stack((from_q, delta), dim=-1) @ coefficients)[..., 0]
    return out[None, None], new_state


def decompositions(chunk_size: int) -> dict:
    """The recurrent-state op as builtin ops over the transposed state (see the module doc)."""

    def decompose(q, k, v, g, beta, state_t):
        if q.shape[1] == 1:
            return decode_step(q, k, v, g, beta, state_t)
        out, final = gdr.chunked_gated_delta_rule(q, k, v, g, beta, state_t.transpose(1, 2)[None], chunk_size)
        return out, final[0].transpose(1, 2)

    return {torch.ops.qwen_mobile.gated_delta_rule.default: decompose}
