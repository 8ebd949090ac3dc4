"""Our export-ready model against transformers' Qwen3.5, logits at every position.

Bar: max |ours - theirs| <= 1e-4 x std(theirs), over >= 64 tokens, whether the sequence
goes in as one prefill, as uneven prefill chunks, or as a chunk then token-by-token decode.
"""

import pytest
import torch

from qwen_mobile.checkpoint import load
from qwen_mobile.models.qwen3_5 import init_state

LENGTH = 72
MAX_CONTEXT = 96
RELATIVE_TOLERANCE = 1e-4
SPLITS = {
    "one_prefill": [LENGTH],
    "uneven_chunks": [5, 17, 1, 30, 19],
    "chunk_then_decode": [23] + [1] * (LENGTH - 23),
}
MODELS = ["embedded", "grouped3", "multimodal"]


def reference_logits(reference, tokens):
    with torch.no_grad():
        return reference(input_ids=tokens).logits[0].float()


def our_logits(model, tokens, splits):
    """Logits at every position, the sequence fed in pieces of the given sizes."""
    state = init_state(model.config, MAX_CONTEXT)
    pieces, start = [], 0
    with torch.no_grad():
        for size in splits:
            logits, state = model(tokens[:, start : start + size], torch.tensor([start]), state, all_positions=True)
            pieces.append(logits[0])
            start += size
    assert start == tokens.shape[1]
    return torch.cat(pieces)


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {name: load(str(path)).model for name, (path, _) in checkpoints.items()}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers_at_every_position(name, split, checkpoints, loaded):
    _, reference = checkpoints[name]
    model = loaded[name]
    tokens = torch.randint(3, model.config.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(7))
    theirs = reference_logits(reference, tokens)
    ours = our_logits(model, tokens, SPLITS[split])
    assert ours.shape == theirs.shape
    error = (ours - theirs).abs().max().item()
    assert error <= RELATIVE_TOLERANCE * theirs.std().item(), f"max abs diff {error:.3g}, std {theirs.std():.3g}"


def test_forward_returns_last_position_only(loaded):
    model = loaded["grouped3"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        last, _ = model(tokens, torch.tensor([0]), init_state(model.config, 16))
        every, _ = model(tokens, torch.tensor([0]), init_state(model.config, 16), all_positions=True)
    assert last.shape == (1, model.config.vocab_size)
    # the same math on a [1, H] vs [1, T, H] matmul: equal up to float rounding only
    torch.testing.assert_close(last, every[:, -1], rtol=1e-6, atol=1e-6)


def test_new_sequence_at_position_zero_ignores_old_state(loaded):
    """A stateful runtime reuses its buffers: starting again at input_pos 0 must not leak the last sequence."""
    model = loaded["grouped3"]
    generator = torch.Generator().manual_seed(3)
    first = torch.randint(0, model.config.vocab_size, (1, 20), generator=generator)
    second = torch.randint(0, model.config.vocab_size, (1, 12), generator=generator)
    with torch.no_grad():
        _, dirty = model(first, torch.tensor([0]), init_state(model.config, 32))
        reused, _ = model(second, torch.tensor([0]), dirty, all_positions=True)
        fresh, _ = model(second, torch.tensor([0]), init_state(model.config, 32), all_positions=True)
    assert torch.equal(reused, fresh)


def test_recurrent_state_has_the_documented_layout(loaded):
    config = loaded["grouped3"].config
    state = init_state(config, 32)
    linear = [s for t, s in zip(config.layer_types, state) if t == "linear_attention"]
    full = [s for t, s in zip(config.layer_types, state) if t == "full_attention"]
    conv, recurrent = linear[0]
    assert recurrent.shape == (1, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
    assert recurrent.dtype == torch.float32
    assert conv.shape == (1, config.conv_dim, config.linear_conv_kernel_dim - 1)
    assert full[0][0].shape == (1, config.num_key_value_heads, 32, config.head_dim)
