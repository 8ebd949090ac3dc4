"""The Core ML emulator op by op (against coremltools' own value inference, or hand-computed
values where coremltools has none), the gated delta rule composite through a saved
program, and the error for an op the emulator does not know."""

import numpy as np
import pytest
import torch

from qwen_mobile.backends.coreml import composite, emulator, emulator_ops
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.ops.gated_delta_rule import recurrent_gated_delta_rule

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

RNG = np.random.default_rng(0)
A = RNG.standard_normal((2, 3, 4)).astype(np.float32)
B = RNG.standard_normal((2, 4, 5)).astype(np.float32)
W = RNG.standard_normal((6, 4)).astype(np.float32)
I32 = np.array([[3, 0, 2]], dtype=np.int32)

# op -> MIL inputs; the expected value is coremltools' value inference for that op
VALUE_INFERENCE_CASES = {
    "add": dict(x=A, y=np.float32(1.5)),
    "sub": dict(x=A, y=A[:1]),
    "mul": dict(x=A, y=A),
    "real_div": dict(x=A, y=np.float32(3.0)),
    "pow": dict(x=A, y=np.float32(2.0)),
    "matmul": dict(x=A, y=B),
    "matmul_transposed": dict(x=A, y=A, transpose_y=True),
    "linear": dict(x=A, weight=W, bias=np.arange(6, dtype=np.float32)),
    "exp": dict(x=A),
    "sin": dict(x=A),
    "cos": dict(x=A),
    "sigmoid": dict(x=A),
    "softplus": dict(x=A),
    "rsqrt": dict(x=np.abs(A) + 0.1, epsilon=np.float32(1e-3)),
    "reduce_mean": dict(x=A, axes=[-1], keep_dims=True),
    "reduce_sum": dict(x=A, axes=[0, 2], keep_dims=False),
    "softmax": dict(x=A, axis=-1),
    "cumsum": dict(x=A, axis=-1),
    "cast": dict(x=A, dtype="fp16"),
    "equal": dict(x=I32, y=np.int32(2)),
    "less": dict(x=I32, y=np.int32(2)),
    "less_equal": dict(x=I32, y=np.int32(2)),
    "greater": dict(x=I32, y=np.int32(2)),
    "greater_equal": dict(x=I32, y=np.int32(2)),
    "select": dict(cond=A > 0, a=A, b=-A),
    "reshape": dict(x=A, shape=np.array([3, -1], dtype=np.int32)),
    "transpose": dict(x=A, perm=[2, 0, 1]),
    "expand_dims": dict(x=A, axes=[0, -1]),
    "tile": dict(x=A, reps=[1, 2, 1]),
    "concat": dict(values=[A, A * 2], axis=1),
    "split": dict(x=A, split_sizes=[1, 3], axis=2),
    "slice_by_index": dict(x=A, begin=[0, 1, 0], end=[2, 3, 3], begin_mask=[False, False, True],
                           end_mask=[True, False, False], squeeze_mask=[False, False, False]),
    "slice_update": dict(x=A, update=np.zeros((2, 1, 4), np.float32), begin=np.array([0, 2, 0], np.int32),
                         end=np.array([2, 3, 4], np.int32)),
    "gather": dict(x=W, indices=np.array([[5, 0, -1]], np.int32), axis=0),
}


def value_inference(op: str, inputs: dict):
    results = {}

    @mb.program(input_specs=[mb.TensorSpec((1,))], opset_version=ct.target.iOS18)
    def program(unused):
        out = getattr(mb, op)(**inputs)
        results["out"] = [o.val for o in out] if isinstance(out, (list, tuple)) else out.val
        return unused

    return results["out"]


@pytest.mark.parametrize("case", sorted(VALUE_INFERENCE_CASES))
def test_each_op_matches_coremltools_value_inference(case):
    op = case.removesuffix("_transposed")
    inputs = VALUE_INFERENCE_CASES[case]
    expected = value_inference(op, inputs)
    got = emulator_ops.OPS[op](**inputs)
    if isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    else:
        assert expected is not None, f"coremltools infers no value for {op}"
        np.testing.assert_allclose(np.asarray(got, dtype=np.asarray(expected).dtype), expected, rtol=1e-6, atol=1e-6)


