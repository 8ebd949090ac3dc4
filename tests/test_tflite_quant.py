"""The plan's integers and scales, encoded into a converted flatbuffer as they are (no re-rounding).

Small Embedding -> Linear -> Linear modules keep this fast; the full model's quantized
export converts the same way (planned weights as signature inputs, backends/tflite/lower.py)
and runs the same encode (backends/tflite/quantize.py) behind the same parity gate.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from qwen_mobile.backends.tflite import lower, quantize
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.eager import INT8_ASYMMETRIC_PER_TOKEN, dequantized
from qwen_mobile.quant.plan import make_plan, replaced_weights, resolve_scheme


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(64, 64)
        self.proj = nn.Linear(64, 96, bias=False)
        self.lm_head = nn.Linear(96, 64, bias=False)

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.proj(self.embed_tokens(tokens))))


class Tied(nn.Module):
    """The embedded model's head in small: the lm_head is the embedding's own weight. The gain
    (an RMSNorm weight's role) keeps the first linear's input off the embedding's integer grid,
    where per-token int8 activations land on exact halves: TFLite's kernels round those away
    from zero, torchao (the eager reference) and XNNPACK to even. The ReLU is fused into the
    first FULLY_CONNECTED by the converter."""

    def __init__(self, width: int = 48):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(64, width)
        self.gain = nn.Parameter(torch.rand(width) + 0.5)
        self.proj = nn.Linear(width, width, bias=False)
        self.lm_head = nn.Linear(width, 64, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.proj(self.embed_tokens(tokens) * self.gain)))


TOKENS = torch.arange(0, 64, 5, dtype=torch.int32).reshape(1, -1)


class WeightsAsInputs(nn.Module):
    def __init__(self, model, inputs: dict[str, str]):
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, tokens, **weights):
        return lower.call_with_weights(self.model, self.inputs, weights, tokens)


def convert(model, plan=None) -> bytes:
    """As lower.convert does: the plan's weights as signature inputs (none without a plan)."""
    import litert_torch

    inputs = lower.weight_inputs(model, plan)
    parameters = dict(model.named_parameters())
    sample = {"tokens": TOKENS, **{key: parameters[name].detach() for key, name in inputs.items()}}
    wrapper = WeightsAsInputs(model.eval(), inputs).eval()
    return bytes(litert_torch.convert(wrapper, (), sample_kwargs=sample).model_content())


@pytest.fixture(scope="module")
def small():
    return Small().eval()


@pytest.fixture(scope="module")
def float_flatbuffer(small):
    return convert(small)


@pytest.fixture(scope="module")
def tied():
    return Tied().eval()


@pytest.fixture(scope="module")
def tied_8da8w(tied):
    """(plan, flatbuffer as converted, encoded) for the tied module under 8da8w."""
    plan = make_plan(tied, resolve_scheme("8da8w"))
    converted = convert(tied, plan)
    return plan, converted, quantize.encode(converted, plan)


@pytest.fixture(scope="module")
def tied_8da4w():
    """(module, plan, encoded) for a tied module 64 wide (two groups of 32 per row) under 8da4w."""
    module = Tied(width=64).eval()
    plan = make_plan(module, resolve_scheme("8da4w"))
    return module, plan, quantize.encode(convert(module, plan), plan)


def interpreters(flatbuffer: bytes):
    """Signature runners with XNNPACK and with TFLite's builtin kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    for options in ({}, {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}):
        yield Interpreter(model_content=flatbuffer, **options).get_signature_runner()


def assert_stored_as_planned(stored: dict, plan, names) -> None:
    """The integers, scales and zero points `quantize.read_weights` found are the plan's, for exactly
    `names`, in the layout quantize.encode documents for each weight's form."""
    assert set(stored) == set(names)
    for name, entry in stored.items():
        weight = plan.weights[name]
        rows, columns = weight.qdata.shape
        assert entry["bits"] == weight.bits and entry["form"] == quantize.stored_form(weight)
        assert entry["group_size"] == weight.group_size
        layout = (rows * (columns // weight.group_size), weight.group_size) if entry["form"] == "grouped" else (rows, columns)
        assert entry["qdata"].shape == layout
        np.testing.assert_array_equal(entry["qdata"].reshape(weight.qdata.shape), weight.qdata.numpy())
        np.testing.assert_array_equal(entry["scale"].reshape(weight.scale.shape), weight.scale.numpy())
        np.testing.assert_array_equal(entry["zero_point"].reshape(weight.zero_point.shape), weight.zero_point.numpy())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_ints_in_the_file_are_the_plans_and_it_computes_the_plans_model(small, float_flatbuffer, scheme):
    plan = make_plan(small, resolve_scheme(scheme))
    assert set(plan.weights) == {"embed_tokens.weight", "proj.weight", "lm_head.weight"}
    converted = convert(small, plan)
    assert len(converted) < 4096  # the converter saw no weight values
    encoded = quantize.encode(converted, plan)
    with dequantized(small, plan), torch.no_grad():
        expected = small(TOKENS).numpy()

    assert_stored_as_planned(quantize.read_weights(encoded), plan, plan.weights)
    assert len(encoded) < len(float_flatbuffer) / (3 if scheme == "int8" else 4)  # the float copies are gone
    # the lookup gathers quantized rows (no float copy of the table); weight-only linears take a float copy
    (lookup,) = quantize.embedding_lookups(encoded)
    assert (lookup["table"], lookup["produced_by"]) == ("embed_tokens.weight.qdata", None)
    assert lookup["quantization"] == ("per_channel" if scheme == "int8" else "blockwise")
    assert lookup["version"] == quantize.QUANTIZED_LOOKUP_VERSION
    assert {f["produced_by"] for f in quantize.fully_connected_filters(encoded)} == {
        "DEQUANTIZE" if scheme == "int8" else "RESHAPE"}

    for runner in interpreters(encoded):
        assert set(runner.get_input_details()) == {"tokens"}  # the weights are constants again
        (got,) = runner(tokens=TOKENS.numpy()).values()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_int4_packs_two_values_per_byte_low_nibble_first():
    values = np.array([-8, 7, -1, 0, 3], dtype=np.int8)
    packed = quantize.pack_int4(values)
    assert packed == bytes([0x78, 0x0F, 0x03])
    np.testing.assert_array_equal(quantize.unpack_int4(packed, 5), values)


def test_8da8w_linears_and_the_tied_lookup_take_the_plans_int8_constant_directly(tied_8da8w):
    """TFLite's hybrid FULLY_CONNECTED: no DEQUANTIZE in front, each input row quantized with its own
    scale and zero point. The tied lm_head's integers are the embedding's, one constant for both,
    which the lookup reads row by row (no float copy of the table)."""
    from ai_edge_litert import schema_py_generated as schema

    plan, _, encoded = tied_8da8w
    filters = quantize.fully_connected_filters(encoded)
    fields = ("filter", "type", "produced_by", "asymmetric_quantize_inputs", "version")
    assert [tuple(f[field] for field in fields) for f in filters] == [
        ("proj.weight.qdata", "INT8", None, True, quantize.HYBRID_FULLY_CONNECTED_VERSION),
        ("embed_tokens.weight.qdata", "INT8", None, True, quantize.HYBRID_FULLY_CONNECTED_VERSION),
    ]
    model = schema.ModelT.InitFromPackedBuf(encoded, 0)
    (subgraph,) = model.subgraphs
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}

    def op_name(op) -> str:
        return names[model.operatorCodes[op.opcodeIndex].builtinCode]

    integers = [t.name.decode() for t in subgraph.tensors].index("embed_tokens.weight.qdata")
    taking_integers = sorted(op_name(op) for op in subgraph.operators if integers in op.inputs)
    assert taking_integers == ["EMBEDDING_LOOKUP", "FULLY_CONNECTED"]
    assert "DEQUANTIZE" not in {op_name(op) for op in subgraph.operators}
    assert len(model.buffers[subgraph.tensors[integers].buffer].data) == 64 * 48  # stored once

    assert_stored_as_planned(quantize.read_weights(encoded), plan, {"embed_tokens.weight", "proj.weight"})
    # 8 bits in the hybrid kernels' range (plan.round_to_nearest)
    assert all(weight.bits == 8 and weight.qdata.min() >= -127 for weight in plan.weights.values())


def test_8da8w_computes_the_plans_model_with_per_token_int8_activations(tied, tied_8da8w):
    plan, _, encoded = tied_8da8w
    with dequantized(tied, plan), torch.no_grad():
        expected = tied(TOKENS).numpy()
    with torch.no_grad():
        weight_only = tied(TOKENS).numpy()
    for runner in interpreters(encoded):
        (got,) = runner(tokens=TOKENS.numpy()).values()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert np.abs(got - weight_only).max() > 1e-3 * np.abs(expected).max()  # the activations were quantized


def test_8da4w_linears_and_the_tied_lookup_take_one_blockwise_int4_constant_with_fp16_scales(tied_8da4w):
    """The form XNNPACK runs as its qd8 x qb4w kernel (and ai-edge-quantizer's dynamic_wi4b32_afp32
    recipe writes): an INT4 [rows, columns] constant with BlockwiseQuantization details naming a FLOAT16
    [rows, groups] constant of the plan's scales, taken by each FULLY_CONNECTED as its filter and by the
    lookup as its table: no DEQUANTIZE anywhere, the integers stored once."""
    from ai_edge_litert import schema_py_generated as schema

    _, plan, encoded = tied_8da4w
    fields = ("filter", "type", "quantization", "produced_by", "asymmetric_quantize_inputs")
    assert [tuple(f[field] for field in fields) for f in quantize.fully_connected_filters(encoded)] == [
        ("proj.weight.qdata", "INT4", "blockwise", None, True),
        ("embed_tokens.weight.qdata", "INT4", "blockwise", None, True),
    ]
    (lookup,) = quantize.embedding_lookups(encoded)
    assert (lookup["table"], lookup["type"], lookup["quantization"], lookup["produced_by"]) == (
        "embed_tokens.weight.qdata", "INT4", "blockwise", None)
    model = schema.ModelT.InitFromPackedBuf(encoded, 0)
    (subgraph,) = model.subgraphs
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    ops = [names[model.operatorCodes[op.opcodeIndex].builtinCode] for op in subgraph.operators]
    assert "DEQUANTIZE" not in ops
    table = next(t for t in subgraph.tensors if t.name.decode() == "embed_tokens.weight.qdata")
    details = table.quantization.details
    scales = subgraph.tensors[details.scales]
    assert (details.blockSize, details.zeroPoints) == (32, -1)
    assert (scales.type, [int(d) for d in scales.shape]) == (schema.TensorType.FLOAT16, [64, 2])
    assert len(model.buffers[table.buffer].data) == 64 * 64 // 2  # two int4 values per byte, once
    assert_stored_as_planned(quantize.read_weights(encoded), plan, {"embed_tokens.weight", "proj.weight"})


def test_8da4w_computes_the_plans_model_through_both_runtimes(tied_8da4w):
    """Both runtimes quantize each input row to int8 as the eager reference does (no exact halves here,
    see the rounding test below). The converter fused the ReLU into the first linear; TFLite's
    blockwise kernel ignores fused activations, so the encoder moves it into a RELU of its own."""
    module, plan, encoded = tied_8da4w
    with dequantized(module, plan), torch.no_grad():
        expected = module(TOKENS).numpy()
    with replaced_weights(module, {name: w.dequantize() for name, w in plan.weights.items()}), torch.no_grad():
        weight_only = module(TOKENS).numpy()
    for runner in interpreters(encoded):
        (got,) = runner(tokens=TOKENS.numpy()).values()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert np.abs(got - weight_only).max() > 1e-3 * np.abs(expected).max()  # the activations were quantized
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(encoded, 0)
    ops = model.subgraphs[0].operators
    codes = [model.operatorCodes[op.opcodeIndex].builtinCode for op in ops]
    fc = codes.index(schema.BuiltinOperator.FULLY_CONNECTED)
    assert ops[fc].builtinOptions.fusedActivationFunction == schema.ActivationFunctionType.NONE
    assert codes[fc + 1] == schema.BuiltinOperator.RELU and ops[fc + 1].inputs[0] == ops[fc].outputs[0]


def test_xnnpack_rounds_exact_halves_as_the_eager_reference_and_the_builtin_kernels_away_from_zero():
    """What the gate's reference assumes about the runtimes, measured on one blockwise linear: each
    token's values sit on exact halves of its int8 step. XNNPACK's qd8 conversion rounds them to even,
    as quant/eager.py (torchao) does, and matches it to float precision; TFLite's builtin kernel
    (BatchQuantizeFloats) rounds them away from zero and differs by whole steps."""
    import litert_torch

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(256, 128, bias=False)).eval()
    plan = make_plan(linear, resolve_scheme("8da4w"))
    inputs = lower.weight_inputs(linear, plan)
    x = (torch.randint(-128, 127, (1, 32, 256), generator=torch.Generator().manual_seed(1)).float() + 0.5) / 32
    x[..., 0], x[..., 1] = -128 / 32, 127 / 32  # every token's range: [-128, 127] steps of 1/32, zero point 0
    sample = {"tokens": x, **{key: dict(linear.named_parameters())[name].detach() for key, name in inputs.items()}}
    converted = litert_torch.convert(WeightsAsInputs(linear, inputs).eval(), (), sample_kwargs=sample).model_content()
    encoded = quantize.encode(bytes(converted), plan)
    with dequantized(linear, plan), torch.no_grad():
        expected = linear(x)
    xnnpack, builtin = (torch.from_numpy(runner(tokens=x.numpy())["output_0"]) for runner in interpreters(encoded))
    relative = [((got - expected).norm(dim=-1) / expected.norm(dim=-1)).squeeze(0) for got in (xnnpack, builtin)]
    assert relative[0].max() < 1e-6
    assert (relative[1] > 1e-3).all()


def test_what_the_hybrid_kernels_cannot_take_is_refused_by_weight_name(small):
    plan = make_plan(small, resolve_scheme("8da8w"))
    weight = plan.weights["proj.weight"]
    lowest = weight.qdata.clone()
    lowest[0, 0] = -128
    for changed, message in (
        (replace(weight, qdata=lowest), "^proj.weight: integer -128 with int8 dynamic activations"),
        (replace(weight, zero_point=torch.ones_like(weight.zero_point)), "^proj.weight: nonzero zero points"),
        (replace(weight, activations="int8_symmetric"), "^proj.weight: activation quantization 'int8_symmetric'"),
        (replace(weight, scale=weight.scale.repeat(1, 2), zero_point=weight.zero_point.repeat(1, 2), group_size=32),
         "^proj.weight: 8-bit weights in groups of 32 columns with int8 dynamic activations are not encoded"),
    ):
        with pytest.raises(QwenMobileError, match=message):
            quantize.check_encodable(replace(plan, weights={**plan.weights, "proj.weight": changed}))


def test_what_the_blockwise_kernels_cannot_take_is_refused_by_weight_name(small):
    """Each plan scale must be exact in fp16 (and normal there, where XNNPACK's kernel takes it), the
    weights symmetric, the blocks a multiple of 32 columns: refused by name, never re-rounded."""
    plan = make_plan(small, resolve_scheme("8da4w"))
    quantize.check_encodable(plan)
    weight = plan.weights["proj.weight"]  # [96, 64]: groups of 32
    inexact, subnormal = weight.scale.clone(), weight.scale.clone()
    inexact[3, 1] = 2.0**-20 * (1 + 2.0**-7)  # bf16-exact; below fp16's normal range its spacing is 2**-24
    assert inexact[3, 1].item() == inexact[3, 1].to(torch.bfloat16).float().item()
    subnormal[5, 0] = 2.0**-16  # exact in fp16, but subnormal there
    for changed, message in (
        (replace(weight, scale=inexact), r"^proj.weight: a scale is not exact in fp16 \(row 3, group 1"),
        (replace(weight, scale=subnormal), r"^proj.weight: a scale is subnormal in fp16 \(row 5, group 0"),
        (replace(weight, zero_point=torch.ones_like(weight.zero_point)), "^proj.weight: nonzero zero points in 4-bit"),
        (replace(weight, scale=weight.scale.repeat_interleave(2, 1), zero_point=weight.zero_point.repeat_interleave(2, 1),
                 group_size=16), "^proj.weight: 4-bit groups of 16 columns with int8 dynamic activations"),
    ):
        with pytest.raises(QwenMobileError, match=message):
            quantize.check_encodable(replace(plan, weights={**plan.weights, "proj.weight": changed}))
    # a weight-only int4 weight (a DEQUANTIZE's input, or the lookup's table) may have fp16-subnormal scales
    weight_only = make_plan(small, resolve_scheme("int4"))
    embedding = weight_only.weights["embed_tokens.weight"]
    quantize.check_encodable(replace(weight_only, weights={
        **weight_only.weights, "embed_tokens.weight": replace(embedding, scale=torch.full_like(embedding.scale, 2.0**-16))}))


def test_a_dynamic_weight_that_no_fully_connected_takes_is_refused_by_name(small, tied, tied_8da8w):
    """The embedding lookup cannot quantize its activations: a plan that says it does is refused,
    whether the lookup is the weight's only consumer or shares it with the tied lm_head."""
    plan = make_plan(small, resolve_scheme("8da8w"))
    embedding = replace(plan.weights["embed_tokens.weight"], activations=INT8_ASYMMETRIC_PER_TOKEN)
    plan.weights["embed_tokens.weight"] = embedding
    with pytest.raises(QwenMobileError, match="^embed_tokens.weight: no FULLY_CONNECTED takes it as its filter"):
        quantize.encode(convert(small, plan), plan)

    tied_plan, converted, _ = tied_8da8w
    embedding = replace(tied_plan.weights["embed_tokens.weight"], activations=INT8_ASYMMETRIC_PER_TOKEN)
    tied_plan = replace(tied_plan, weights={**tied_plan.weights, "embed_tokens.weight": embedding})
    with pytest.raises(QwenMobileError, match="^embed_tokens.weight: EMBEDDING_LOOKUP takes it in the serving_default "
                                              "signature; the tflite backend quantizes activations only"):
        quantize.encode(converted, tied_plan)


def test_a_model_converted_without_the_plans_inputs_is_refused_by_weight_name(small, float_flatbuffer):
    """Converted with its weights as float constants: encode finds no input to replace and says which."""
    plan = make_plan(small, resolve_scheme("int8"))
    with pytest.raises(QwenMobileError, match="embed_tokens.weight: the converted model takes no input"):
        quantize.encode(float_flatbuffer, plan)


def test_an_input_whose_shape_is_not_the_plans_weight_is_refused(small):
    plan = make_plan(small, resolve_scheme("int8"))
    converted = convert(small, plan)
    weight = plan.weights["proj.weight"]  # [96, 64]
    plan.weights["proj.weight"] = replace(
        weight, qdata=weight.qdata.T.contiguous(), scale=weight.scale[:64], zero_point=weight.zero_point[:64], group_size=96
    )
    with pytest.raises(QwenMobileError, match=r"proj.weight: the converted input is \[96, 64\], the plan's weight \[64, 96\]"):
        quantize.encode(converted, plan)
