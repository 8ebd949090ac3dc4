"""Qwen3.5's text decoder, written for export.

A hybrid stack: three of every four layers are Gated DeltaNet linear attention (a
causal depthwise conv, then the gated delta rule over an fp32 recurrent state), every
fourth is gated full attention over a KV cache. Every layer ends in a SwiGLU MLP.

State is explicit and functional: `forward(tokens, input_pos, state)` returns the new
state instead of mutating buffers, so each backend can keep it where it likes
(ExecuTorch mutable buffers, Core ML states, TFLite signature inputs/outputs).
`state` holds one named state per layer (`Qwen35.init_state` makes it):
    linear attention: DeltaNetState(conv [B, conv_dim, kernel-1], recurrent [B, value_heads, key_dim, value_dim] fp32)
    full attention:   KVState(keys [B, kv_heads, max_context, head_dim], values [same])
Every backend and the manifest name state tensors with `state_name` ("layer3_key_cache").

Static-shape runtimes feed fixed-size chunks: `forward(..., length=n)` says that only the
first n tokens are real. Padded tokens then change no state: they neither decay nor write
the recurrent state, the conv state keeps the last real inputs, no KV slot is written for
them, and the logits returned are the last real token's.

Parameter names follow the Hugging Face checkpoints, so weights load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.config import LINEAR_ATTENTION, Qwen35Config
from qwen_mobile.ops import gated_delta_rule  # noqa: F401  (registers torch.ops.qwen_mobile)


class DeltaNetState(NamedTuple):
    """A Gated DeltaNet layer's state, carried from call to call."""

    conv: torch.Tensor  # [B, conv_dim, kernel-1]: the last kernel-1 inputs of the causal conv
    recurrent: torch.Tensor  # [B, value_heads, key_dim, value_dim], fp32: the delta rule's memory


class KVState(NamedTuple):
    """A full-attention layer's cache: one slot per position of the context."""

    keys: torch.Tensor  # [B, kv_heads, max_context, head_dim]
    values: torch.Tensor  # [B, kv_heads, max_context, head_dim]


LayerState = DeltaNetState | KVState
# how each state field is named in artifacts and manifests ("layer{i}_" + this)
STATE_TENSOR_NAMES = {"conv": "conv_state", "recurrent": "recurrent_state", "keys": "key_cache", "values": "value_cache"}


def state_name(layer: int | str, field: str) -> str:
    return f"layer{layer}_{STATE_TENSOR_NAMES[field]}"


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the model's state, as every backend and manifest names and shapes it."""

    layer: int
    layer_type: str
    field: str  # a DeltaNetState or KVState field
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return state_name(self.layer, self.field)


def state_tensors(
    config: Qwen35Config, max_context: int, batch: int = 1, dtype: torch.dtype = torch.float32
) -> list[StateTensor]:
    """Every state tensor in layer order. The recurrent state is always fp32: it accumulates
    over the whole sequence, and low precision there compounds."""
    tensors = []
    for layer, layer_type in enumerate(config.layer_types):
        if layer_type == LINEAR_ATTENTION:
            conv = (batch, config.conv_dim, config.linear_conv_kernel_dim - 1)
            recurrent = (batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
            tensors += [StateTensor(layer, layer_type, "conv", conv, dtype),
                        StateTensor(layer, layer_type, "recurrent", recurrent, torch.float32)]
        else:
            cache = (batch, config.num_key_value_heads, max_context, config.head_dim)
            tensors += [StateTensor(layer, layer_type, field, cache, dtype) for field in KVState._fields]
    return tensors


def state_from_tensors(config: Qwen35Config, tensors: dict[str, torch.Tensor]) -> list[LayerState]:
    """Per-layer named state from tensors keyed by state_name (a runtime's flat inputs or buffers)."""
    return [
        (DeltaNetState if layer_type == LINEAR_ATTENTION else KVState)(
            *(tensors[state_name(layer, field)] for field in _state_type(layer_type)._fields)
        )
        for layer, layer_type in enumerate(config.layer_types)
    ]


def state_to_tensors(state: list[LayerState]) -> dict[str, torch.Tensor]:
    """The inverse of state_from_tensors: state_name -> tensor, in layer order."""
    return {state_name(layer, field): tensor for layer, named in enumerate(state) for field, tensor in named._asdict().items()}


def _state_type(layer_type: str) -> type:
    return DeltaNetState if layer_type == LINEAR_ATTENTION else KVState


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, with no op at all when it already is: a traced no-op cast is still a cast
    node, which some converters (coremltools) cannot take."""
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    """Qwen3.5's RMSNorm scales by (1 + w): the weight is stored zero-centred."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = _cast(x, torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return _cast(normed * (1.0 + _cast(self.weight, torch.float32)), x.dtype)


class GatedRMSNorm(nn.Module):
    """The DeltaNet output norm: w * rmsnorm(x) * silu(z). Its weight is not zero-centred."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = _cast(x, torch.float32)
        normed = _cast(x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)
        return _cast(self.weight * normed * F.silu(_cast(gate, torch.float32)), x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first rotary_dim channels of each head; the rest pass through."""
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


class RotaryEmbedding(nn.Module):
    """Partial rotary (25% of head_dim) in Qwen3.5's interleaved mRoPE layout.

    mRoPE draws each frequency's position from one of three streams (time, height,
    width), interleaved by `mrope_section`. For text every stream holds the token's
    position, so each frequency sees the same position and the layout reduces to
    ordinary RoPE over the rotary dims, which is what this computes.
    """

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.dim, self.theta = config.rotary_dim, config.rope_theta

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed per call, not kept as a buffer: export folds it into a constant, and a
        # model built on the meta device (see checkpoint.py) has no buffer to re-create
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim], rotate_half pairing
        return angles.cos(), angles.sin()


