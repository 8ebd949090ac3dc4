"""The gated delta rule: Gated DeltaNet's recurrent-state update, as one torch custom op.

Per value head, with a key-dim x value-dim state S (fp32) and per token t:

    S_t = exp(g_t) * S_{t-1}                       # gated decay (g_t <= 0 is a log-decay)
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T   # delta rule: write only what S_t mispredicts
    o_t = S_t^T q_t

q and k come in already l2-normalised (and q already scaled by key_dim**-0.5): the
op is the recurrence only, so every backend sees the same small contract.

Layouts (the layout of transformers' Qwen3.5 and of the projections that feed it):
    q, k   [batch, T, key_heads, key_dim]
    v      [batch, T, value_heads, value_dim]
    g,beta [batch, T, value_heads]
    state  [batch, value_heads, key_dim, value_dim]   (fp32)
value_heads is a multiple of key_heads: each key head serves value_heads // key_heads
consecutive value heads (the 9B has two value heads per key head).

Returns (o [batch, T, value_heads, value_dim] fp32, final state).

Two implementations of the same math:
- `recurrent_gated_delta_rule`: token by token, the reference (and a decode step);
- `chunked_gated_delta_rule`: C tokens at a time, matmul-parallel inside a chunk, made
  only of ops every backend has (matmul, exp, cumsum, masks, elementwise). No
  triangular solve: the unit-lower-triangular chunk system is inverted with a fixed
  number of matmuls (see `_unit_lower_inverse`). Core ML and TFLite lower exactly this.

Where backends attach their lowering
------------------------------------
`torch.export` keeps `torch.ops.qwen_mobile.gated_delta_rule` as one graph node (the
fake kernel below gives it shapes). Each backend then decides, in its own folder
under `qwen_mobile/backends/`, what that node becomes:
- a native kernel (ExecuTorch's `llama::gated_delta_rule`) by rewriting the node;
- builtin ops, by `exported_program.run_decompositions(decompositions(chunk_size))`,
  which replaces the node with `chunked_gated_delta_rule` traced for static shapes;
- a converter registered for the op name `qwen_mobile::gated_delta_rule` (Core ML MIL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 64


def _group_key_heads(x: torch.Tensor, value_heads: int) -> torch.Tensor:
    """[B, T, Hk, D] -> [B, T, Hv, D]: each key head serves Hv // Hk consecutive value heads."""
    return x.repeat_interleave(value_heads // x.shape[2], dim=2)


def _heads_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """[B, T, H, ...] -> [B, H, T, ...] in fp32, the layout the recurrence runs in."""
    return [t.transpose(1, 2).to(torch.float32) for t in tensors]


def recurrent_gated_delta_rule(q, k, v, g, beta, state):
    """Reference: one token at a time, exactly the recurrence in the module docstring."""
    value_heads = v.shape[2]
    q, k = _group_key_heads(q, value_heads), _group_key_heads(k, value_heads)
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    state = state.to(torch.float32)
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t]
        prediction = (state * k_t[..., None]).sum(-2)  # S^T k
        delta = beta[:, :, t, None] * (v[:, :, t] - prediction)
        state = state + k_t[..., :, None] * delta[..., None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(-2))  # S^T q
    return torch.stack(outputs, dim=1), state


def _unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """(I - N)^-1 for strictly lower-triangular N [.., C, C], in ceil(log2 C) doublings.

    N is nilpotent (N^C = 0), so (I - N)^-1 = sum_i N^i = prod_j (I + N^(2^j)). This
    needs only matmuls: no triangular solve, which Core ML and TFLite lack.
    """
    size = strict_lower.shape[-1]
    eye = torch.eye(size, dtype=strict_lower.dtype, device=strict_lower.device)
    inverse = eye + strict_lower
    power = strict_lower
    span = 2
    while span < size:
        power = power @ power
        inverse = inverse + inverse @ power
        span *= 2
    return inverse


