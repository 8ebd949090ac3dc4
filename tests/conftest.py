"""Random Qwen3.5 checkpoints written by transformers itself, so loading is tested on real files."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from qwen_mobile.backends.tflite.runtime import CACHE_ENV
from qwen_mobile.checkpoint import EMBEDDED_MODEL, load

# Configurations the faithfulness bar names, beside the embedded model:
# - "grouped3": 3 value heads per key head, untied embeddings, 6 layers (not a multiple of 4),
#   Qwen3_5ForCausalLM layout, fp32 weights;
# - "multimodal": Qwen3_5ForConditionalGeneration layout (decoder under model.language_model,
#   a vision tower to skip), 2 value heads per key head, tied embeddings, 5 layers, bf16 weights.
TEXT_CONFIGS = {
    "grouped3": dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=8,
        max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    ),
    "multimodal": dict(
        vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=5,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    ),
}
VISION_CONFIG = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, patch_size=4)


@pytest.fixture(scope="session", autouse=True)
def weight_cache(tmp_path_factory):
    """Where TFLite runs keep XNNPACK's packed weights ($QWEN_MOBILE_CACHE): the tests' own
    directory, never the user's ~/.cache."""
    directory = tmp_path_factory.mktemp("xnnpack-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(directory))
        yield directory


@pytest.fixture(scope="module")
def model():
    """The embedded model, loaded once per test module (a module may swap its weights for a while)."""
    return load(None).model.eval()


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms at identity and decays to one value; spread them out
    so a model that skipped the (1 + w), the gate or the per-head decay would show it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("norm", "A_log", "dt_bias")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def make_reference(name: str, seed: int = 0):
    torch.manual_seed(seed)
    text = transformers.Qwen3_5TextConfig(**TEXT_CONFIGS[name])
    if name == "multimodal":
        config = transformers.Qwen3_5Config(
            text_config=text.to_dict(), vision_config=VISION_CONFIG, tie_word_embeddings=True
        )
        config._attn_implementation = "eager"
        model = transformers.Qwen3_5ForConditionalGeneration(config)
    else:
        text._attn_implementation = "eager"
        model = transformers.Qwen3_5ForCausalLM(text)
    perturb_(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def random_checkpoints(tmp_path_factory) -> dict:
    """name -> (checkpoint dir, transformers reference model in fp32, eager attention)."""
    made = {}
    for name in TEXT_CONFIGS:
        model = make_reference(name)
        path = tmp_path_factory.mktemp(name)
        if name == "multimodal":
            # bf16 on disk; the reference keeps the same bf16-rounded weights in fp32, but not
            # rounded buffers (model.to(bf16) would also round the rotary frequencies)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter.to(torch.bfloat16))
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")  # sharded
        else:
            model.save_pretrained(path)
        made[name] = (path, model)
    return made


@pytest.fixture(scope="session")
def checkpoints(random_checkpoints) -> dict:
    """The random checkpoints and the embedded model, each with its transformers reference."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        EMBEDDED_MODEL, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return {**random_checkpoints, "embedded": (EMBEDDED_MODEL, reference)}


@pytest.fixture(scope="session")
def embedded_bundle(tmp_path_factory):
    """(backend, quant) -> a bundle of the embedded model written by the real export path, once per
    test session and shared by every module that asks for it. Tests that change a bundle copy it."""
    from qwen_mobile.export import export_bundle

    made = {}

    def bundle(backend: str, quant: str):
        if (backend, quant) not in made:
            made[backend, quant] = export_bundle(None, backend, quant, tmp_path_factory.mktemp(f"{backend}-{quant}") / "bundle")
        return made[backend, quant]

    return bundle