class CacheAttention(nn.Module):
    """Write this call's keys and values into a layer's KVState, then attend causally over it.

    A module of its own so that a backend can swap in fused kernels that keep the cache in
    their own layout (ExecuTorch: backends/executorch/swaps.py); it holds no weights.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, query, key, value, positions, cache: KVState, valid=None) -> tuple[torch.Tensor, KVState]:
        """query [B, heads, T, D], key/value [B, kv_heads, T, D] at `positions` [T]; `valid` [T]
        (bool, or None: all real) says which tokens may be written. Returns [B, heads, T, D]."""
        keys, values = (write_slots(c, new, positions, valid) for c, new in zip(cache, (key, value)))
        return self.attend(query, keys, values, positions), KVState(keys, values)

    def attend(self, query, keys, values, positions) -> torch.Tensor:
        """Causal GQA of query [B, heads, T, D] over a cache [B, kv_heads, slots, D] that already
        holds this call's keys and values: each query sees the slots up to its own position
        (later slots are stale or empty)."""
        # sizes from the module, not from traced shapes: a converter that traces (coremltools) then
        # sees constants, not arithmetic on sizes
        batch, dim = query.shape[0], self.head_dim
        slots = torch.arange(keys.shape[2], device=query.device)
        mask = torch.where(slots[None, :] <= positions[:, None], 0.0, float("-inf"))  # [T, slots]
        # GQA without copying the cache per query head (at the 0.8B shape, repeating the 2,048-slot
        # cache took 55% of an eager decode step): each KV head's query heads are stacked along rows
        groups = self.num_heads // self.num_kv_heads
        grouped = query.reshape(batch, self.num_kv_heads, -1, dim)
        scores = (grouped @ _cast(keys, query.dtype).transpose(-1, -2)) * dim**-0.5 + mask.repeat(groups, 1)
        weights = _cast(torch.softmax(_cast(scores, torch.float32), dim=-1), query.dtype)
        return (weights @ _cast(values, query.dtype)).reshape(batch, self.num_heads, -1, dim)


def write_slots(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, valid=None) -> torch.Tensor:
    """cache [B, H, slots, D] with new [B, H, T, D] written at slots `positions`.

    Unpadded calls copy by index. A padded static chunk writes with a one-hot matrix instead:
    static shapes and builtin ops only, exact (one product per written slot), padded tokens
    masked out, and positions past the cache (padding near the end of the context) match no
    slot, where an index copy would fail.
    """
    new = _cast(new, cache.dtype)
    if valid is None:
        return cache.index_copy(2, positions, new)
    slots = torch.arange(cache.shape[2], device=cache.device)
    write = _cast((slots[:, None] == positions[None, :]) & valid[None, :], cache.dtype)  # [slots, T]: slot <- token
    return torch.where(write.sum(-1, keepdim=True) > 0, write @ new, cache)


class GatedAttention(nn.Module):
    """Full attention with q/k norms, GQA, partial rotary and a sigmoid output gate."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        hidden = config.hidden_size
        # q_proj yields, per head, the query and then the output gate
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.cache_attention = CacheAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, positions, cache: KVState, valid=None) -> tuple[torch.Tensor, KVState]:
        batch, length, _ = x.shape
        query, gate = self.q_proj(x).view(batch, length, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        query = self.q_norm(query).transpose(1, 2)  # [B, H, T, D]
        key = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        value = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query = apply_partial_rotary(query, cos, sin, self.rotary_dim)
        key = apply_partial_rotary(key, cos, sin, self.rotary_dim)
        out, cache = self.cache_attention(query, key, value, positions, cache, valid)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = out * torch.sigmoid(gate.reshape(batch, length, -1))
        return self.o_proj(out), cache


class GatedDeltaNet(nn.Module):
    """Linear attention: conv over q/k/v, then the gated delta rule on a recurrent state."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.key_heads = config.linear_num_key_heads
        self.value_heads = config.linear_num_value_heads
        self.key_head_dim = config.linear_key_head_dim
        self.value_head_dim = config.linear_value_head_dim
        self.key_dim = config.linear_key_dim
        self.value_dim = config.linear_value_dim
        hidden = config.hidden_size
        self.in_proj_qkv = nn.Linear(hidden, config.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)  # output gate
        self.in_proj_b = nn.Linear(hidden, self.value_heads, bias=False)  # write strength beta
        self.in_proj_a = nn.Linear(hidden, self.value_heads, bias=False)  # decay input
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.linear_conv_kernel_dim, groups=config.conv_dim, bias=False
        )
        self.A_log = nn.Parameter(torch.zeros(self.value_heads))
        self.dt_bias = nn.Parameter(torch.ones(self.value_heads))
        self.norm = GatedRMSNorm(self.value_head_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def causal_conv(self, mixed: torch.Tensor, conv_state: torch.Tensor, length=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise causal conv + SiLU; the state carries the last kernel-1 inputs across calls
        (with `length`, the last kernel-1 inputs up to the last real token)."""
        keep = conv_state.shape[-1]
        window = torch.cat((conv_state, _cast(mixed.transpose(1, 2), conv_state.dtype)), dim=-1)
        out = F.silu(self.conv1d(_cast(window, mixed.dtype)))
        if length is None:
            return out.transpose(1, 2), window[..., window.shape[-1] - keep :]
        # window columns length .. length+keep-1 end at the last real token
        return out.transpose(1, 2), window.index_select(-1, length + torch.arange(keep, device=window.device))

    def forward(self, x, state: DeltaNetState, valid=None, length=None) -> tuple[torch.Tensor, DeltaNetState]:
        batch, tokens, _ = x.shape
        mixed, conv_state = self.causal_conv(self.in_proj_qkv(x), state.conv, length)
        query, key, value = mixed.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        query = l2_normalize(_cast(query.reshape(batch, tokens, self.key_heads, self.key_head_dim), torch.float32))
        query = query * self.key_head_dim**-0.5
        key = l2_normalize(_cast(key.reshape(batch, tokens, self.key_heads, self.key_head_dim), torch.float32))
        value = value.reshape(batch, tokens, self.value_heads, self.value_head_dim)

        beta = _cast(torch.sigmoid(self.in_proj_b(x)), torch.float32)
        decay = -_cast(self.A_log, torch.float32).exp() * F.softplus(
            _cast(self.in_proj_a(x), torch.float32) + _cast(self.dt_bias, torch.float32)
        )
        if valid is not None:  # a padded token neither decays nor writes the recurrent state
            real = _cast(valid, torch.float32)[None, :, None]
            beta, decay = beta * real, decay * real
        out, recurrent = torch.ops.qwen_mobile.gated_delta_rule(query, key, value, decay, beta, state.recurrent)

        z = self.in_proj_z(x).reshape(batch, tokens, self.value_heads, self.value_head_dim)
        out = self.norm(_cast(out, x.dtype), z)
        return self.out_proj(out.reshape(batch, tokens, self.value_dim)), DeltaNetState(conv_state, recurrent)


class MLP(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen35Config, layer_type: str):
        super().__init__()
        self.is_linear = layer_type == LINEAR_ATTENTION
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, state: LayerState, valid=None, length=None):
        normed = self.input_layernorm(x)
        if self.is_linear:
            mixed, state = self.linear_attn(normed, state, valid, length)
        else:
            mixed, state = self.self_attn(normed, cos, sin, positions, state, valid)
        x = x + mixed
        return x + self.mlp(self.post_attention_layernorm(x)), state