def test_silu_and_the_grouped_conv_against_torch():
    x = torch.from_numpy(A)
    torch.testing.assert_close(torch.from_numpy(emulator_ops.silu(A)), torch.nn.functional.silu(x))
    window = RNG.standard_normal((1, 6, 9)).astype(np.float32)
    depthwise = RNG.standard_normal((6, 1, 4)).astype(np.float32)
    expected = torch.nn.functional.conv1d(torch.from_numpy(window), torch.from_numpy(depthwise), groups=6)
    got = emulator_ops.conv(window, depthwise, strides=[1], pad_type="valid", pad=[0, 0], dilations=[1], groups=6)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)
    grouped = RNG.standard_normal((4, 3, 2)).astype(np.float32)  # 2 groups of 3 inputs, padding and dilation
    expected = torch.nn.functional.conv1d(torch.from_numpy(window), torch.from_numpy(grouped), groups=2, padding=1,
                                          dilation=2)
    got = emulator_ops.conv(window, grouped, pad_type="custom", pad=[1, 1], dilations=[2], groups=2)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


def test_state_ops_read_and_update_in_place():
    store = {"s": np.zeros((2, 2), np.float16)}
    ref = emulator_ops.StateRef("s", store)
    emulator_ops.coreml_update_state(state=ref, value=np.full((2, 2), 1 / 3, np.float32))
    assert store["s"].dtype == np.float16 and store["s"][0, 0] == np.float16(1 / 3)
    emulator_ops.write_state(input=ref, data=np.ones((2, 2), np.float16))
    assert np.array_equal(emulator_ops.read_state(input=ref), np.ones((2, 2)))
    with pytest.raises(QwenMobileError, match="state s"):
        emulator_ops.write_state(input=ref, data=np.ones((3,), np.float16))


def test_blockwise_shift_scale_by_hand():
    data = np.array([[1, -2, 3, 4], [-8, 7, 0, 2]], np.int8)
    scale = np.array([[0.5, 2.0], [1.0, 0.25]], np.float32)  # blocks of 2 columns
    offset = np.array([[0, 1], [-1, 0]], np.int8)
    expected = np.array([[0.5, -1.0, 4.0, 6.0], [-7.0, 8.0, 0.0, 0.5]], np.float32)
    np.testing.assert_array_equal(emulator_ops.constexpr_blockwise_shift_scale(data, scale, offset), expected)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_blockwise_shift_scale_a_block_of_rows_at_a_time_gives_the_whole_computation(monkeypatch, dtype):
    generator = np.random.default_rng(0)
    data = generator.integers(-8, 8, size=(12, 3, 8)).astype(np.int8)  # a conv-shaped weight too
    scale = generator.uniform(0.01, 2.0, size=(6, 3, 2)).astype(dtype)  # blocks of 2 rows, 4 columns
    offset = generator.integers(-2, 3, size=(6, 3, 2)).astype(np.int8)
    def by_element(t):
        return t.astype(np.float32).repeat(2, 0).repeat(4, 2)

    whole = (data.astype(np.float32) - by_element(offset)) * by_element(scale)
    monkeypatch.setattr(emulator_ops, "DEQUANTIZED_BLOCK_ELEMENTS", 3 * 8 * 3)  # rounds up to whole scale blocks
    result = emulator_ops.constexpr_blockwise_shift_scale(data, scale, offset)
    assert result.dtype == dtype
    np.testing.assert_array_equal(result, whole.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_linear_a_block_of_weight_rows_at_a_time_gives_the_whole_computation(monkeypatch, dtype):
    generator = np.random.default_rng(1)
    x = generator.standard_normal((1, 5, 16)).astype(dtype)
    weight = generator.standard_normal((23, 16)).astype(dtype)  # 23 rows: the last block is short
    bias = generator.standard_normal(23).astype(np.float32)
    whole = np.matmul(x.astype(np.float32), weight.astype(np.float32).T) + bias
    monkeypatch.setattr(emulator_ops, "DEQUANTIZED_BLOCK_ELEMENTS", 4 * 16)
    result = emulator_ops.linear(x, weight, bias)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, whole)


def test_int4_unpacking_is_low_nibble_first_and_signed():
    raw = np.array([0x21, 0xF8], np.uint8)
    assert emulator.unpack_sub_byte(raw, 25, 4).tolist() == [1, 2, -8, -1]
    assert emulator.unpack_sub_byte(raw, 35, 3).tolist() == [1, 2, 8]


def saved_program(tmp_path, build, input_specs, name):
    """An mb program converted and saved as an mlpackage, as the exporter saves its functions."""
    program = mb.program(input_specs=input_specs, opset_version=ct.target.iOS18)(build)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    path = tmp_path / f"{name}.mlpackage"
    model.save(str(path))
    return emulator.Package(path)


