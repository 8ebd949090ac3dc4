"""The recurrent-state op: its two implementations agree with each other and with transformers."""

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

from qwen_mobile.ops.gated_delta_rule import (
    _unit_lower_inverse,
    chunked_gated_delta_rule,
    decompositions,
    recurrent_gated_delta_rule,
)

TOLERANCE = 1e-5
LENGTHS = [1, 7, 64, 200]


def random_inputs(length, key_heads=2, groups=2, key_dim=32, value_dim=24, batch=2, seed=0):
    """Raw q/k as a projection gives them, and the normalised q/k the op takes."""
    generator = torch.Generator().manual_seed(seed)
    value_heads = key_heads * groups

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q, k = randn(batch, length, key_heads, key_dim), randn(batch, length, key_heads, key_dim)
    v = randn(batch, length, value_heads, value_dim)
    g = -torch.rand(batch, length, value_heads, generator=generator) * 2  # log-decay <= 0
    beta = torch.rand(batch, length, value_heads, generator=generator)
    state = randn(batch, value_heads, key_dim, value_dim)
    q_op, k_op = l2norm(q) * key_dim**-0.5, l2norm(k)
    return (q, k), (q_op, k_op, v, g, beta, state)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_matches_recurrent(length, groups):
    _, args = random_inputs(length, groups=groups)
    out_ref, state_ref = recurrent_gated_delta_rule(*args)
    for chunk in (16, 64):
        out, state = chunked_gated_delta_rule(*args, chunk_size=chunk)
        assert max_diff(out, out_ref) <= TOLERANCE
        assert max_diff(state, state_ref) <= TOLERANCE


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("length", LENGTHS)
def test_both_match_transformers(length, groups):
    (q, k), args = random_inputs(length, groups=groups, seed=1)
    _, _, v, g, beta, state = args
    common = dict(initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    hf_rec = torch_recurrent_gated_delta_rule(q, k, v, g, beta, **common)
    hf_chunk = torch_chunk_gated_delta_rule(q, k, v, g, beta, **common)
    ours_rec = recurrent_gated_delta_rule(*args)
    ours_chunk = chunked_gated_delta_rule(*args)
    for ours, theirs in ((ours_rec, hf_rec), (ours_chunk, hf_chunk), (ours_chunk, hf_rec)):
        assert max_diff(ours[0], theirs[0]) <= TOLERANCE
        assert max_diff(ours[1], theirs[1]) <= TOLERANCE


def test_strong_decay_does_not_overflow():
    """Within a chunk the cumulative log-decay reaches hundreds; exp of it must never be taken
    in a way that overflows (the decay ratios are formed as exp of differences)."""
    _, (q, k, v, g, beta, state) = random_inputs(64)
    g = g * 100
    out, final = chunked_gated_delta_rule(q, k, v, g, beta, state)
    out_ref, final_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert max_diff(out, out_ref) <= TOLERANCE and max_diff(final, final_ref) <= TOLERANCE


@pytest.mark.parametrize("size", [1, 2, 5, 16, 64])
def test_unit_lower_inverse_is_the_inverse(size):
    strict = torch.randn(size, size, dtype=torch.float64).tril(-1) * 0.5
    expected = torch.linalg.inv(torch.eye(size, dtype=torch.float64) - strict)
    assert torch.allclose(_unit_lower_inverse(strict), expected, atol=1e-9)


def test_op_dispatches_and_matches_reference():
    _, args = random_inputs(40)
    out, state = torch.ops.qwen_mobile.gated_delta_rule(*args)
    out_ref, state_ref = recurrent_gated_delta_rule(*args)
    assert max_diff(out, out_ref) <= TOLERANCE and max_diff(state, state_ref) <= TOLERANCE


class OpModule(torch.nn.Module):
    def forward(self, q, k, v, g, beta, state):
        return torch.ops.qwen_mobile.gated_delta_rule(q, k, v, g, beta, state)


def test_export_keeps_one_node_and_decomposes_to_builtin_ops():
    _, args = random_inputs(20)
    program = torch.export.export(OpModule(), args)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.qwen_mobile.gated_delta_rule.default) == 1

    lowered = program.run_decompositions(decompositions(chunk_size=8))
    names = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not any("qwen_mobile" in name for name in names)
    assert not any("triangular" in name or "linalg" in name for name in names)
    out, state = lowered.module()(*args)
    out_ref, state_ref = recurrent_gated_delta_rule(*args)
    assert max_diff(out, out_ref) <= TOLERANCE and max_diff(state, state_ref) <= TOLERANCE
