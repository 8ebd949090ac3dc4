"""Our export-ready model against transformers' Qwen3.5, logits at every position.

Bar: max |ours - theirs| <= 1e-4 x std(theirs), over >= 64 tokens, whether the sequence
goes in as one prefill, as uneven prefill chunks, or as a chunk then token-by-token decode.
"""

import pytest
import torch

from qwen_mobile.checkpoint import load
from qwen_mobile.models.qwen3_5 import DeltaNetState, KVState, state_tensors, state_to_tensors

LENGTH = 72
MAX_CONTEXT = 96
RELATIVE_TOLERANCE = 1e-4
SPLITS = {
    "one_prefill": [LENGTH],
    "uneven_chunks": [5, 17, 1, 30, 19],
    "chunk_then_decode": [23] + [1] * (LENGTH - 23),
    # static-shape runtimes: every call a 16-token chunk, the tail padded, with `length`
    "padded_chunks": [16, 16, 5, 16, 3, 16],
}
PADDED_CHUNK = 16
MODELS = ["embedded", "grouped3", "multimodal"]


def reference_logits(reference, tokens):
    with torch.no_grad():
        return reference(input_ids=tokens).logits[0].float()


def our_logits(model, tokens, splits, padded=False):
    """Logits at every position, the sequence fed in pieces of the given sizes (padded: each piece
    in a PADDED_CHUNK-token chunk whose tail is junk ids, with `length` saying where it ends)."""
    state = model.init_state(MAX_CONTEXT)
    pieces, start = [], 0
    junk = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for size in splits:
            chunk = tokens[:, start : start + size]
            length = None
            if padded:
                filler = torch.randint(0, model.config.vocab_size, (1, PADDED_CHUNK - size), generator=junk)
                chunk, length = torch.cat((chunk, filler), dim=1), torch.tensor([size])
            logits, state = model(chunk, torch.tensor([start]), state, length=length, all_positions=True)
            pieces.append(logits[0, :size])
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
    ours = our_logits(model, tokens, SPLITS[split], padded=split == "padded_chunks")
    assert ours.shape == theirs.shape
    error = (ours - theirs).abs().max().item()
    assert error <= RELATIVE_TOLERANCE * theirs.std().item(), f"max abs diff {error:.3g}, std {theirs.std():.3g}"


def test_padding_changes_no_state_and_picks_the_last_real_logits(loaded):
    """A padded chunk leaves exactly the state the unpadded chunk leaves, and returns its logits,
    also where the padding runs past the end of the context (8 slots here)."""
    model = loaded["grouped3"]
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.config.vocab_size, (1, 7), generator=generator)
    padded = torch.cat((tokens, torch.randint(0, model.config.vocab_size, (1, 9), generator=generator)), dim=1)
    with torch.no_grad():
        _, before = model(tokens[:, :3], torch.tensor([0]), model.init_state(8))
        plain, plain_state = model(tokens[:, 3:], torch.tensor([3]), before)
        masked, masked_state = model(padded[:, 3:], torch.tensor([3]), before, length=torch.tensor([4]))
    torch.testing.assert_close(masked, plain, rtol=1e-6, atol=1e-6)
    for name, tensor in state_to_tensors(plain_state).items():
        torch.testing.assert_close(state_to_tensors(masked_state)[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_forward_returns_last_position_only(loaded):
    model = loaded["grouped3"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        last, _ = model(tokens, torch.tensor([0]), model.init_state(16))
        every, _ = model(tokens, torch.tensor([0]), model.init_state(16), all_positions=True)
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
        _, dirty = model(first, torch.tensor([0]), model.init_state(32))
        reused, _ = model(second, torch.tensor([0]), dirty, all_positions=True)
        fresh, _ = model(second, torch.tensor([0]), model.init_state(32), all_positions=True)
    assert torch.equal(reused, fresh)


def test_recurrent_state_has_the_documented_layout(loaded):
    model = loaded["grouped3"]
    config = model.config
    state = model.init_state(32)
    linear = [s for t, s in zip(config.layer_types, state) if t == "linear_attention"]
    full = [s for t, s in zip(config.layer_types, state) if t == "full_attention"]
    assert all(isinstance(s, DeltaNetState) for s in linear) and all(isinstance(s, KVState) for s in full)
    assert linear[0].recurrent.shape == (
        1, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
    )
    assert linear[0].recurrent.dtype == torch.float32
    assert linear[0].conv.shape == (1, config.conv_dim, config.linear_conv_kernel_dim - 1)
    assert full[0].keys.shape == full[0].values.shape == (1, config.num_key_value_heads, 32, config.head_dim)
    names = list(state_to_tensors(state))
    assert names[:2] == ["layer0_conv_state", "layer0_recurrent_state"] and "layer3_key_cache" in names
    assert [t.name for t in state_tensors(config, 32)] == names
