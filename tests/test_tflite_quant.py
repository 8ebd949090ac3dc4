"""The plan's integers and scales, encoded into a converted flatbuffer as they are (no re-rounding).

A small Embedding -> Linear -> Linear module keeps this fast; the full model's quantized
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
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import make_plan, resolve_scheme


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(64, 64)
        self.proj = nn.Linear(64, 96, bias=False)
        self.lm_head = nn.Linear(96, 64, bias=False)

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.proj(self.embed_tokens(tokens))))


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


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_ints_in_the_file_are_the_plans_and_it_computes_the_plans_model(small, float_flatbuffer, scheme):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    plan = make_plan(small, resolve_scheme(scheme))
    assert set(plan.weights) == {"embed_tokens.weight", "proj.weight", "lm_head.weight"}
    converted = convert(small, plan)
    assert len(converted) < 4096  # the converter saw no weight values
    encoded = quantize.encode(converted, plan)
    with dequantized(small, plan), torch.no_grad():
        expected = small(TOKENS).numpy()

    stored = quantize.read_weights(encoded)
    assert set(stored) == set(plan.weights)
    for name, weight in plan.weights.items():
        assert stored[name]["bits"] == weight.bits
        np.testing.assert_array_equal(stored[name]["qdata"].reshape(weight.qdata.shape), weight.qdata.numpy())
        np.testing.assert_array_equal(stored[name]["scale"], weight.scale.reshape(-1).numpy())
        np.testing.assert_array_equal(stored[name]["zero_point"], weight.zero_point.reshape(-1).numpy())
    assert len(encoded) < len(float_flatbuffer) / (3 if scheme == "int8" else 4)  # the float copies are gone

    for options in ({}, {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}):
        runner = Interpreter(model_content=encoded, **options).get_signature_runner()
        assert set(runner.get_input_details()) == {"tokens"}  # the weights are constants again
        (got,) = runner(tokens=TOKENS.numpy()).values()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_int4_packs_two_values_per_byte_low_nibble_first():
    values = np.array([-8, 7, -1, 0, 3], dtype=np.int8)
    packed = quantize.pack_int4(values)
    assert packed == bytes([0x78, 0x0F, 0x03])
    np.testing.assert_array_equal(quantize.unpack_int4(packed, 5), values)


def test_a_plan_with_activation_quantization_is_refused_by_name(small):
    plan = make_plan(small, resolve_scheme("8da4w"))
    with pytest.raises(QwenMobileError, match="int8_asymmetric_per_token.*weight-only int8/int4"):
        quantize.check_encodable(plan)


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
