"""Every change the ExecuTorch lowering makes to the core model, in one place.

- MODULE_SWAPS (applied with qwen_mobile.swaps.swapped while the program is traced):
  each full-attention layer's CacheAttention becomes NativeCacheAttention, ExecuTorch's
  fused llama::update_cache + llama::custom_sdpa over caches it updates in place.
- OP_SWAPS (a decomposition table run on the exported program): the core's recurrent-state
  op becomes ExecuTorch's native llama::gated_delta_rule kernel, and rewrites.REWRITES
  restate the views and concatenations XNNPACK would leave out in forms it delegates.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_mobile.models.qwen3_5 import CacheAttention, KVState
from qwen_mobile.swaps import ModuleSwap

from .rewrites import REWRITES
from .runtime import register_llama_kernels


class NativeCacheAttention(nn.Module):
    """CacheAttention on ExecuTorch's fused kernels, over caches [1, max_context, kv_heads, head_dim]
    (their layout, not the core's) updated in place.

    llama::update_cache writes the new keys/values at start_pos, and llama::custom_sdpa
    attends causally over slots 0..start_pos+T-1 only, where the core's plain attention
    reads all max_context slots through a mask: decode cost then grows with the position
    instead of always paying for the whole cache. The program's length is dynamic and
    never padded, so `valid` is always None here.
    """

    def forward(self, query, key, value, positions, cache: KVState, valid=None) -> tuple[torch.Tensor, KVState]:
        keys, values = cache
        start = positions[0].item()
        torch._check_is_size(start)
        torch._check(start < keys.shape[1])
        torch.ops.llama.update_cache(key.transpose(1, 2).contiguous(), keys, start)
        torch.ops.llama.update_cache(value.transpose(1, 2).contiguous(), values, start)
        out = torch.ops.llama.custom_sdpa(query.transpose(1, 2).contiguous(), keys, values, start, None, 0.0, True)
        return out.transpose(1, 2), cache


def native_cache_attention(original: CacheAttention) -> NativeCacheAttention:
    register_llama_kernels()
    return NativeCacheAttention()


MODULE_SWAPS = (
    ModuleSwap(CacheAttention, native_cache_attention,
               "fused llama::update_cache + llama::custom_sdpa: decode reads only the slots up to its position"),
)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x [B, T, heads, D] with each head repeated `groups` times in a row (repeat_interleave
    on dim 2), as a concatenation of views: repeat_interleave lowers to unsqueeze_copy and
    expand_copy, neither of which executorch 1.5.1's XNNPACK partitioner claims (the
    concatenation of one view with itself is delegated through rewrites.cat_of_distinct_inputs)."""
    batch, length, heads, dim = x.shape
    stacked = torch.cat([x.view(batch, length, heads, 1, dim)] * groups, dim=3)
    return stacked.view(batch, length, heads * groups, dim)


def native_gated_delta_rule(q, k, v, g, beta, state):
    """qwen_mobile::gated_delta_rule expressed with ExecuTorch's llama::gated_delta_rule.

    The two contracts differ in layout, grouping and decay: ours is [B, T, H, D] with
    q/k per key head and a log decay; the native kernel wants [B, H, T, D], a decay
    already exponentiated, and k per state (= value) head. Its own grouping shares one
    state among several query heads, which is not Qwen3.5's (several value heads, each
    with its own state, share one key head), so q and k are repeated to value heads here.
    """
    register_llama_kernels()
    groups = v.shape[2] // q.shape[2]
    q, k = (repeat_heads(x, groups) if groups > 1 else x for x in (q, k))
    out, final = torch.ops.llama.gated_delta_rule.default(
        *(x.float().transpose(1, 2) for x in (q, k, v, g.exp(), beta)), state.float()
    )
    return out.transpose(1, 2), final


OP_SWAPS = {torch.ops.qwen_mobile.gated_delta_rule.default: native_gated_delta_rule, **REWRITES}
