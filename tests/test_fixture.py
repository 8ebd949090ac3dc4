"""Random checkpoints at the real Qwen3.5 shapes."""

import json

import pytest
import torch

from qwen_mobile.checkpoint import load
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.fixture import SHAPES_DIR, shapes, write_fixture
from qwen_mobile.info import describe



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
