"""Encode the core's quantization plan into a converted .tflite exactly, without re-rounding.

The model is converted with every planned weight as a signature input named
`input_name(weight)` (lower.convert says why), so the converter never holds the weights.
Each such input then becomes, in every signature that takes it, a constant of the plan's
own integers and scales, and leaves the signature's inputs. The constant's bytes are one
buffer of the file, which every signature's tensor points at (a tied lm_head and the
embedding share it too).

How a weight is stored depends on its bits and groups (`stored_form`):

- `per_channel` (8 bits, one scale per row): an INT8 constant [rows, columns] quantized per
  channel on axis 0, with the plan's float32 scale and zero point per row.
- `blockwise` (4 bits, groups of `group_size` columns, one group per row included): a packed
  INT4 constant [rows, columns] whose QuantizationParameters carry BlockwiseQuantization
  details: a FLOAT16 constant [rows, groups] of the plan's scales, no zero points (symmetric),
  block size = group_size. That is what ai-edge-quantizer's dynamic_wi4b32_afp32 recipe
  writes, and what LiteRT's XNNPACK delegate defines as a qbint4 tensor with fp16 scales
  (packed once, then run by its qd8 x qb4w GEMMs) and TFLite's builtin kernels read as they are.
  The plan's scales are bf16-exact (quant.plan.bf16_ceil); each must also be exact in fp16,
  and normal there where XNNPACK's kernel takes it (`check_encodable` refuses by weight name).
- `grouped` (8 bits in groups): an INT8 constant [rows * groups, group_size] with scale 1.

Its consumers take it as follows:

- a FULLY_CONNECTED taking it as its filter, for a weight with int8 dynamic per-token
  activations (8da8w, 8da4w): directly, no DEQUANTIZE. `per_channel`: TFLite's hybrid
  FULLY_CONNECTED (version 12, asymmetricQuantizeInputs), XNNPACK's qd8-f32-qc8w kernel.
  `blockwise`: the blockwise FULLY_CONNECTED, XNNPACK's qd8-f32-qb4w kernel (qdu8 on x86 with
  VNNI), TFLite's EvalBlockwise4Bit. Both quantize each input row to int8 with its own scale
  and zero point, as quant/eager.py does.
- an EMBEDDING_LOOKUP taking it as its table (`per_channel` or `blockwise`): directly
  (version 4, the hybrid lookup): the kernel gathers the quantized rows and scales only
  those, so no float copy of the table exists at run time. XNNPACK does not take the lookup;
  TFLite's kernel runs it in both runtimes.
- any other consumer (weight-only linears: int8, int4): the weight dequantized, as float32.
  `per_channel`: DEQUANTIZE. `blockwise` and `grouped`: an alias of the integers' buffer
  [rows * groups, group_size] with scale 1 -> DEQUANTIZE -> MUL by the scales (an alias of
  the scales' buffer [rows * groups, 1], DEQUANTIZE'd from fp16) -> RESHAPE [rows, columns].
  LiteRT's XNNPACK delegate unpacks such weights to float32 when it prepares the model (at
  the Qwen3.5-0.8B shape the int8 bundle held 14.6 GiB at run time and decoded at float
  speed): weight-only schemes are size-only on LiteRT's CPU path.

- a FULLY_CONNECTED taking it as its filter, for a weight with static activations (a8w8,
  a16w8; `per_channel` only): an integer FULLY_CONNECTED. Its float input goes through a
  QUANTIZE to INT8 (a8w8) or INT16 (a16w8) with the plan's input scale and zero point (one
  QUANTIZE per FULLY_CONNECTED, each with its own linear's range), the FULLY_CONNECTED writes
  INT8 / INT16 at the plan's output scale and zero point (int32 accumulators requantized per
  channel: TFLite's int8 kernel and, for int16 x int8, its 16x8 kernel), and a DEQUANTIZE hands
  float32 to the ops after it. Everything between two linears (norms, the depthwise conv, the
  Gated DeltaNet recurrence, rotary embedding, softmax attention, SiLU gates, residual adds)
  stays float32: see docs/tflite.md, "Static activations for NPUs", for which and why.

Any other consumer of a weight with quantized activations is refused. Builtin ops only.
`read_weights`, `fully_connected_filters`, `embedding_lookups` and `static_ranges` read the
integers, scales, consumers and activation ranges back from the file for the tests and the gate.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.eager import INT8_ASYMMETRIC_PER_TOKEN
from qwen_mobile.quant.plan import QuantizedWeight, QuantPlan
from qwen_mobile.quant.static import INT16_STATIC, StaticRange, is_static

TFLITE_FILE_IDENTIFIER = b"TFL3"
# The version TFLite's op_version.cc gives a FULLY_CONNECTED with a float input, a per-channel
# int8 filter and a float output; a runtime without that kernel then refuses the model.
HYBRID_FULLY_CONNECTED_VERSION = 12
# op_version.cc: an EMBEDDING_LOOKUP of an INT4 or per-channel quantized table
QUANTIZED_LOOKUP_VERSION = 4
# op_version.cc for the static-activation ops: QUANTIZE to INT8 1, to INT16 2; DEQUANTIZE of INT8 2,
# of INT16 3; an integer FULLY_CONNECTED 6 with two inputs, 5 with keep_num_dims, 4 otherwise
QUANTIZE_VERSIONS, DEQUANTIZE_VERSIONS = {"int8": 1, "int16": 2}, {"int8": 2, "int16": 3}
# XNNPACK's blockwise GEMMs take blocks of a multiple of 32 columns (xnnpack_delegate.cc);
# TFLite's blockwise FULLY_CONNECTED runs only where its 4-bit kernel applies: at least 4
# output rows and 32 input columns (kernels/fully_connected.cc, optimized_4bit FilterWidth/Depth)
XNNPACK_BLOCK_MULTIPLE = 32
BUILTIN_BLOCKWISE_MIN_ROWS, BUILTIN_BLOCKWISE_MIN_COLUMNS = 4, 32
FP16_SMALLEST_NORMAL = 2.0**-14
# flatbuffers address everything with signed 32-bit offsets, so the Python Builder stops at 2 GiB.
# Past INLINE_LIMIT bytes of buffer data (the rest, about 256 MiB of headroom, is for the
# structure: tensors, ops, per-channel scales and zero points, in both signatures) the constant
# buffers are written after the flatbuffer instead (`serialize`).
FLATBUFFER_MAX_BYTES = 2**31 - 1
INLINE_LIMIT = FLATBUFFER_MAX_BYTES - 2**28
# TFLite's layout for buffers outside the flatbuffer (schema.fbs, Buffer.offset / size; the
# converter's use_buffer_offset): each starts 16-byte aligned, the last is followed by 16 zero
# bytes (XNNPACK's kernels may read up to 16 bytes past a weight), and a metadata entry of this
# name tells tools reading a tflite::Model without its file that the weights are not in it
BUFFER_ALIGNMENT = 16
BUFFER_LOCATION_METADATA = b"buffer_location"

PER_CHANNEL, BLOCKWISE, GROUPED = "per_channel", "blockwise", "grouped"


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def stored_form(weight: QuantizedWeight) -> str:
    """How the file stores a planned weight (see the module doc)."""
    if weight.bits == 4:
        return BLOCKWISE
    return PER_CHANNEL if weight.group_size == weight.qdata.shape[1] else GROUPED


def _first_scale(weight: QuantizedWeight, bad: torch.Tensor) -> str:
    row, group = (int(i) for i in bad.nonzero()[0])
    return f"row {row}, group {group}: {float(weight.scale[row, group]):.9g}"


def check_encodable(plan: QuantPlan) -> None:
    """Refuse, by weight name, what the file cannot hold as the plan has it."""
    for name, weight in plan.weights.items():
        if weight.bits not in (4, 8):
            raise QwenMobileError(f"{name}: {weight.bits}-bit weights are not encoded by the tflite backend")
        form = stored_form(weight)
        rows, columns = weight.qdata.shape
        if form != PER_CHANNEL:
            scale = weight.scale.float()
            inexact = scale.half().float() != scale
            if bool(inexact.any()):
                raise QwenMobileError(
                    f"{name}: a scale is not exact in fp16 ({_first_scale(weight, inexact)}); the tflite backend stores "
                    "grouped scales in fp16 and never re-rounds a plan"
                )
            if form == BLOCKWISE and bool(weight.zero_point.any()):
                raise QwenMobileError(
                    f"{name}: nonzero zero points in 4-bit weights are not encoded by the tflite backend (blockwise INT4 "
                    "is symmetric)"
                )
        if weight.activations is None:
            continue
        if is_static(weight.activations):
            check_static(name, weight, plan.activation_ranges.get(name))
            continue
        if weight.activations != INT8_ASYMMETRIC_PER_TOKEN:
            raise QwenMobileError(
                f"{name}: activation quantization {weight.activations!r} is not encoded by the tflite backend "
                f"(weight-only, {INT8_ASYMMETRIC_PER_TOKEN} and static int8/int16 are)"
            )
        if form == GROUPED:
            raise QwenMobileError(
                f"{name}: 8-bit weights in groups of {weight.group_size} columns with int8 dynamic activations are not "
                "encoded by the tflite backend (its hybrid FULLY_CONNECTED takes int8 weights with one scale per row)"
            )
        if form == PER_CHANNEL:
            if bool(weight.zero_point.any()):
                raise QwenMobileError(
                    f"{name}: nonzero zero points with int8 dynamic activations are not encoded by the tflite backend "
                    "(its hybrid FULLY_CONNECTED takes symmetric weights)"
                )
            if int(weight.qdata.min()) < -127:
                raise QwenMobileError(
                    f"{name}: integer -128 with int8 dynamic activations is not encoded by the tflite backend (its "
                    "hybrid FULLY_CONNECTED takes weights in [-127, 127]; see quant.plan.round_to_nearest)"
                )
            continue
        # blockwise with dynamic activations: what XNNPACK's qd8 x qb4w kernel and TFLite's blockwise kernel take
        if weight.group_size % XNNPACK_BLOCK_MULTIPLE:
            raise QwenMobileError(
                f"{name}: 4-bit groups of {weight.group_size} columns with int8 dynamic activations are not encoded by "
                f"the tflite backend (XNNPACK's blockwise kernel takes blocks of a multiple of {XNNPACK_BLOCK_MULTIPLE})"
            )
        if rows < BUILTIN_BLOCKWISE_MIN_ROWS or columns < BUILTIN_BLOCKWISE_MIN_COLUMNS:
            raise QwenMobileError(
                f"{name}: a [{rows}, {columns}] 4-bit weight with int8 dynamic activations is not encoded by the tflite "
                f"backend (TFLite's blockwise kernel needs at least {BUILTIN_BLOCKWISE_MIN_ROWS} rows and "
                f"{BUILTIN_BLOCKWISE_MIN_COLUMNS} columns)"
            )
        subnormal = weight.scale.float() < FP16_SMALLEST_NORMAL
        if bool(subnormal.any()):
            raise QwenMobileError(
                f"{name}: a scale is subnormal in fp16 ({_first_scale(weight, subnormal)}); XNNPACK's blockwise kernel "
                "takes normal fp16 scales only and would leave this linear to a slow fallback"
            )


def check_static(name: str, weight: QuantizedWeight, spec: StaticRange | None) -> None:
    """What TFLite's integer FULLY_CONNECTED takes: int8 weights per channel, symmetric, in
    [-127, 127]; a range for input and output; int16 activations with zero point 0 (16x8 kernel)."""
    if spec is None or spec.activations != weight.activations:
        raise QwenMobileError(f"{name}: static activations ({weight.activations}) without their range in the plan")
    if weight.bits != 8 or stored_form(weight) != PER_CHANNEL:
        raise QwenMobileError(
            f"{name}: {weight.bits}-bit weights in groups of {weight.group_size} with static activations are not encoded "
            "by the tflite backend (its integer FULLY_CONNECTED takes int8 weights with one scale per row)"
        )
    if bool(weight.zero_point.any()) or int(weight.qdata.min()) < -127:
        raise QwenMobileError(
            f"{name}: static activations need symmetric int8 weights in [-127, 127] (TFLite's per-channel integer "
            "FULLY_CONNECTED)"
        )
    scales = (spec.input_scale, spec.output_scale)
    if not all(scale > 0 and np.float32(scale) == scale for scale in scales):
        raise QwenMobileError(f"{name}: activation scales {scales} are not positive float32 values")
    if not all(spec.qmin <= zero <= spec.qmax for zero in (spec.input_zero_point, spec.output_zero_point)):
        raise QwenMobileError(f"{name}: an activation zero point is outside the {spec.activations} range")
    if spec.activations == INT16_STATIC and (spec.input_zero_point or spec.output_zero_point):
        raise QwenMobileError(f"{name}: int16 activations need zero point 0 (TFLite's 16x8 FULLY_CONNECTED)")


def _opcode_index(model, builtin: int, version: int) -> int:
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and code.version == version:
            return index
    s = schema()
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _builtin(model, op) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _op_names() -> dict[int, str]:
    return {value: name for name, value in vars(schema().BuiltinOperator).items() if not name.startswith("_")}


def _type_names() -> dict[int, str]:
    return {value: name for name, value in vars(schema().TensorType).items() if not name.startswith("_")}


def _takes_at(model, op, tensor: int, builtin: int, position: int) -> bool:
    """Whether `op` is a `builtin` op taking `tensor` at input `position`, and only there."""
    inputs = [int(i) for i in op.inputs]
    return _builtin(model, op) == builtin and len(inputs) > position and inputs[position] == tensor and inputs.count(tensor) == 1


def _add_buffer(model, data: bytes) -> int:
    buffer = schema().BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8).copy()
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _new_tensor(name: str, shape, tensor_type: int, buffer: int, quantization=None):
    tensor = schema().TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = name.encode(), np.array(shape, np.int32), tensor_type, buffer
    tensor.quantization = quantization
    return tensor


def _tensor(subgraph, name: str, shape, tensor_type: int, buffer: int, quantization=None) -> int:
    subgraph.tensors.append(_new_tensor(name, shape, tensor_type, buffer, quantization))
    return len(subgraph.tensors) - 1


def _per_channel_quantization(weight: QuantizedWeight):
    params = schema().QuantizationParametersT()
    params.scale = weight.scale.reshape(-1).numpy().astype(np.float32)
    params.zeroPoint = weight.zero_point.reshape(-1).numpy().astype(np.int64)
    params.quantizedDimension = 0
    return params


def _blockwise_quantization(scales_tensor: int, block_size: int):
    s = schema()
    details = s.BlockwiseQuantizationT()
    details.scales, details.zeroPoints, details.blockSize = scales_tensor, -1, block_size
    params = s.QuantizationParametersT()
    params.detailsType, params.details = s.QuantizationDetails.BlockwiseQuantization, details
    return params


def _unit_quantization():
    """Per-tensor scale 1, zero point 0: DEQUANTIZE yields the integers themselves as floats."""
    params = schema().QuantizationParametersT()
    params.scale, params.zeroPoint = np.ones(1, np.float32), np.zeros(1, np.int64)
    params.quantizedDimension = 0
    return params


def _operator(opcode: int, inputs: list[int], outputs: list[int], options_type=None, options=None):
    op = schema().OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode, np.array(inputs, np.int32), np.array(outputs, np.int32)
    if options_type is not None:
        op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def _unfuse_activation(model, subgraph, op) -> None:
    """Move a FULLY_CONNECTED's fused activation into an op of its own after it. TFLite's blockwise
    kernel (EvalBlockwise4Bit) ignores fused activations; XNNPACK applies them, so the two
    runtimes would disagree (a fused RELU measured 0.77 apart, relative, on a two-linear model)."""
    s = schema()
    activation = op.builtinOptions.fusedActivationFunction
    if activation == s.ActivationFunctionType.NONE:
        return
    separate = {
        s.ActivationFunctionType.RELU: s.BuiltinOperator.RELU,
        s.ActivationFunctionType.RELU6: s.BuiltinOperator.RELU6,
        s.ActivationFunctionType.RELU_N1_TO_1: s.BuiltinOperator.RELU_N1_TO_1,
        s.ActivationFunctionType.TANH: s.BuiltinOperator.TANH,
    }
    if activation not in separate:
        raise QwenMobileError(f"a blockwise FULLY_CONNECTED with fused activation {activation} is not encoded by the "
                              "tflite backend")
    output = int(op.outputs[0])
    before = subgraph.tensors[output]
    raw = _tensor(subgraph, before.name.decode() + ".before_activation", [int(d) for d in before.shape], before.type, 0)
    op.outputs = np.array([raw], np.int32)
    op.builtinOptions.fusedActivationFunction = s.ActivationFunctionType.NONE
    operators = list(subgraph.operators)
    operators.insert(operators.index(op) + 1, _operator(_opcode_index(model, separate[activation], 1), [raw], [output]))
    subgraph.operators = operators


def _per_tensor_quantization(scale: float, zero_point: int):
    params = schema().QuantizationParametersT()
    params.scale, params.zeroPoint = np.array([scale], np.float32), np.array([zero_point], np.int64)
    params.quantizedDimension = 0
    return params


def _static_fully_connected(model, subgraph, op, name: str, spec: StaticRange) -> None:
    """Make a FULLY_CONNECTED whose filter is now the plan's per-channel INT8 constant an integer
    one: QUANTIZE (the plan's input range) -> it, writing the plan's output range -> DEQUANTIZE
    into the float32 tensor it wrote before (see the module doc)."""
    s = schema()
    kind = "int16" if spec.activations == INT16_STATIC else "int8"
    qtype = s.TensorType.INT16 if kind == "int16" else s.TensorType.INT8
    if len(op.inputs) > 2 and int(op.inputs[2]) >= 0:
        raise QwenMobileError(f"{name}: a linear with a bias is not encoded with static activations by the tflite backend")
    _unfuse_activation(model, subgraph, op)  # the activation then runs on the float32 output, as in eager
    source, written = int(op.inputs[0]), int(op.outputs[0])
    quantized_input = _tensor(subgraph, f"{name}.input", [int(d) for d in subgraph.tensors[source].shape], qtype, 0,
                              _per_tensor_quantization(spec.input_scale, spec.input_zero_point))
    quantized_output = _tensor(subgraph, f"{name}.output", [int(d) for d in subgraph.tensors[written].shape], qtype, 0,
                               _per_tensor_quantization(spec.output_scale, spec.output_zero_point))
    op.inputs = np.array([quantized_input, *[int(i) for i in op.inputs[1:]]], np.int32)
    op.outputs = np.array([quantized_output], np.int32)
    op.builtinOptions.asymmetricQuantizeInputs = False
    version = 6 if len(op.inputs) == 2 else 5 if op.builtinOptions.keepNumDims else 4
    op.opcodeIndex = _opcode_index(model, s.BuiltinOperator.FULLY_CONNECTED, version)
    quantize = _operator(_opcode_index(model, s.BuiltinOperator.QUANTIZE, QUANTIZE_VERSIONS[kind]),
                         [source], [quantized_input])
    dequantize = _operator(_opcode_index(model, s.BuiltinOperator.DEQUANTIZE, DEQUANTIZE_VERSIONS[kind]),
                           [quantized_output], [written])
    operators = list(subgraph.operators)
    at = operators.index(op)
    subgraph.operators = operators[:at] + [quantize, op, dequantize] + operators[at + 1:]


def static_ranges(flatbuffer: bytes) -> dict[str, list[dict]]:
    """The static activation ranges the file holds, by plan weight name: per integer
    FULLY_CONNECTED (one per signature), {signature, activations (the QUANTIZE'd type), input and
    output [scale, zero point], filter (its tensor's name), quantized_by and dequantized_by (the
    ops around it)}."""
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    op_names, type_names = _op_names(), _type_names()
    signatures = {signature.subgraphIndex: signature.signatureKey.decode() for signature in model.signatureDefs}
    found: dict[str, list[dict]] = {}
    for index, subgraph in enumerate(model.subgraphs):
        producers = _producers(subgraph)
        readers = {int(i): op for op in subgraph.operators for i in op.inputs if i >= 0}
        for op in subgraph.operators:
            if _builtin(model, op) != s.BuiltinOperator.FULLY_CONNECTED:
                continue
            source, written = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
            if source.type not in (s.TensorType.INT8, s.TensorType.INT16):
                continue
            producer, reader = producers.get(int(op.inputs[0])), readers.get(int(op.outputs[0]))

            def pair(tensor):
                return [float(tensor.quantization.scale[0]), int(tensor.quantization.zeroPoint[0])]

            found.setdefault(source.name.decode().removesuffix(".input"), []).append({
                "signature": signatures.get(index, str(index)),
                "activations": type_names[source.type],
                "input": pair(source),
                "output": pair(written),
                "output_type": type_names[written.type],
                "filter": subgraph.tensors[op.inputs[1]].name.decode(),
                "quantized_by": None if producer is None else op_names[_builtin(model, producer)],
                "dequantized_by": None if reader is None else op_names[_builtin(model, reader)],
            })
    return found


def input_name(weight: str) -> str:
    """The signature input a planned weight is converted as (lower.convert): an identifier, as torch.export needs."""
    return "weight__" + weight.replace(".", "__")


class _Stored:
    """One planned weight's buffers in the file (integers, and fp16 scales where grouped)."""

    def __init__(self, model, weight: QuantizedWeight):
        s = schema()
        self.weight, self.form = weight, stored_form(weight)
        self.rows, self.columns = weight.qdata.shape
        self.groups = self.columns // weight.group_size
        self.qtype = s.TensorType.INT4 if weight.bits == 4 else s.TensorType.INT8
        qdata = weight.qdata.numpy().astype(np.int8)
        self.qbuffer = _add_buffer(model, pack_int4(qdata) if weight.bits == 4 else qdata.tobytes())
        self.scale_buffer = self.shape_buffer = None
        if self.form != PER_CHANNEL:
            self.scale_buffer = _add_buffer(model, weight.scale.numpy().astype(np.float16).tobytes())
            self.shape_buffer = _add_buffer(model, np.array([self.rows, self.columns], np.int32).tobytes())

    def primary(self, subgraph, name: str):
        """The tensor the direct consumers take, in place of the converted input (and what
        `read_weights` finds as `<name>.qdata`); a grouped weight's fp16 scales are added beside it."""
        s = schema()
        if self.form == PER_CHANNEL:
            return _new_tensor(f"{name}.qdata", [self.rows, self.columns], self.qtype, self.qbuffer,
                               _per_channel_quantization(self.weight))
        scales = _tensor(subgraph, f"{name}.scale", [self.rows, self.groups], s.TensorType.FLOAT16, self.scale_buffer)
        if self.form == BLOCKWISE:
            return _new_tensor(f"{name}.qdata", [self.rows, self.columns], self.qtype, self.qbuffer,
                               _blockwise_quantization(scales, self.weight.group_size))
        return _new_tensor(f"{name}.qdata", [self.rows * self.groups, self.weight.group_size], self.qtype,
                           self.qbuffer, _unit_quantization())

    def dequantized(self, model, subgraph, name: str, primary: int) -> tuple[int, list]:
        """A float32 [rows, columns] tensor of the weight and the ops computing it (see the module doc)."""
        s = schema()
        float32 = s.TensorType.FLOAT32
        # op_version.cc: INT4 6, per-channel INT8 5, INT8 2, FLOAT16 3
        version = 6 if self.weight.bits == 4 else 5 if self.form == PER_CHANNEL else 2
        dequantize = _opcode_index(model, s.BuiltinOperator.DEQUANTIZE, version)
        output = _tensor(subgraph, name, [self.rows, self.columns], float32, 0)
        if self.form == PER_CHANNEL:
            return output, [_operator(dequantize, [primary], [output])]
        stored = [self.rows * self.groups, self.weight.group_size]
        ints = primary
        if self.form == BLOCKWISE:  # the same bytes, seen as unit-scale rows of one group each
            ints = _tensor(subgraph, f"{name}.ints", stored, self.qtype, self.qbuffer, _unit_quantization())
        column = _tensor(subgraph, f"{name}.scale_column", [self.rows * self.groups, 1], s.TensorType.FLOAT16,
                         self.scale_buffer)
        scales = _tensor(subgraph, f"{name}.scale_f32", [self.rows * self.groups, 1], float32, 0)
        floats = _tensor(subgraph, f"{name}.ints_f32", stored, float32, 0)
        flat = _tensor(subgraph, f"{name}.dequantized", stored, float32, 0)
        shape = _tensor(subgraph, f"{name}.shape", [2], s.TensorType.INT32, self.shape_buffer)
        fp16_dequantize = _opcode_index(model, s.BuiltinOperator.DEQUANTIZE, 3)
        return output, [
            _operator(dequantize, [ints], [floats]),
            _operator(fp16_dequantize, [column], [scales]),
            _operator(_opcode_index(model, s.BuiltinOperator.MUL, 1), [floats, scales], [flat],
                      s.BuiltinOptions.MulOptions, s.MulOptionsT()),
            _operator(_opcode_index(model, s.BuiltinOperator.RESHAPE, 1), [flat, shape], [output]),
        ]


def encode(flatbuffer: bytes, plan: QuantPlan, inline_limit: int = INLINE_LIMIT) -> bytes:
    """The converted flatbuffer with every planned weight, converted as a signature input, made a
    constant of the plan's integers (see module doc) and dropped from the signatures' inputs;
    laid out by `serialize` (the buffers after the flatbuffer past `inline_limit` bytes of them)."""
    check_encodable(plan)
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    op_names = _op_names()
    fully_connected, lookup = s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.EMBEDDING_LOOKUP

    # a tied lm_head shares the embedding's integers: one input, one constant
    by_integers: dict[int, list[str]] = {}
    for name, weight in plan.weights.items():
        by_integers.setdefault(id(weight.qdata), []).append(name)
    for names in by_integers.values():
        weight = plan.weights[names[0]]
        dynamic = [name for name in names if plan.weights[name].activations]
        # the embedding's use of a tied lm_head's integers keeps float activations
        some_weight_only = len(dynamic) < len(names)
        static = [name for name in dynamic if is_static(plan.weights[name].activations)]
        if static and len(dynamic) > 1:
            raise QwenMobileError(f"{static[0]}: shares its integers with {len(dynamic) - 1} other linears; static "
                                  "activation ranges are the tflite backend's per linear")
        keys = {input_name(name): name for name in names}
        stored = _Stored(model, weight)
        found = False
        for signature in model.signatureDefs:
            subgraph = model.subgraphs[signature.subgraphIndex]
            entries = [entry for entry in signature.inputs if entry.name.decode() in keys]
            for entry in entries:
                found = True
                name, user = keys[entry.name.decode()], entry.tensorIndex
                target = subgraph.tensors[user]
                if [int(d) for d in target.shape] != [stored.rows, stored.columns]:
                    raise QwenMobileError(
                        f"{name}: the converted input is {[int(d) for d in target.shape]}, the plan's weight "
                        f"{[stored.rows, stored.columns]}"
                    )
                consumers = [op for op in subgraph.operators if user in op.inputs]
                filters = [op for op in consumers if dynamic and _takes_at(model, op, user, fully_connected, 1)]
                lookups = [op for op in consumers if op not in filters and stored.form != GROUPED
                           and _takes_at(model, op, user, lookup, 1)]
                floats = [op for op in consumers if op not in filters and op not in lookups]  # ops compare by identity
                where = f"in the {signature.signatureKey.decode()} signature"
                if dynamic and not filters:
                    raise QwenMobileError(
                        f"{dynamic[0]}: no FULLY_CONNECTED takes it as its filter {where}; the tflite backend "
                        "quantizes activations only there"
                    )
                if dynamic and (lookups or floats) and not some_weight_only:
                    raise QwenMobileError(
                        f"{dynamic[0]}: {op_names[_builtin(model, (lookups + floats)[0])]} takes it {where}; the tflite "
                        "backend quantizes activations only in FULLY_CONNECTED"
                    )

                # the input itself becomes the constant of the plan's integers, which the direct consumers take
                subgraph.tensors[user] = stored.primary(subgraph, name)
                for op in filters:
                    if static:
                        _static_fully_connected(model, subgraph, op, static[0], plan.activation_ranges[static[0]])
                        continue
                    op.builtinOptions.asymmetricQuantizeInputs = True
                    if stored.form == PER_CHANNEL:
                        op.opcodeIndex = _opcode_index(model, fully_connected, HYBRID_FULLY_CONNECTED_VERSION)
                    else:
                        _unfuse_activation(model, subgraph, op)
                for op in lookups:
                    op.opcodeIndex = _opcode_index(model, lookup, QUANTIZED_LOOKUP_VERSION)
                if floats:
                    dequantized, new_ops = stored.dequantized(model, subgraph, name, user)
                    for op in floats:
                        op.inputs = np.array([dequantized if i == user else i for i in op.inputs], np.int32)
                    subgraph.operators = new_ops + list(subgraph.operators)
                subgraph.inputs = np.array([i for i in subgraph.inputs if i != user], np.int32)
            signature.inputs = [entry for entry in signature.inputs if entry.name.decode() not in keys]
        if not found:
            raise QwenMobileError(f"{names[0]}: the converted model takes no input for the plan's weight")

    return serialize(model, inline_limit)


def _pack(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _aligned(size: int) -> int:
    return size + -size % BUFFER_ALIGNMENT


def serialize(model, inline_limit: int = INLINE_LIMIT) -> bytes:
    """The model as a .tflite file. Up to `inline_limit` bytes of buffer data, one flatbuffer holding
    everything. Past it, TFLite's layout for models over flatbuffers' 2 GiB: the flatbuffer, then
    the data of every buffer a tensor refers to, each at its Buffer.offset from the start of the
    file (see BUFFER_ALIGNMENT); metadata buffers stay inline, as the converter leaves them (the
    runtime reads min_runtime_version from the flatbuffer itself). The model's buffers are moved
    out of it in that case: it is the caller's to give up."""
    if sum(len(buffer.data) for buffer in model.buffers if buffer.data is not None) <= inline_limit:
        return _pack(model)
    s = schema()
    used = {int(tensor.buffer) for subgraph in model.subgraphs for tensor in subgraph.tensors}
    outside = [index for index in sorted(used) if index and model.buffers[index].data is not None
               and len(model.buffers[index].data)]
    data = {}
    for index in outside:
        buffer = model.buffers[index]
        data[index], buffer.data, buffer.size = buffer.data, None, len(buffer.data)
        buffer.offset = 1  # a placeholder: nonzero, so the field is written and the second pack is the same size
    metadata = s.MetadataT()
    metadata.name, metadata.buffer = BUFFER_LOCATION_METADATA, _add_buffer(model, b"outside flatbuffers")
    model.metadata = [*(model.metadata or []), metadata]
    start = _aligned(len(_pack(model)))
    position = start
    for index in outside:
        model.buffers[index].offset = position
        position = _aligned(position + model.buffers[index].size)
    flatbuffer = _pack(model)
    if _aligned(len(flatbuffer)) != start:
        raise AssertionError("the flatbuffer changed size when its buffer offsets were set")
    parts = [flatbuffer, bytes(start - len(flatbuffer))]
    for index in outside:
        size = model.buffers[index].size
        parts += [memoryview(data[index]).cast("B"), bytes(_aligned(size) - size)]
    parts.append(bytes(BUFFER_ALIGNMENT))
    return b"".join(parts)


def pack_int4(values: np.ndarray) -> bytes:
    """TFLite's INT4 layout: two values per byte, the first in the low nibble."""
    flat = values.reshape(-1).astype(np.int8)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    low, high = flat[0::2].astype(np.uint8) & 0x0F, flat[1::2].astype(np.uint8) & 0x0F
    return (low | (high << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    nibbles = np.stack((packed & 0x0F, packed >> 4), axis=-1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def buffer_bytes(file: bytes, model, index: int) -> bytes:
    """Buffer `index`'s bytes as the runtime finds them: inline in the flatbuffer, or, where its
    offset is over 1 (`serialize`'s layout past 2 GiB), `size` bytes at that offset in the file."""
    buffer = model.buffers[index]
    if buffer.offset > 1:
        return bytes(file[buffer.offset:buffer.offset + buffer.size])
    return b"" if buffer.data is None else bytes(buffer.data)


def read_weights(flatbuffer: bytes) -> dict[str, dict]:
    """The integer constants this module wrote, by plan weight name, as the file (all of it, for
    buffers laid out after the flatbuffer) stores them:
    {form, bits, qdata int8 in the stored shape (int4 unpacked), scale float32 [rows, groups]
    or [rows], zero_point, group_size, buffer (the integers' buffer index)}."""
    return dict(stored_weights(flatbuffer))


def stored_weights(flatbuffer: bytes) -> Iterator[tuple[str, dict]]:
    """read_weights' entries one weight at a time, each decoded only when asked for, so a caller
    that checks each as it comes holds one weight's integers at a time (all of them unpacked one
    per byte came to 3.9 GiB at 4B, on top of the file). A weight every signature uses comes once."""
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    buffers: dict[str, int] = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            name = tensor.name.decode()
            if tensor.type not in (s.TensorType.INT8, s.TensorType.INT4) or not name.endswith(".qdata"):
                continue
            name = name.removesuffix(".qdata")
            if name in buffers:
                if buffers[name] != int(tensor.buffer):
                    raise AssertionError(f"{name}: the signatures store its integers in different buffers")
                continue
            buffers[name] = int(tensor.buffer)
            shape = [int(d) for d in tensor.shape]
            raw = buffer_bytes(flatbuffer, model, tensor.buffer)
            count = int(np.prod(shape))
            bits = 4 if tensor.type == s.TensorType.INT4 else 8
            data = unpack_int4(raw, count) if bits == 4 else np.frombuffer(raw, np.int8)[:count]
            q = tensor.quantization
            if q is not None and q.detailsType == s.QuantizationDetails.BlockwiseQuantization:
                scales = subgraph.tensors[q.details.scales]
                scale = np.frombuffer(buffer_bytes(flatbuffer, model, scales.buffer), np.float16).astype(np.float32)
                entry = {"form": BLOCKWISE, "scale": scale.reshape([int(d) for d in scales.shape]),
                         "zero_point": np.zeros([int(d) for d in scales.shape], np.int64),
                         "group_size": int(q.details.blockSize), "zero_points_tensor": int(q.details.zeroPoints)}
            elif q is not None and q.scale is not None and len(q.scale) == shape[0] and shape[0] > 1:
                entry = {"form": PER_CHANNEL, "scale": np.asarray(q.scale, np.float32),
                         "zero_point": np.asarray(q.zeroPoint, np.int64), "group_size": shape[1]}
            else:  # grouped: unit scale here, the plan's scales in the `.scale` constant
                scales = next(t for t in subgraph.tensors if t.name.decode() == f"{name}.scale")
                scale = np.frombuffer(buffer_bytes(flatbuffer, model, scales.buffer), np.float16).astype(np.float32)
                entry = {"form": GROUPED, "scale": scale.reshape([int(d) for d in scales.shape]),
                         "zero_point": np.zeros([int(d) for d in scales.shape], np.int64), "group_size": shape[1]}
            entry.update(bits=bits, qdata=data.reshape(shape), buffer=int(tensor.buffer))
            yield name, entry


def _producers(subgraph) -> dict[int, object]:
    return {int(output): op for op in subgraph.operators for output in op.outputs}


def fully_connected_filters(flatbuffer: bytes) -> list[dict]:
    """Every FULLY_CONNECTED's filter as written, for the tests: {signature, filter (the tensor's
    name), type, quantization ('blockwise', 'per_channel', 'per_tensor' or None), produced_by
    (the op computing it; None for a constant), asymmetric_quantize_inputs, version}."""
    return _consumers(flatbuffer, schema().BuiltinOperator.FULLY_CONNECTED, "filter")


def embedding_lookups(flatbuffer: bytes) -> list[dict]:
    """Every EMBEDDING_LOOKUP's table as written, for the tests (fields as fully_connected_filters')."""
    return _consumers(flatbuffer, schema().BuiltinOperator.EMBEDDING_LOOKUP, "table")


def _consumers(flatbuffer: bytes, builtin: int, role: str) -> list[dict]:
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    op_names, type_names = _op_names(), _type_names()
    signatures = {signature.subgraphIndex: signature.signatureKey.decode() for signature in model.signatureDefs}
    found = []
    for index, subgraph in enumerate(model.subgraphs):
        producers = _producers(subgraph)
        for op in subgraph.operators:
            if _builtin(model, op) != builtin:
                continue
            tensor, producer = subgraph.tensors[op.inputs[1]], producers.get(int(op.inputs[1]))
            q = tensor.quantization
            if q is not None and q.detailsType == s.QuantizationDetails.BlockwiseQuantization:
                kind = BLOCKWISE
            elif q is not None and q.scale is not None and len(q.scale) > 1:
                kind = PER_CHANNEL
            elif q is not None and q.scale is not None and len(q.scale) == 1:
                kind = "per_tensor"
            else:
                kind = None
            options = op.builtinOptions
            found.append({
                "signature": signatures.get(index, subgraph.name.decode() if subgraph.name else str(index)),
                role: tensor.name.decode(),
                "type": type_names[tensor.type],
                "quantization": kind,
                "produced_by": None if producer is None else op_names[_builtin(model, producer)],
                "asymmetric_quantize_inputs": bool(getattr(options, "asymmetricQuantizeInputs", False)),
                "version": model.operatorCodes[op.opcodeIndex].version,
            })
    return found