class Qwen35(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_state(self, max_context: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[LayerState]:
        """Zero state for a new sequence of up to max_context tokens (see state_tensors)."""
        tensors = {t.name: torch.zeros(t.shape, dtype=t.dtype) for t in state_tensors(self.config, max_context, batch, dtype)}
        return state_from_tensors(self.config, tensors)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        state: list[LayerState],
        length: torch.Tensor | None = None,
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """tokens [B, T] int64 at positions input_pos[0] .. input_pos[0]+T-1.

        `length` [1], for a padded static chunk: only the first `length` tokens are real (see
        the module doc); the logits are then those of position length-1.

        Returns the logits of the last (real) position [B, vocab] (or of every position,
        [B, T, vocab], with all_positions) and the new state. A call at input_pos 0
        starts a new sequence: the recurrent and conv states are zeroed here, so a
        stateful runtime needs no separate reset. KV caches need none: the mask never
        lets a query see a slot beyond its own position.
        """
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        positions = input_pos[:1] + steps
        valid = None if length is None else steps < length
        continuing = (input_pos[:1] > 0).float()
        x = self.embed_tokens(tokens)
        cos, sin = (_cast(t, x.dtype) for t in self.rotary(positions))  # as transformers rounds them
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            if layer.is_linear:
                layer_state = DeltaNetState(layer_state.conv * _cast(continuing, layer_state.conv.dtype),
                                            layer_state.recurrent * continuing)
            x, layer_state = layer(x, cos, sin, positions, layer_state, valid, length)
            new_state.append(layer_state)
        if not all_positions:
            x = x[:, -1] if length is None else x.index_select(1, length - 1)[:, 0]
        return self.lm_head(self.norm(x)), new_state
