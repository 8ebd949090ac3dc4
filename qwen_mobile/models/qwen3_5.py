"""Qwen3.5's text decoder, written for export.

A hybrid stack: three of every four layers are Gated DeltaNet linear attention (a
causal depthwise conv, then the gated delta rule over an fp32 recurrent state), every
fourth is gated full attention over a KV cache. Every layer ends in a SwiGLU MLP.

State is explicit and functional: `forward(tokens, input_pos, state)` returns the new
state instead of mutating buffers, so each backend can keep it where it likes
(ExecuTorch mutable buffers, Core ML states, TFLite signature inputs/outputs).
`state` has one pair of tensors per layer:
    linear attention: (conv_state [B, conv_dim, kernel-1], recurrent [B, value_heads, key_dim, value_dim] fp32)
    full attention:   (keys [B, kv_heads, max_context, head_dim], values [same])
Parameter names follow the Hugging Face checkpoints, so weights load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.config import LINEAR_ATTENTION, Qwen35Config
from qwen_mobile.ops import gated_delta_rule  # noqa: F401  (registers torch.ops.qwen_mobile)

LayerState = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Qwen3.5's RMSNorm scales by (1 + w): the weight is stored zero-centred."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """The DeltaNet output norm: w * rmsnorm(x) * silu(z). Its weight is not zero-centred."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of each head; the rest pass through."""
    rotary_dim = cos.shape[-1]
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


class GatedAttention(nn.Module):
    """Full attention with q/k norms, GQA, partial rotary and a sigmoid output gate."""

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        # q_proj yields, per head, the query and then the output gate
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache: LayerState) -> tuple[torch.Tensor, LayerState]:
        batch, length, _ = x.shape
        query, gate = self.q_proj(x).view(batch, length, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        query = self.q_norm(query).transpose(1, 2)  # [B, H, T, D]
        key = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        value = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query, key = apply_partial_rotary(query, cos, sin), apply_partial_rotary(key, cos, sin)
        out, cache = self.attend(query, key, value, positions, cache)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = out * torch.sigmoid(gate.reshape(batch, length, -1))
        return self.o_proj(out), cache

    def attend(self, query, key, value, positions, cache: LayerState) -> tuple[torch.Tensor, LayerState]:
        """Write key/value [B, kv_heads, T, D] into the cache at `positions`, attend over it.

        Returns [B, heads, T, D] and the new cache. A backend may override this with fused
        kernels that keep the cache in their own layout (see backends/executorch/lower.py).
        """
        keys, values = cache
        keys = keys.index_copy(2, positions, key.to(keys.dtype))
        values = values.index_copy(2, positions, value.to(values.dtype))
        return self.attend_cache(query, keys, values, positions), (keys, values)

    def attend_cache(self, query, keys, values, positions) -> torch.Tensor:
        """Causal GQA of query [B, heads, T, D] over a cache [B, kv_heads, slots, D] that already
        holds this call's keys and values: each query sees the slots up to its own position
        (later slots are stale or empty)."""
        batch, heads, length, dim = query.shape
        slots = torch.arange(keys.shape[2], device=query.device)
        mask = torch.where(slots[None, :] <= positions[:, None], 0.0, float("-inf"))  # [T, slots]
        # GQA without copying the cache per query head (at the 0.8B shape, repeating the 2,048-slot
        # cache took 55% of an eager decode step): each KV head's query heads are stacked along rows
        groups = heads // self.num_kv_heads
        grouped = query.reshape(batch, self.num_kv_heads, groups * length, dim)
        scores = (grouped @ keys.to(query.dtype).transpose(-1, -2)) * dim**-0.5 + mask.repeat(groups, 1)
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return (weights @ values.to(query.dtype)).reshape(batch, heads, length, dim)


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

    def causal_conv(self, mixed: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depthwise causal conv + SiLU; the state carries the last kernel-1 inputs across calls."""
        window = torch.cat((conv_state, mixed.transpose(1, 2).to(conv_state.dtype)), dim=-1)
        out = F.silu(F.conv1d(window.to(mixed.dtype), self.conv1d.weight, groups=window.shape[1]))
        return out.transpose(1, 2), window[..., window.shape[-1] - conv_state.shape[-1] :]

    def forward(self, x, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        batch, length, _ = x.shape
        conv_state, recurrent = state
        mixed, conv_state = self.causal_conv(self.in_proj_qkv(x), conv_state)
        query, key, value = mixed.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        query = l2_normalize(query.reshape(batch, length, self.key_heads, self.key_head_dim).float())
        query = query * self.key_head_dim**-0.5
        key = l2_normalize(key.reshape(batch, length, self.key_heads, self.key_head_dim).float())
        value = value.reshape(batch, length, self.value_heads, self.value_head_dim)

        beta = torch.sigmoid(self.in_proj_b(x)).float()
        decay = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias.float())
        out, recurrent = torch.ops.qwen_mobile.gated_delta_rule(query, key, value, decay, beta, recurrent)

        z = self.in_proj_z(x).reshape(batch, length, self.value_heads, self.value_head_dim)
        out = self.norm(out.to(x.dtype), z)
        return self.out_proj(out.reshape(batch, length, self.value_dim)), (conv_state, recurrent)


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

    def forward(self, x, cos, sin, positions, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        normed = self.input_layernorm(x)
        if self.is_linear:
            mixed, state = self.linear_attn(normed, state)
        else:
            mixed, state = self.self_attn(normed, cos, sin, positions, state)
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

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        state: list[LayerState],
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """tokens [B, T] int64 at positions input_pos[0] .. input_pos[0]+T-1.

        Returns the logits of the last position [B, vocab] (or of every position,
        [B, T, vocab], with all_positions) and the new state. A call at input_pos 0
        starts a new sequence: the recurrent and conv states are zeroed here, so a
        stateful runtime needs no separate reset. KV caches need none: the mask never
        lets a query see a slot beyond its own position.
        """
        positions = input_pos[:1] + torch.arange(tokens.shape[1], device=tokens.device)
        continuing = (input_pos[:1] > 0).float()
        x = self.embed_tokens(tokens)
        cos, sin = (t.to(x.dtype) for t in self.rotary(positions))  # as transformers rounds them
        new_state = []
        for layer, (first, second) in zip(self.layers, state):
            if layer.is_linear:
                first = first * continuing.to(first.dtype)
                second = second * continuing
            x, layer_state = layer(x, cos, sin, positions, (first, second))
            new_state.append(layer_state)
        x = self.norm(x if all_positions else x[:, -1])
        return self.lm_head(x), new_state


def init_state(
    config: Qwen35Config, max_context: int, batch: int = 1, dtype: torch.dtype = torch.float32
) -> list[LayerState]:
    """Zero state for a new sequence. The recurrent state is always fp32: it accumulates
    over the whole sequence, and low precision there compounds."""
    state = []
    for layer_type in config.layer_types:
        if layer_type == LINEAR_ATTENTION:
            conv = torch.zeros(batch, config.conv_dim, config.linear_conv_kernel_dim - 1, dtype=dtype)
            recurrent = torch.zeros(
                batch,
                config.linear_num_value_heads,
                config.linear_key_head_dim,
                config.linear_value_head_dim,
                dtype=torch.float32,
            )
            state.append((conv, recurrent))
        else:
            shape = (batch, config.num_key_value_heads, max_context, config.head_dim)
            state.append((torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)))
    return state
