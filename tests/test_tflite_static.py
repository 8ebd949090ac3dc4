"""a8w8 and a16w8: static activation ranges decided in the core, encoded by TFLite as integer
FULLY_CONNECTEDs, computed by the eager reference as TFLite's integer kernels compute them."""

import json
import shutil
from dataclasses import replace

import flatbuffers
import numpy as np
import pytest
import torch
from test_tflite_quant import TOKENS, convert
from torch import nn
from typer.testing import CliRunner

from qwen_mobile.backends.tflite import BACKEND, quantize
from qwen_mobile.backends.tflite.backend import differing_ranges
from qwen_mobile.cli import app
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import PLAN_FILE, load_plan, make_plan, resolve_scheme
from qwen_mobile.quant.static import RangeCollector, StaticRange, integer_linear, quantize_input


class OneLinear(nn.Module):
    """An embedding (a weight-only lookup) scaled off the integer grid, then one planned linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(64, 48)
        self.gain = nn.Parameter(torch.rand(48) * 3 + 0.5)
        self.proj = nn.Linear(48, 80, bias=False)

    def forward(self, tokens):
        return self.proj(self.embed_tokens(tokens) * self.gain)


def static_plan(module: nn.Module, scheme: str):
    """The scheme's plan for `module` with min-max ranges of what its linear sees on TOKENS."""
    plan = make_plan(module, resolve_scheme(scheme))
    collector = RangeCollector({"proj.weight": module.proj})
    with torch.no_grad():
        module(TOKENS)
    collector.close()
    activations = plan.weights["proj.weight"].activations
    plan.activation_ranges["proj.weight"] = StaticRange(
        activations, *collector.range("proj.weight", "input", "minmax", activations),
        *collector.range("proj.weight", "output", "minmax", activations))
    return plan


def run_with_tensors(flatbuffer: bytes, xnnpack: bool):
    """The module's output, and (without XNNPACK, whose tensors are its own) every named tensor."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                                  "experimental_preserve_all_tensors": True}
    interpreter = Interpreter(model_content=flatbuffer, **options)
    interpreter.allocate_tensors()
    (output,) = interpreter.get_signature_runner()(tokens=TOKENS.numpy()).values()
    tensors = {} if xnnpack else {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_tensor_details()}
    return output, tensors


@pytest.mark.parametrize("scheme", ["a8w8", "a16w8"])
def test_one_integer_linear_rounds_where_and_as_the_eager_reference_rounds(scheme):
    """QUANTIZE -> integer FULLY_CONNECTED -> DEQUANTIZE against quant/static.py's emulation. Stated
    tolerance: the QUANTIZE integers are bit for bit the eager ones on both runtimes' kernels; XNNPACK's
    int8 linear is bit for bit the eager one. TFLite's builtin x86 kernels (their NEON code through
    NEON_2_SSE) move an integer output one step on near-ties (0.3-0.6% of outputs measured here), never
    more, on at most 2%; and DEQUANTIZE as q * scale - zero_point * scale in float32 (a few ulps from
    eager's (q - zero_point) * scale where the two terms cancel)."""
    module = OneLinear().eval()
    plan = static_plan(module, scheme)
    spec = plan.activation_ranges["proj.weight"]
    flatbuffer = quantize.encode(convert(module, plan), plan)
    with dequantized(module, plan), torch.no_grad():
        expected = module(TOKENS).numpy()
        lookup = plan.weights["embed_tokens.weight"].dequantize()[TOKENS.long()] * module.gain

    builtin, tensors = run_with_tensors(flatbuffer, xnnpack=False)
    # the lookup gives the plan's exact float rows, so the QUANTIZE sees eager's input
    np.testing.assert_array_equal(tensors["proj.weight.input"], quantize_input(lookup, spec).numpy())
    weight = plan.weights["proj.weight"]
    integers = integer_linear(lookup, weight.qdata, weight.scale, spec).numpy()
    moved = np.abs(tensors["proj.weight.output"].astype(np.int64) - integers)
    assert moved.max() <= 1 and (moved > 0).mean() <= 0.02
    # its DEQUANTIZE of its own integers, as the NEON code computes it: q * scale + (-zero_point * scale) in float32
    scale, offset = np.float32(spec.output_scale), np.float32(-spec.output_zero_point * spec.output_scale)
    np.testing.assert_array_equal(builtin, tensors["proj.weight.output"].astype(np.float32) * scale + offset)
    if scheme == "a8w8":  # XNNPACK runs int8 x int8 itself (it takes no int16 activations)
        xnnpack, _ = run_with_tensors(flatbuffer, xnnpack=True)
        np.testing.assert_array_equal(xnnpack, expected)


def test_the_ranges_in_the_file_are_the_plans_and_a_changed_scale_is_seen():
    module = OneLinear().eval()
    plan = static_plan(module, "a8w8")
    flatbuffer = quantize.encode(convert(module, plan), plan)
    spec = plan.activation_ranges["proj.weight"]
    (found,) = quantize.static_ranges(flatbuffer)["proj.weight"]
    assert found["input"] == [spec.input_scale, spec.input_zero_point]
    assert found["output"] == [spec.output_scale, spec.output_zero_point]
    assert (found["activations"], found["output_type"], found["quantized_by"], found["dequantized_by"]) == (
        "INT8", "INT8", "QUANTIZE", "DEQUANTIZE")
    assert found["filter"] == "proj.weight.qdata"
    (linear,) = quantize.fully_connected_filters(flatbuffer)
    assert (linear["type"], linear["quantization"], linear["produced_by"]) == ("INT8", "per_channel", None)


def test_a_static_plan_without_ranges_or_with_int16_zero_points_is_refused_by_weight_name():
    module = OneLinear().eval()
    plan = make_plan(module, resolve_scheme("a8w8"))
    with pytest.raises(QwenMobileError, match="^proj.weight: static activations .* without their range in the plan"):
        quantize.check_encodable(plan)
    plan = static_plan(module, "a16w8")
    plan.activation_ranges["proj.weight"] = replace(plan.activation_ranges["proj.weight"], input_zero_point=3)
    with pytest.raises(QwenMobileError, match="^proj.weight: int16 activations need zero point 0"):
        quantize.check_encodable(plan)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    """Two short samples: enough for ranges, fast enough for CI (the default set is 128 samples)."""
    path = tmp_path_factory.mktemp("calibration") / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": text}) for text in (
        "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.",
        "def mean(values):\n    return sum(values) / len(values)\n")) + "\n")
    return path


