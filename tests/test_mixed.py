"""Mixed precision (8-bit keeps within a size budget, with their reasons) and plans on disk."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.gptq import gptq_plan, rtn_plan
from qwen_mobile.quant.mixed import added_bytes, choose_8bit, mixed_plan, plan_bytes
from qwen_mobile.quant.plan import PLAN_HEADER, QuantPlan, load_plan, make_plan, resolve_scheme, save_plan



@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 4096, (length,), generator=generator).tolist() for length in (40, 24)]


def assert_same_plan(loaded: QuantPlan, plan: QuantPlan):
    assert loaded.scheme == plan.scheme and loaded.method == plan.method
    assert loaded.kept_float == plan.kept_float and loaded.calibration == plan.calibration
    assert list(loaded.weights) == list(plan.weights)
    for name, weight in plan.weights.items():
        mine = loaded.weights[name]
        for part in ("qdata", "scale", "zero_point"):
            ours, theirs = getattr(mine, part), getattr(weight, part)
            assert ours.dtype == theirs.dtype and torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))
        assert (mine.bits, mine.group_size, mine.activations) == (weight.bits, weight.group_size, weight.activations)
    assert loaded.to_manifest() == plan.to_manifest()


def test_plan_bytes_count_integers_at_their_bits_and_bf16_scales_once_per_tensor(model):
    plan = make_plan(model, resolve_scheme("int4"))
    shared = plan.weights["embed_tokens.weight"]
    expected = sum(w.qdata.numel() // 2 + w.scale.numel() * 2 for n, w in plan.weights.items() if n != "lm_head.weight")
    assert plan_bytes(plan) == expected and shared.qdata is plan.weights["lm_head.weight"].qdata
    name = "layers.0.mlp.down_proj.weight"  # [192, 320]: 4-bit g32 -> 8-bit per channel
    assert added_bytes(plan, name) == 192 * 320 // 2 + 192 * 2 - 192 * 10 * 2
    kept = rtn_plan(model, resolve_scheme("int4"), [name])
    assert plan_bytes(kept) == plan_bytes(plan) + added_bytes(plan, name)


def test_choose_8bit_keeps_the_most_sensitive_that_fit_and_skips_what_does_not(model):
    plan = make_plan(model, resolve_scheme("int4"))
    figures = {"embed_tokens.weight": 0.5, "layers.0.mlp.down_proj.weight": 0.2,
               "layers.1.mlp.up_proj.weight": 0.1, "layers.2.mlp.up_proj.weight": 0.05}
    one = added_bytes(plan, "layers.0.mlp.down_proj.weight")
    budget = (one + added_bytes(plan, "layers.1.mlp.up_proj.weight") + 10) / plan_bytes(plan)
    kept = choose_8bit(plan, figures, budget)
    # the embedding (393 KB more at 8 bits) does not fit; the next two do; the third is past the budget
    assert list(kept) == ["layers.0.mlp.down_proj.weight", "layers.1.mlp.up_proj.weight"]
    assert kept["layers.0.mlp.down_proj.weight"] == {"kl_at_4bit": 0.2, "added_bytes": one}
    assert choose_8bit(plan, figures, 0.0) == {}


def test_auto_mixed_precision_respects_the_budget_and_records_why(model, samples):
    scheme = resolve_scheme("8da4w")
    plan = mixed_plan(model, scheme, samples, method="rtn", keep_8bit="auto", size_budget=0.05)
    record = plan.calibration["keep_8bit"]
    kept, size, figures = record["kept"], record["size"], record["sensitivity"]
    assert kept and set(kept) <= set(figures) and len(figures) == len(plan.weights) - 1  # tied head: one tensor
    assert list(figures.values()) == sorted(figures.values(), reverse=True) and min(figures.values()) >= 0
    assert size["bytes"] == plan_bytes(plan) <= size["limit_bytes"] == int(size["4bit_bytes"] * 1.05)
    assert size["bytes"] - size["4bit_bytes"] == sum(k["added_bytes"] for k in kept.values())
    skipped = [n for n in figures if n not in kept and figures[n] > min(kept[k]["kl_at_4bit"] for k in kept)]
    for name in skipped:  # anything more sensitive than a kept tensor was left out for its size
        assert added_bytes(make_plan(model, scheme), name) > size["limit_bytes"] - size["4bit_bytes"] - sum(
            k["added_bytes"] for n, k in kept.items() if figures[n] > figures[name])
    for name, reason in kept.items():
        weight = plan.weights[name]
        assert (weight.bits, weight.group_size, weight.qdata.min() >= -127) == (8, weight.qdata.shape[1], True)
        assert reason["kl_at_4bit"] == figures[name]
    assert all(w.bits == 4 for n, w in plan.weights.items() if n not in kept)
    manifest = plan.to_manifest()
    assert set(kept) <= set(manifest["higher_precision"]) and manifest["calibration"]["keep_8bit"]["kept"] == kept


def test_named_keeps_are_kept_whatever_they_cost(model):
    plan = mixed_plan(model, resolve_scheme("int4"), [], method="rtn", keep_8bit=["lm_head.weight"])
    assert plan.weights["embed_tokens.weight"].bits == 8 and plan.weights["lm_head.weight"].bits == 8
    assert plan.calibration["keep_8bit"]["rule"] == "named"
    with pytest.raises(ValueError, match="sensitivities on calibration samples"):
        mixed_plan(model, resolve_scheme("int4"), [], method="rtn", keep_8bit="auto")


@pytest.mark.parametrize("name", ["int4", "8da8w", "fp32"])
def test_a_plan_survives_save_and_load_bit_for_bit(model, tmp_path, name):
    plan = make_plan(model, resolve_scheme(name))
    loaded = load_plan(save_plan(plan, tmp_path / "plan.safetensors"))
    assert_same_plan(loaded, plan)
    if plan.weights:
        assert loaded.weights["lm_head.weight"].qdata is loaded.weights["embed_tokens.weight"].qdata


def test_a_calibrated_mixed_plan_survives_save_and_load(model, samples, tmp_path):
    plan = gptq_plan(model, resolve_scheme("8da4w"), samples, keep_8bit=["layers.0.mlp.down_proj.weight"])
    plan.calibration["keep_8bit"] = {"kept": {"layers.0.mlp.down_proj.weight": {"kl_at_4bit": 0.01}}}
    path = save_plan(plan, tmp_path / "plan.safetensors")
    assert_same_plan(load_plan(path), plan)
    # what is stored: the shared tensor once, 4-bit integers two to a byte, 8-bit ones a byte each
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        header = json.loads(handle.metadata()[PLAN_HEADER])
        stored = {name: handle.get_slice(f"{name}:qdata").get_shape() for name in ("layers.0.mlp.down_proj.weight",
                                                                                    "layers.0.mlp.up_proj.weight")}
    assert "lm_head.weight:qdata" not in names and header["weights"]["lm_head.weight"]["integers_of"] == "embed_tokens.weight"
    kept, four_bit = plan.weights["layers.0.mlp.down_proj.weight"], plan.weights["layers.0.mlp.up_proj.weight"]
    assert stored["layers.0.mlp.down_proj.weight"] == list(kept.qdata.shape) and kept.bits == 8
    assert stored["layers.0.mlp.up_proj.weight"] == [four_bit.qdata.shape[0], (four_bit.qdata.shape[1] + 1) // 2]
    assert header["method"] == "gptq_symmetric" and header["scheme"]["name"] == "8da4w"


def test_a_file_that_is_not_a_plan_is_a_one_line_error(tmp_path):
    with pytest.raises(QwenMobileError, match="not a readable safetensors file"):
        load_plan(tmp_path / "missing.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(QwenMobileError, match="not a quantization plan"):
        load_plan(other)
    broken = tmp_path / "broken.safetensors"
    save_file({"w": torch.zeros(2)}, str(broken), metadata={PLAN_HEADER: json.dumps({"format": 1, "weights": {}})})
    with pytest.raises(QwenMobileError, match="plan format 1; this version reads 2"):
        load_plan(broken)
    save_file({"w": torch.zeros(2)}, str(broken), metadata={PLAN_HEADER: json.dumps({"format": 2, "weights": {"w": {}}})})
    with pytest.raises(QwenMobileError, match="not a quantization plan this version reads"):
        load_plan(broken)


def test_four_bit_integers_pack_two_to_a_byte_and_come_back_exactly():
    from qwen_mobile.quant.plan import pack_nibbles, unpack_nibbles

    for columns in (1, 2, 7, 32):
        qdata = torch.randint(-8, 8, (5, columns), dtype=torch.int8)
        packed = pack_nibbles(qdata)
        assert packed.dtype == torch.uint8 and packed.shape == (5, (columns + 1) // 2)
        assert torch.equal(unpack_nibbles(packed, columns), qdata)
