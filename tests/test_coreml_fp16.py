"""The Core ML backend with fp16 compute: the program computes in fp16 except the gated delta
rule composite, is gated on top-1 agreement (mean KL reported), and stores the recurrent
state as one fp16 state because the measured fp16 drift is not material."""

import json
from pathlib import Path

import pytest
import torch

from qwen_mobile.backends.coreml import BACKEND, backend, drift, emulator
from qwen_mobile.bundle import gate_bundle
from qwen_mobile.checkpoint import load

pytest.importorskip("coremltools")

FP16, FP32 = 10, 11


@pytest.fixture(scope="module")
def exported(embedded_bundle) -> Path:
    return embedded_bundle("coreml", "fp16")  # the backend's default


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / "manifest.json").read_text())


def test_fp16_is_gated_on_top1_with_mean_kl_reported(exported, manifest):
    parity = gate_bundle(exported, manifest, BACKEND)  # measured again, on the package as written
    assert manifest["quant"] == {"scheme": "fp16", "compute_dtype": "float16"}
    assert parity["passed"] and parity["min_top1"] == 0.99 and parity["top1_agreement"] >= 0.99
    assert parity["versus_float"]["mean_kl"] >= 0.0 and parity["tokens_fed"] >= 64


def test_the_program_computes_in_fp16_and_the_recurrence_in_fp32(exported, manifest):
    package = emulator.Package(exported / "model.mlpackage")
    for function in package.functions.values():
        linear = {op.outputs[0][1] for op in function.operations if op.type == "linear"}
        cumsum = {op.outputs[0][1] for op in function.operations if op.type == "cumsum"}
        assert linear == {FP16}
        assert cumsum <= {FP32}  # only prefill has the chunked form's cumsum
    prefill = package.functions["prefill"]
    assert {op.outputs[0][1] for op in prefill.operations if op.type == "cumsum"} == {FP32}
    # one fp16 state per kind: the drift measured for the recurrent state is not material
    assert manifest["precision"]["fp32_precision_states"] == []
    assert {entry["name"] for entry in manifest["state"] if entry["layer"] == 0} == {"layer0_conv_state",
                                                                                     "layer0_recurrent_state"}
    assert manifest["precision"]["recurrent_state_drift"] == backend.RECURRENT_STATE_DRIFT
    assert {dtype for _, dtype in package.states.values()} == {emulator.DTYPES[FP16]}


def test_the_recorded_drift_is_a_2048_token_measurement_and_a_short_one_agrees():
    recorded = backend.RECURRENT_STATE_DRIFT
    assert recorded["tokens"] == 2048 and recorded["material"] is False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token calls: threads only contend on a shared 2-core machine
    try:
        short = drift.measure(load(None).model, tokens=128)
    finally:
        torch.set_num_threads(threads)
    assert not short["material"] and short["top1_agreement"] >= 0.99
    assert short["state_relative_error"] <= 10 * recorded["state_relative_error"]
