"""The core's quantization plans and their eager reference, independent of any backend."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_mobile.checkpoint import load
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.memory import linear
from qwen_mobile.parity import mean_kl, relative_diff
from qwen_mobile.quant import plan as plan_module
from qwen_mobile.quant.eager import dequantized, quantize_per_token
from qwen_mobile.quant.plan import (
    FLOAT_LINEARS,
    make_plan,
    resolve_scheme,
    round_to_nearest,
    scheme_from_manifest,
)



@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([4, 8]), groups=st.integers(1, 4), group=st.sampled_from([32, 64]), seed=st.integers(0, 99))
def test_round_to_nearest_is_symmetric_within_range_and_half_a_step_off(bits, groups, group, seed):
    weight = torch.randn(6, groups * group, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = round_to_nearest(weight, bits, group, None)
    assert q.qdata.dtype == torch.int8 and q.qdata.shape == weight.shape
    assert q.qdata.min() >= -(1 << (bits - 1)) and q.qdata.max() <= (1 << (bits - 1)) - 1
    assert q.scale.shape == (6, groups) and torch.equal(q.zero_point, torch.zeros(6, groups, dtype=torch.int8))
    assert torch.equal(q.scale, q.scale.to(torch.bfloat16).float())  # bf16-exact, as XNNPACK stores them
    step = q.scale.repeat_interleave(group, dim=1)
    assert torch.all((q.dequantize() - weight).abs() <= step / 2 + 1e-7)
    by_hand = (q.qdata.float() - q.zero_point.repeat_interleave(group, 1).float()) * step
    assert torch.equal(q.dequantize(), by_hand)


@pytest.mark.parametrize("bits, group, narrow", [(4, 32, False), (8, 96, True)])
def test_round_to_nearest_a_few_rows_at_a_time_gives_the_whole_weights_integers(monkeypatch, bits, group, narrow):
    weight = torch.randn(41, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    whole = round_to_nearest(weight, bits, group, None, narrow)
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 3 * 96 + 5)  # chunks of 3 rows, the last of 2
    chunked = round_to_nearest(weight, bits, group, None, narrow)
    for field in ("qdata", "scale", "zero_point"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field))
    dequantized_by_chunks = chunked.dequantize()
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1 << 24)
    assert torch.equal(dequantized_by_chunks, whole.dequantize())


def test_quantize_per_token_keeps_each_token_on_its_own_int8_grid():
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 6).view(1, 5, 1)
    fake = quantize_per_token(x)
    for token, quantized in zip(x.reshape(-1, 48), fake.reshape(-1, 48)):
        low, high = min(token.min().item(), 0.0), max(token.max().item(), 0.0)
        step = (high - low) / 255
        assert (quantized - token).abs().max() <= step / 2 + 1e-6
        assert len(torch.unique(quantized)) <= 256


def test_a_4bit_plan_covers_every_linear_the_embedding_and_the_lm_head(model):
    plan = make_plan(model, resolve_scheme("8da4w"))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {n for n in linears if n.rsplit(".", 2)[-2] in FLOAT_LINEARS}
    assert kept and set(plan.kept_float) == kept
    assert set(plan.weights) == (linears - kept) | {"embed_tokens.weight"}
    assert all(w.bits == 4 and w.group_size == 32 for w in plan.weights.values())
    assert plan.weights["embed_tokens.weight"].activations is None
    assert plan.weights["layers.0.mlp.up_proj.weight"].activations == "int8_asymmetric_per_token"
    tied_head, embedding = plan.weights["lm_head.weight"], plan.weights["embed_tokens.weight"]
    assert tied_head.qdata is embedding.qdata and tied_head.activations == "int8_asymmetric_per_token"


def test_embeddings_8bit_and_group_size_fallbacks_are_recorded(model):
    plan = make_plan(model, resolve_scheme("int4", group_size=128, embeddings_8bit=True))
    assert plan.weights["embed_tokens.weight"].bits == 8
    assert plan.weights["embed_tokens.weight"].group_size == model.config.hidden_size  # per channel
    manifest = plan.to_manifest()
    assert "embed_tokens.weight" in manifest["higher_precision"]
    # 128 divides neither the tiny model's 192-wide hidden size nor its 320-wide MLP: one scale per row there
    assert {"layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"} <= set(manifest["per_channel_fallback"])
    assert plan.weights["layers.0.mlp.down_proj.weight"].group_size == 320
    assert plan.weights["layers.3.self_attn.o_proj.weight"].group_size == 128  # 256 wide
    assert "layers.3.self_attn.o_proj.weight" not in manifest["per_channel_fallback"]
    assert scheme_from_manifest(manifest) == plan.scheme


def test_bad_quant_options_are_one_line_errors_naming_the_flag():
    with pytest.raises(QwenMobileError, match="--quant 'int3' is unknown"):
        resolve_scheme("int3")
    with pytest.raises(QwenMobileError, match="--group-size 48: choose one of 32, 64, 128"):
        resolve_scheme("int4", group_size=48)
    with pytest.raises(QwenMobileError, match="--group-size applies to grouped schemes"):
        resolve_scheme("int8", group_size=32)
    with pytest.raises(QwenMobileError, match="--embeddings-8bit applies to quantized schemes"):
        resolve_scheme("fp32", embeddings_8bit=True)
    assert make_plan(load(None).model, resolve_scheme("fp32")).weights == {}


def test_the_eager_reference_uses_the_plan_and_gives_the_float_weights_back(model):
    plan = make_plan(model, resolve_scheme("8da4w"))
    tokens = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def logits():
        with torch.no_grad():
            return model(tokens, torch.tensor([0]), model.init_state(64), all_positions=True)[0][0]

    reference = logits()
    with dequantized(model, plan):
        x = torch.randn(1, 3, model.config.hidden_size)
        planned = plan.weights["layers.0.mlp.up_proj.weight"]
        assert torch.equal(model.layers[0].mlp.up_proj(x), linear(quantize_per_token(x), planned.dequantize()))
        quantized = logits()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(logits(), reference)
    # a 4-bit plan moves the distribution, measurably but not beyond recognition
    assert 1e-3 < mean_kl(reference, quantized) < 0.5
    assert 1e-2 < relative_diff(reference, quantized) < 0.5
