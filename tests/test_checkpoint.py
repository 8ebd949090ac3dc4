"""Loading random_checkpoints: both layouts, all weight dtypes, and one-line errors for bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_mobile.checkpoint import EMBEDDED_NAME, load, open_checkpoint, resolve, stop_token_ids
from qwen_mobile.errors import QwenMobileError


@pytest.fixture
def copy_of(random_checkpoints, tmp_path):
    def make(name):
        target = tmp_path / name
        shutil.copytree(random_checkpoints[name][0], target)
        return target

    return make


def test_both_layouts_load_and_report_what_is_skipped(random_checkpoints):
    causal = open_checkpoint(str(random_checkpoints["grouped3"][0]))
    assert causal.config.model_type == "qwen3_5_text" and causal.config.skipped == ()
    multimodal = open_checkpoint(str(random_checkpoints["multimodal"][0]))
    assert multimodal.config.model_type == "qwen3_5"
    assert "vision tower" in multimodal.config.skipped
    assert multimodal.skipped_tensors > 0


def test_tied_and_untied_embeddings(random_checkpoints):
    tied = load(str(random_checkpoints["multimodal"][0])).model
    assert tied.lm_head.weight is tied.embed_tokens.weight
    untied = load(str(random_checkpoints["grouped3"][0])).model
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_dtypes_load_to_the_same_values(copy_of, dtype):
    path = copy_of("grouped3")
    weights = load_file(path / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    model = load(str(path)).model
    expected = weights["model.embed_tokens.weight"].to(dtype).float()
    assert model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(model.embed_tokens.weight, expected)


def test_embedded_model_is_the_default():
    path, source = resolve(None)
    assert source == EMBEDDED_NAME and (path / "config.json").is_file()
    assert stop_token_ids(open_checkpoint(None))


def expect_error(model_dir, *fragments):
    with pytest.raises(QwenMobileError) as raised:
        load(str(model_dir))
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_config(copy_of):
    path = copy_of("grouped3")
    (path / "config.json").unlink()
    expect_error(path, "config.json", "not found")


def test_corrupt_config(copy_of):
    path = copy_of("grouped3")
    (path / "config.json").write_text('{"model_type": "qwen3_5_text", ')
    expect_error(path, "config.json", "not valid JSON")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_other_model_type(copy_of):
    path = copy_of("grouped3")
    edit_config(path, model_type="llama")
    expect_error(path, "config.json", "model_type", "llama")


def test_missing_field(copy_of):
    path = copy_of("grouped3")
    edit_config(path, linear_num_value_heads=None)
    expect_error(path, "config.json", "linear_num_value_heads")


def test_missing_nested_field_names_text_config(copy_of):
    path = copy_of("multimodal")
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    expect_error(path, "text_config.hidden_size")


def test_value_heads_not_a_multiple_of_key_heads(copy_of):
    path = copy_of("grouped3")
    edit_config(path, linear_num_value_heads=5)
    expect_error(path, "linear_num_value_heads", "multiple")


def test_mismatched_tensor_shape(copy_of):
    path = copy_of("grouped3")
    edit_config(path, intermediate_size=100)
    expect_error(path, "model.safetensors", "mlp", "shape")


def test_truncated_safetensors(copy_of):
    path = copy_of("grouped3")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(path, "model.safetensors")


def test_missing_tensor(copy_of):
    path = copy_of("grouped3")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.2.linear_attn.A_log"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    expect_error(path, "model.layers.2.linear_attn.A_log".removeprefix("model."))


def test_missing_shard(copy_of):
    path = copy_of("multimodal")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    expect_error(path, shard.name, "missing")


def test_no_weights(copy_of):
    path = copy_of("grouped3")
    (path / "model.safetensors").unlink()
    expect_error(path, "model.safetensors")


def test_not_a_directory(tmp_path):
    with pytest.raises(QwenMobileError, match="no such directory"):
        resolve(str(tmp_path / "absent"))


def test_hub_id_offline_says_to_pass_a_directory(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # offline for sure (huggingface_hub read HF_HUB_OFFLINE at import), with an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QwenMobileError) as raised:
        resolve("Qwen/Qwen3.5-0.8B")
    assert "Qwen/Qwen3.5-0.8B" in str(raised.value) and "local directory" in str(raised.value)
    assert "\n" not in str(raised.value)
