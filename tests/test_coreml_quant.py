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
from qwen_mobile.quant.plan import (QuantizedWeight, make_plan, placeholder, placeholder_weights, planned_modules,
                                    release_planned_weights, replaced_weights, resolve_scheme, scheme_from_manifest)

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


def test_int8_is_encoded_per_channel_from_the_plan_without_reading_a_planned_weight(tmp_path):
    """The decode function alone, converted with an int8 plan (no gate: the int4 bundle gates the path),
    from a model whose planned weights are released as the export releases them (meta tensors, which
    hold no value to read): every integer in the package must then be the plan's."""
    model = load(None).model
    plan = make_plan(model, resolve_scheme("int8"))
    release_planned_weights(model, plan)
    placeholders = placeholder_weights(model, plan)
    with replaced_weights(model, placeholders):
        mlmodel, encoded = lower.convert_function(model, 64, None, "float32", lower.split_kinds("float32", "float32"),
                                                  plan, placeholders)
    mlmodel.save(str(tmp_path / "decode.mlpackage"))
    stored = compress.stored_encodings(emulator.Package(tmp_path / "decode.mlpackage"))["main"]
    assert set(encoded) == set(plan.weights)
    assert compress.mismatches(stored, {name: ops[0] for name, ops in encoded.items()}, plan.weights) == []
    assert {e["dtypes"]["data"] for e in stored.values()} == {"int8"}
    assert {e["scale"].shape[1] for e in stored.values()} == {1}  # one scale per output channel
    assert all(planned_modules(model)[name].weight.is_meta for name in plan.weights)  # released ones are back


def test_a_planned_weight_the_conversion_holds_no_placeholder_of_is_an_error_not_a_float_weight(loaded):
    """The encoding pass finds each planned weight by its placeholder's address: one the converter
    did not make a constant of (a copy, say) must stop the export, naming the weight."""
    model = loaded.model
    plan = make_plan(model, resolve_scheme("int8"))
    placeholders = placeholder_weights(model, plan)
    name = "layers.1.mlp.up_proj.weight"
    with replaced_weights(model, {**placeholders, name: placeholders[name].clone()}):
        with pytest.raises(QwenMobileError,
                           match=f"no constant made from the placeholders of the plan's weights {name};"):
            lower.convert_function(model, 64, None, "float32", lower.split_kinds("float32", "float32"), plan,
                                   placeholders)


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


def test_the_encoding_pass_finds_a_planned_weight_by_its_placeholders_address_not_by_value():
    placeholders = {"a.weight": placeholder((4, 8)), "b.weight": placeholder((4, 8))}
    placeholders["tied.weight"] = placeholders["a.weight"]
    index = compress.PlaceholderIndex(placeholders)
    assert index.names(placeholders["a.weight"].numpy()) == ["a.weight", "tied.weight"]
    assert index.names(placeholders["b.weight"].numpy()) == ["b.weight"]  # equal values, its own address
    assert index.names(placeholders["a.weight"].contiguous().numpy()) == []  # a copy is not the placeholder
    assert index.names(placeholders["a.weight"][:2].numpy()) == []  # nor is a view of another shape
    assert index.names(3.0) == []