@pytest.mark.parametrize("scheme,ranges", [("a8w8", None), ("a16w8", "mse")])
def test_a_static_export_passes_its_gate_through_both_runtimes_and_carries_its_ranges(
        tmp_path, calibration_file, scheme, ranges):
    out = export_bundle(None, "tflite", scheme, tmp_path / "bundle", max_context=64,
                        calibration=str(calibration_file), ranges=ranges)
    manifest = json.loads((out / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] and set(parity["runtimes"]) == {"xnnpack", "builtin_kernels"}
    assert all(result["passed"] for result in parity["runtimes"].values())
    plan = load_plan(out / PLAN_FILE)
    assert plan.to_manifest() == manifest["quant"]  # what verify requires of the plan the bundle carries
    assert plan.calibration["ranges"] == (ranges or "mse") and plan.calibration["samples"] == 2  # a8w8's default
    static = {name for name, weight in plan.weights.items() if weight.activations}
    assert set(plan.activation_ranges) == static and manifest["quant"]["activation_ranges"].keys() == static
    assert parity["weights"] == {"checked": len(plan.weights), "differ": []}  # integers, scales and ranges

    written = (out / "model.tflite").read_bytes()
    found = quantize.static_ranges(written)
    assert differing_ranges(found, plan) == []
    kind = "INT16" if scheme == "a16w8" else "INT8"
    assert {entry["activations"] for entries in found.values() for entry in entries} == {kind}
    report = json.loads((out / "npu_report.json").read_text())["precision"]
    assert report["integer_fully_connected"] == 2 * len(static)  # prefill and decode
    assert report["float_ops_by_op"]["FULLY_CONNECTED"] == 2 * len(plan.kept_float)  # in_proj_a, in_proj_b
    assert not report["fully_integer"] and set(report["why_float"]) == set(report["float_ops_by_op"])
    assert "not described" not in json.dumps(report["why_float"])

    # one activation scale changed in the plan, then in the file: the gate's weight check names the linear
    name = "layers.1.mlp.down_proj.weight"
    spec = plan.activation_ranges[name]
    changed = replace(plan, activation_ranges={**plan.activation_ranges,
                                               name: replace(spec, output_scale=float(np.float32(spec.output_scale * 1.01)))})
    backend = BACKEND.load()
    assert backend.missing_weights(out, manifest, changed) == [name]
    mutant = tmp_path / "mutant"
    shutil.copytree(out, mutant)
    model = quantize.schema().ModelT.InitFromPackedBuf(written, 0)
    subgraph = model.subgraphs[0]
    tensor = next(t for t in subgraph.tensors if t.name.decode() == f"{name}.input")
    tensor.quantization.scale = tensor.quantization.scale * np.float32(1.01)
    builder = flatbuffers.Builder(len(written))
    builder.Finish(model.Pack(builder), file_identifier=quantize.TFLITE_FILE_IDENTIFIER)
    (mutant / "model.tflite").write_bytes(bytes(builder.Output()))
    assert backend.missing_weights(mutant, manifest, plan) == [name]


cli = CliRunner()


@pytest.mark.parametrize("arguments,fragment", [
    (["-b", "tflite", "-q", "a8w8", "--ranges", "median"], "--ranges 'median' is unknown; methods: minmax, percentile, mse"),
    (["-b", "tflite", "-q", "8da8w", "--ranges", "mse"], "--ranges applies to schemes with static activations"),
    (["-b", "executorch", "-q", "a8w8"], "not supported by the executorch backend: static activation ranges are for NPU"),
    (["-b", "coreml", "-q", "a8w8"], "linear_quantize_activations calibrates by MLModel.predict, which runs on macOS only"),
    (["-b", "coreml", "-q", "a16w8"], "Core ML quantizes activations to 8 bits only"),
])
def test_what_the_static_schemes_cannot_take_is_one_line_and_exit_2(tmp_path, arguments, fragment):
    result = cli.invoke(app, ["export", *arguments, "--out", str(tmp_path / "bundle")])
    stderr = result.stderr.strip()
    assert result.exit_code == 2 and len(stderr.splitlines()) == 1 and "Traceback" not in stderr, result.output
    assert fragment in stderr, stderr
    assert "loading the checkpoint" not in result.stderr and not (tmp_path / "bundle").exists()
