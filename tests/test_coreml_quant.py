"""Core ML int4 / int8: the core's plan reaches the mlpackage unchanged (its integers and scales
read back from the weight blob), and the program matches the plan applied in eager.

One int4 export of the embedded model (about a minute and a half on two cores) is shared by
the module; int8 is checked on the decode function alone, converted without the gate.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_mobile.backends.coreml import BACKEND, compress, emulator, lower
from qwen_mobile.bundle import gate_bundle, validate_manifest
from qwen_mobile.checkpoint import load
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import QuantizedWeight, QuantPlan, make_plan, resolve_scheme, scheme_from_manifest

pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def loaded():
    return load(None)


@pytest.fixture(scope="module")
def exported(embedded_bundle) -> Path:
    return embedded_bundle("coreml", "int4")


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / "manifest.json").read_text())


@pytest.fixture(scope="module")
def plan(manifest, loaded):
    return make_plan(loaded.model, scheme_from_manifest(manifest["quant"]))


@pytest.fixture(scope="module")
def stored(exported) -> dict:
    return compress.stored_encodings(emulator.Package(exported / "model.mlpackage"))


def test_the_manifest_records_the_plan_and_the_quantized_gate(exported, manifest, plan):
    assert manifest["quant"] == plan.to_manifest()
    quant = manifest["quant"]
    assert (quant["scheme"], quant["bits"], quant["group_size"], quant["embedding_bits"]) == ("int4", 4, 32, 4)
    assert quant["activations"] is None and quant["compute_dtype"] == "float32"
    assert manifest["precision"]["compute"] == "float32"
    gate = gate_bundle(exported, manifest, BACKEND)  # measured again, on the package as written
    assert gate["passed"] and gate["reference"] == "eager model with the same quantization plan"
    assert gate["relative_diff"] <= gate["max_relative_diff"] == 2e-2 and gate["top1_agreement"] >= gate["min_top1"] == 0.99
    assert gate["positions_checked"] >= 100 and list(gate["runtimes"]) == ["emulator"]
    assert gate["weights"] == {"checked": len(plan.weights), "differ": []}  # read back from the package
    # reported, not gated: how far the int4 model is from the float one
    assert 0 < gate["versus_float"]["mean_kl"] < 0.5 and 0.5 < gate["versus_float"]["top1_agreement"] <= 1
    assert manifest["operations"]["decode"]["constexpr_blockwise_shift_scale"] == len(
        {id(w) for w in plan.weights.values()})  # the tied lm_head is the embedding's constexpr
    validate_manifest(manifest, exported / "manifest.json")


def test_the_package_holds_the_plans_integers_scales_and_zero_points(manifest, plan, stored):
    functions = manifest["weight_compression"]["functions"]
    assert set(functions) == {"prefill", "decode"}
    for function, encoded in functions.items():
        assert set(encoded) == set(plan.weights)  # embedding and lm_head included
        assert encoded["lm_head.weight"] == encoded["embed_tokens.weight"]  # tied: the same integers, once
        assert compress.mismatches(stored[function], encoded, plan.weights) == []
        assert {e["dtypes"]["data"] for e in stored[function].values()} == {"int4"}  # packed, not int8
        assert {e["dtypes"]["scale"] for e in stored[function].values()} == {"fp32"}


def test_a_one_step_change_to_one_integer_is_detected(manifest, plan, stored):
    name = "layers.0.mlp.down_proj.weight"
    weight = plan.weights[name]
    moved = weight.qdata.clone()
    moved[3, 5] = moved[3, 5] + 1 if moved[3, 5] < weight.qmax else moved[3, 5] - 1
    changed = {**plan.weights, name: dataclasses.replace(weight, qdata=moved)}
    encoded = manifest["weight_compression"]["functions"]["decode"]
    assert compress.mismatches(stored["decode"], encoded, changed) == [name]


def test_both_functions_share_each_compressed_weight_and_the_package_is_smaller_than_fp16(exported, manifest,
                                                                                           stored, loaded):
    prefill, decode = (manifest["weight_compression"]["functions"][f] for f in ("prefill", "decode"))
    for name in prefill:
        assert stored["prefill"][prefill[name]]["offsets"] == stored["decode"][decode[name]]["offsets"], name
    weights = (exported / "model.mlpackage" / emulator.WEIGHTS_DIR / "weight.bin").stat().st_size
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert weights < parameters  # below one byte per parameter: fp16 needs two, int8 one


def test_int8_is_encoded_per_channel_from_the_plan(loaded, tmp_path):
    """The decode function alone, converted with an int8 plan (no gate: the int4 bundle gates the path)."""
    model = loaded.model
    plan = make_plan(model, resolve_scheme("int8"))
    split = lower.split_kinds("float32", "float32")
    with dequantized(model, plan):
        mlmodel, encoded = lower.convert_function(model, 64, None, "float32", split, plan)
    mlmodel.save(str(tmp_path / "decode.mlpackage"))
    stored = compress.stored_encodings(emulator.Package(tmp_path / "decode.mlpackage"))["main"]
    assert set(encoded) == set(plan.weights)
    assert compress.mismatches(stored, {name: ops[0] for name, ops in encoded.items()}, plan.weights) == []
    assert {e["dtypes"]["data"] for e in stored.values()} == {"int8"}
    assert {e["scale"].shape[1] for e in stored.values()} == {1}  # one scale per output channel
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float weights are back


def test_schemes_core_ml_cannot_encode_are_refused_by_name(loaded, tmp_path):
    with pytest.raises(QwenMobileError, match=r"not supported by the coreml backend; it supports fp16, fp32, int8, int4"):
        export_bundle(None, "coreml", "8da4w", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    plan = make_plan(loaded.model, resolve_scheme("int4"))
    two_bit = {name: dataclasses.replace(w, bits=2) for name, w in plan.weights.items()}
    with pytest.raises(QwenMobileError, match=r"2-bit weights cannot be encoded by the coreml backend \(it encodes "
                                              r"int4 and int8 weights"):
        compress.check_encodable(dataclasses.replace(plan, weights=two_bit), ("int8", "int4"))
    dynamic = {name: dataclasses.replace(w, activations="int8_asymmetric_per_token") for name, w in plan.weights.items()}
    with pytest.raises(QwenMobileError, match="keeps activations float"):
        compress.check_encodable(dataclasses.replace(plan, weights=dynamic), ("int8", "int4"))


def test_a_scale_fp16_cannot_hold_is_refused_not_rounded():
    weight = QuantizedWeight(torch.ones(2, 32, dtype=torch.int8), torch.full((2, 1), 2.0**-30),
                             torch.zeros(2, 1, dtype=torch.int8), 4, 32, None)
    with pytest.raises(QwenMobileError, match="not exactly representable in float16"):
        compress.encoding(weight, np.float16)
    assert compress.encoding(weight, np.float32)["scale"].dtype == np.float32


def test_the_plan_index_hashes_a_weight_block_by_block_as_the_converter_writes_it_whole(monkeypatch):
    import qwen_mobile.quant.plan as plan_module

    weight = plan_module.round_to_nearest(torch.randn(37, 64, generator=torch.Generator().manual_seed(0)), 4, 32, None)
    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 64 * 5)  # blocks of 5 rows, the last one short
    whole = weight.dequantize().numpy()
    expected = [compress.weight_key(whole.astype(dtype)) for dtype in compress.FLOAT_DTYPES]
    assert compress.dequantized_keys(weight) == expected
    index = compress.PlanIndex(QuantPlan(resolve_scheme("int4"), {"layer.weight": weight}))
    assert index.names(whole.astype(np.float16)) == ["layer.weight"]
    assert index.names(np.asfortranarray(whole)) == ["layer.weight"]  # a const laid out column-major is the same value
    moved = whole.copy()
    moved[36, 63] = np.nextafter(moved[36, 63], np.float32(np.inf))
    assert index.names(moved) == []
