"""Random checkpoints at the real Qwen3.5 shapes."""

import json

import pytest
import torch

from qwen_mobile.checkpoint import load
from qwen_mobile.config import Qwen35Config
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.fixture import SHAPES_DIR, random_tensor, shapes, write_fixture
from qwen_mobile.info import describe
from qwen_mobile.models.qwen3_5 import Qwen35


def test_all_four_shapes_are_shipped():
    assert shapes() == ["0.8b", "2b", "4b", "9b"]


def test_0_8b_fixture_loads_runs_and_has_the_real_size(tmp_path):
    out = write_fixture("0.8b", tmp_path / "fx")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(name.startswith("model.language_model.") for name in index["weight_map"])
    loaded = load(str(out), dtype=torch.bfloat16)
    params = describe(loaded.checkpoint)["parameters"]["total"]
    assert 0.70e9 < params < 0.80e9  # the 0.8B's text decoder with its tied 248k x 1024 embedding
    with torch.no_grad():
        logits, _ = loaded.model(
            torch.tensor([[1, 2, 3]]), torch.tensor([0]), loaded.model.init_state(8, dtype=torch.bfloat16)
        )
    assert logits.shape == (1, 248320) and torch.isfinite(logits).all()


def test_9b_shape_groups_two_value_heads_per_key_head():
    config = json.loads((SHAPES_DIR / "9b.json").read_text())["text_config"]
    assert config["linear_num_value_heads"] == 2 * config["linear_num_key_heads"]


def test_fixture_refuses_to_overwrite(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(QwenMobileError, match="already exists"):
        write_fixture("0.8b", tmp_path / "taken")


def _scores_and_logits_std(peaked: bool) -> tuple[float, float]:
    """One full-attention layer at the 0.8B's head shapes: the spread of q.k / sqrt(d) over a
    64-token prompt, and of the last position's logits."""
    raw = json.loads((SHAPES_DIR / "0.8b.json").read_text())
    raw["text_config"].update(num_hidden_layers=4, vocab_size=512, intermediate_size=256, eos_token_id=1)
    model = Qwen35(Qwen35Config.from_dict(raw)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(random_tensor(name, tuple(parameter.shape), generator, peaked))
    attention = model.layers[3].self_attn
    seen = {}
    attention.q_norm.register_forward_hook(lambda module, args, out: seen.__setitem__("q", out))
    attention.k_norm.register_forward_hook(lambda module, args, out: seen.__setitem__("k", out))
    tokens = torch.randint(0, 512, (1, 64), generator=generator)
    with torch.no_grad():
        logits, _ = model(tokens, torch.tensor([0]), model.init_state(64))
    q, k = seen["q"][0, :, 0], seen["k"][0, :, 0]  # [T, head_dim]: the first head of each
    scores = q @ k.T / q.shape[-1] ** 0.5
    return scores.std().item(), logits.std().item()


def test_peaked_fixture_sharpens_attention_and_logits_by_its_documented_gains():
    plain_scores, plain_logits = _scores_and_logits_std(peaked=False)
    peaked_scores, peaked_logits = _scores_and_logits_std(peaked=True)
    assert 0.5 < plain_scores < 2  # random weights: q.k / sqrt(d) of std ~1, near-uniform attention
    assert 3.2 < peaked_scores / plain_scores < 4.8  # q and k gains of 2 each
    assert 6.4 < peaked_logits / plain_logits < 9.6  # final norm gain of 8