def chunked_gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """The same recurrence, C tokens at a time (the UT/WY form of the DeltaNet papers).

    Inside a chunk, with b = cumsum(g), decay(i <- j) = exp(b_i - b_j) for j <= i, and
    S_0 the state entering the chunk, the per-token updates u_j solve the unit
    lower-triangular system
        u_j + beta_j * sum_{m<j} decay(j <- m) (k_j . k_m) u_m = beta_j (v_j - exp(b_j) S_0^T k_j)
    after which outputs and the next state are plain matmuls:
        o_i   = exp(b_i) S_0^T q_i + sum_{j<=i} decay(i <- j) (q_i . k_j) u_j
        S_C   = exp(b_C) S_0 + sum_j decay(C <- j) k_j u_j^T
    The sequence is zero-padded to a multiple of C: a padded token has g = 0 and
    beta = 0, so it neither decays nor writes the state.
    """
    batch, length, _, _ = q.shape
    value_heads = v.shape[2]
    q, k = _group_key_heads(q, value_heads), _group_key_heads(k, value_heads)
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    state = state.to(torch.float32)

    pad = (chunk_size - length % chunk_size) % chunk_size
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    chunks = (length + pad) // chunk_size

    def by_chunk(x):  # [B, H, T, ...] -> [B, H, chunks, C, ...]
        return x.reshape(batch, value_heads, chunks, chunk_size, *x.shape[3:])

    q, k, v, g, beta = map(by_chunk, (q, k, v, g, beta))
    log_decay = g.cumsum(-1)  # b_i
    # decay(i <- j) for j <= i, 0 above the diagonal; exp of a difference never overflows
    ones = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device)
    causal, strictly_causal = ones.tril(), ones.tril(-1)
    pairwise = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    k_beta = k * beta[..., None]
    system = _unit_lower_inverse(-(k_beta @ k.transpose(-1, -2)) * pairwise.masked_fill(~strictly_causal, 0.0))
    updates_from_values = system @ (v * beta[..., None])  # the u_j if S_0 were 0
    updates_per_state = system @ (k_beta * log_decay.exp()[..., None])  # u_j = first - this @ S_0
    attention = (q @ k.transpose(-1, -2)) * pairwise
    q_decayed = q * log_decay.exp()[..., None]
    decay_to_end = (log_decay[..., -1:] - log_decay).exp()  # decay(C <- j)
    k_to_end = k * decay_to_end[..., None]
    chunk_decay = log_decay[..., -1].exp()[..., None, None]

    outputs = []
    for c in range(chunks):
        updates = updates_from_values[:, :, c] - updates_per_state[:, :, c] @ state
        outputs.append(q_decayed[:, :, c] @ state + attention[:, :, c] @ updates)
        state = chunk_decay[:, :, c] * state + k_to_end[:, :, c].transpose(-1, -2) @ updates

    out = torch.stack(outputs, dim=2).reshape(batch, value_heads, chunks * chunk_size, -1)
    return out[:, :, :length].transpose(1, 2), state


@torch.library.custom_op("qwen_mobile::gated_delta_rule", mutates_args=())
def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager kernel: a decode step runs the recurrence, a prefill runs chunked."""
    if q.shape[1] == 1:
        out, final = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    else:
        out, final = chunked_gated_delta_rule(q, k, v, g, beta, state)
    return out.contiguous(), final.contiguous()


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, state):
    batch, length, value_heads, value_dim = v.shape
    out = q.new_empty((batch, length, value_heads, value_dim), dtype=torch.float32)
    return out, state.new_empty(state.shape, dtype=torch.float32)


def decompositions(chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
    """A decomposition table that turns the op into builtin ops (static shapes only:
    the chunk loop is unrolled at trace time)."""

    def decompose(q, k, v, g, beta, state):
        if q.shape[1] == 1:
            return recurrent_gated_delta_rule(q, k, v, g, beta, state)
        return chunked_gated_delta_rule(q, k, v, g, beta, state, chunk_size)

    return {torch.ops.qwen_mobile.gated_delta_rule.default: decompose}