@pytest.mark.parametrize("length", [1, 37, 128])
def test_the_gated_delta_rule_composite_runs_the_recurrence(tmp_path, length):
    """Step form (T=1), one chunk (T=37) and two 64-token chunks (T=128), 3 value heads per key head."""
    generator = torch.Generator().manual_seed(length)
    q, k = (torch.nn.functional.normalize(torch.randn(1, length, 2, 16, generator=generator), dim=-1) for _ in "qk")
    v = torch.randn(1, length, 6, 8, generator=generator)
    g = -torch.rand(1, length, 6, generator=generator)
    beta = torch.rand(1, length, 6, generator=generator)
    state = torch.randn(1, 6, 16, 8, generator=generator)
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta, state=state)
    specs = [mb.TensorSpec(tuple(t.shape)) for t in tensors.values()]

    def build(q, k, v, g, beta, state):
        out, final = composite.build(q, k, v, g, beta, state, "gdr")
        return mb.identity(x=out, name="out"), mb.identity(x=final, name="final")

    package = saved_program(tmp_path, build, specs, f"gdr{length}")
    function = next(iter(package.functions.values()))
    inputs = dict(zip(function.inputs, (t.numpy() for t in tensors.values())))
    results = package.run(next(iter(package.functions)), inputs, {})
    expected_out, expected_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    out, final = (torch.from_numpy(results[name]) for name in function.outputs)
    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(final, expected_state, atol=2e-5, rtol=1e-4)
    assert function.op_types <= {"const", "identity", "transpose", "reshape", "tile", "expand_dims", "cast", "exp", "mul",
                                 "add", "sub", "matmul", "cumsum", "slice_by_index", "concat"}


def test_an_op_the_emulator_does_not_know_is_named(tmp_path):
    package = saved_program(tmp_path, lambda x: mb.erf(x=x, name="y"), [mb.TensorSpec((2,))], "erf")
    with pytest.raises(QwenMobileError, match="'erf'"):
        package.check_supported()
    with pytest.raises(QwenMobileError, match="'erf'"):
        package.run("main", {"x": np.zeros(2, np.float32)}, {})


def test_an_unreadable_package_is_a_clear_error(tmp_path):
    (tmp_path / "bad.mlpackage" / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (tmp_path / "bad.mlpackage" / emulator.SPEC).write_bytes(b"\x08\x09garbage")
    with pytest.raises(QwenMobileError, match="model.mlmodel"):
        emulator.Package(tmp_path / "bad.mlpackage")


def test_each_constant_op_runs_just_before_its_first_reader_and_every_other_op_keeps_its_place():
    """As coremltools saves a program: every constexpr op first. Each moves to its first reader
    (with the const it reads), so a call holds one decompressed weight at a time, not all."""
    def op(kind, name, inputs, outputs):
        return emulator.Operation(kind, name, inputs, [(output, 11, None) for output in outputs], {})

    blob = np.zeros(4, np.int8)
    operations = [
        op("const", "scale", {}, ["scale"]),
        op("constexpr_blockwise_shift_scale", "w1", {"data": blob, "scale": "scale"}, ["w1"]),
        op("constexpr_blockwise_shift_scale", "w2", {"data": blob, "scale": "scale"}, ["w2"]),
        op("constexpr_blockwise_shift_scale", "unread", {"data": blob, "scale": "scale"}, ["unread"]),
        op("add", "first", {"x": "x", "y": "x"}, ["h0"]),
        op("constexpr_blockwise_shift_scale", "computed", {"data": "h0"}, ["c"]),  # reads a computed value: stays
        op("linear", "second", {"x": "h0", "weight": "w2"}, ["h1"]),
        op("concat", "third", {"values": ["h1", "w1", "c"]}, ["logits"]),
    ]
    ordered = emulator.constants_at_first_use(operations, ["logits"])
    assert [o.name for o in ordered] == ["first", "computed", "scale", "w2", "second", "w1", "third"]


def test_a_call_drops_each_value_after_its_last_reader_and_keeps_the_outputs():
    def op(name, inputs, outputs):
        return emulator.Operation("add", name, inputs, [(output, 11, None) for output in outputs], {})

    operations = [
        op("decompress", {"x": "weight_data"}, ["weight"]),          # read by "use" only
        op("use", {"x": "x", "y": "weight"}, ["h"]),
        op("unread", {"x": "h"}, ["dead"]),                          # a result nothing reads
        op("last", {"x": "h", "y": ["x", "h"]}, ["logits"]),         # variadic inputs count too
    ]
    assert emulator.last_reads(operations, ["logits"]) == [["weight_data"], ["weight"], ["dead"], ["x", "h"]]
