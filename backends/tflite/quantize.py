"""Encode the core's quantization plan into a converted .tflite exactly, without re-rounding.

The model is converted with every planned weight as a signature input named
`input_name(weight)` (lower.convert says why), so the converter never holds the weights.
Each such input then becomes, in every signature that takes it, a computed tensor made
from the plan's own integers and scales, and leaves the signature's inputs:

- per-channel weights (int8): an int8 constant [rows, columns] quantized per channel on
  axis 0 (the plan's scale and zero point per row) -> DEQUANTIZE -> the FULLY_CONNECTED or
  EMBEDDING_LOOKUP that took the input;
- grouped weights (int4, group_size columns per scale): a packed INT4 constant
  [rows * groups, group_size] with scale 1 -> DEQUANTIZE -> MUL by the plan's scales
  [rows * groups, 1] -> RESHAPE [rows, columns] -> the op. Per-channel parameters on the
  reshaped tensor would express the groups too, but TFLite keeps quantization parameters
  on each signature's tensor, so prefill and decode would each store a copy (the int4 file
  came out larger than int8's); the scale constant is one buffer both signatures share.

Weights stay weight-only quantized (float activations), in builtin ops only. The integers
in the file are the plan's: `read_weights` reads them back for the tests.

Full-integer static quantization (int8/int16 activations from calibration data, what NPU
targets want) is a later plan property: `activation_ranges` below is the hook, refused
until the calibration work produces it.
"""

from __future__ import annotations

import numpy as np

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.plan import QuantizedWeight, QuantPlan

TFLITE_FILE_IDENTIFIER = b"TFL3"


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def check_encodable(plan: QuantPlan) -> None:
    for name, weight in plan.weights.items():
        if weight.activations is not None:
            raise QwenMobileError(
                f"{name}: activation quantization {weight.activations!r} is not encoded by the tflite backend "
                "(weight-only int8/int4 are)"
            )
        if weight.bits not in (4, 8):
            raise QwenMobileError(f"{name}: {weight.bits}-bit weights are not encoded by the tflite backend")


def activation_ranges(plan: QuantPlan) -> None:
    """Hook for full-integer static quantization: per-tensor activation ranges from calibration
    data would be written here as each activation tensor's QuantizationParameters, with
    QUANTIZE/DEQUANTIZE at the signature boundaries. Plans carry no activation ranges yet."""
    if getattr(plan, "activation_ranges", None):
        raise QwenMobileError("static activation quantization (calibrated ranges) is not encoded yet by the tflite backend")


def _opcode_index(model, builtin: int, version: int) -> int:
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and code.version == version:
            return index
    s = schema()
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _add_buffer(model, data: bytes) -> int:
    buffer = schema().BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8).copy()
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def _tensor(subgraph, name: str, shape, tensor_type: int, buffer: int, quantization=None) -> int:
    tensor = schema().TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = name.encode(), np.array(shape, np.int32), tensor_type, buffer
    tensor.quantization = quantization
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _quantization(weight: QuantizedWeight):
    params = schema().QuantizationParametersT()
    params.scale = weight.scale.reshape(-1).numpy().astype(np.float32)
    params.zeroPoint = weight.zero_point.reshape(-1).numpy().astype(np.int64)
    params.quantizedDimension = 0
    return params


def _unit_quantization():
    """Per-tensor scale 1, zero point 0: DEQUANTIZE yields the integers themselves as floats."""
    params = schema().QuantizationParametersT()
    params.scale, params.zeroPoint = np.ones(1, np.float32), np.zeros(1, np.int64)
    params.quantizedDimension = 0
    return params


def input_name(weight: str) -> str:
    """The signature input a planned weight is converted as (lower.convert): an identifier, as torch.export needs."""
    return "weight__" + weight.replace(".", "__")


def encode(flatbuffer: bytes, plan: QuantPlan) -> bytes:
    """The converted flatbuffer with every planned weight, converted as a signature input, made a
    constant of the plan's integers (see module doc) and dropped from the signatures' inputs."""
    import flatbuffers

    check_encodable(plan)
    activation_ranges(plan)
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    dequantize_op = _opcode_index(model, s.BuiltinOperator.DEQUANTIZE, 4)
    reshape_op = _opcode_index(model, s.BuiltinOperator.RESHAPE, 1)
    mul_op = _opcode_index(model, s.BuiltinOperator.MUL, 1)

    # a tied lm_head shares the embedding's integers: one input, one constant
    by_integers: dict[int, list[str]] = {}
    for name, weight in plan.weights.items():
        by_integers.setdefault(id(weight.qdata), []).append(name)
    for names in by_integers.values():
        weight = plan.weights[names[0]]
        keys = {input_name(name): name for name in names}
        rows, columns = weight.qdata.shape
        groups = columns // weight.group_size
        stored_shape = [rows * groups, weight.group_size]
        qdata = weight.qdata.reshape(stored_shape).numpy().astype(np.int8)
        qtype = s.TensorType.INT4 if weight.bits == 4 else s.TensorType.INT8
        qbuffer = _add_buffer(model, pack_int4(qdata) if weight.bits == 4 else qdata.tobytes())
        shape_buffer = scale_buffer = None
        if groups > 1:
            if bool(weight.zero_point.any()):
                raise QwenMobileError(f"{names[0]}: grouped weights with nonzero zero points are not encoded by the tflite backend")
            shape_buffer = _add_buffer(model, np.array([rows, columns], np.int32).tobytes())
            scale_buffer = _add_buffer(model, weight.scale.reshape(-1, 1).numpy().astype(np.float32).tobytes())
        found = False
        for signature in model.signatureDefs:
            subgraph = model.subgraphs[signature.subgraphIndex]
            entries = [entry for entry in signature.inputs if entry.name.decode() in keys]
            for entry in entries:
                found = True
                name, user = keys[entry.name.decode()], entry.tensorIndex
                target = subgraph.tensors[user]
                if [int(d) for d in target.shape] != [rows, columns]:
                    raise QwenMobileError(
                        f"{name}: the converted input is {[int(d) for d in target.shape]}, the plan's weight {[rows, columns]}"
                    )
                target.buffer = 0  # now computed: buffer 0 is the schema's empty sentinel
                params = _quantization(weight) if groups == 1 else _unit_quantization()
                qtensor = _tensor(subgraph, f"{name}.qdata", stored_shape, qtype, qbuffer, params)
                op = s.OperatorT()
                op.opcodeIndex, op.inputs = dequantize_op, np.array([qtensor], np.int32)
                if groups == 1:
                    op.outputs = np.array([user], np.int32)
                    new_ops = [op]
                else:
                    # grouped: scales as one float constant shared by both signatures (per-channel parameters
                    # live on each signature's tensor and would be stored twice), applied by MUL
                    ints = _tensor(subgraph, f"{name}.ints", stored_shape, s.TensorType.FLOAT32, 0)
                    scales = _tensor(subgraph, f"{name}.scale", [rows * groups, 1], s.TensorType.FLOAT32, scale_buffer)
                    flat = _tensor(subgraph, f"{name}.dequantized", stored_shape, s.TensorType.FLOAT32, 0)
                    shape = _tensor(subgraph, f"{name}.shape", [2], s.TensorType.INT32, shape_buffer)
                    op.outputs = np.array([ints], np.int32)
                    multiply = s.OperatorT()
                    multiply.opcodeIndex = mul_op
                    multiply.inputs, multiply.outputs = np.array([ints, scales], np.int32), np.array([flat], np.int32)
                    multiply.builtinOptionsType, multiply.builtinOptions = s.BuiltinOptions.MulOptions, s.MulOptionsT()
                    reshape = s.OperatorT()
                    reshape.opcodeIndex = reshape_op
                    reshape.inputs, reshape.outputs = np.array([flat, shape], np.int32), np.array([user], np.int32)
                    new_ops = [op, multiply, reshape]
                subgraph.operators = new_ops + list(subgraph.operators)
                subgraph.inputs = np.array([i for i in subgraph.inputs if i != user], np.int32)
            signature.inputs = [entry for entry in signature.inputs if entry.name.decode() not in keys]
        if not found:
            raise QwenMobileError(f"{names[0]}: the converted model takes no input for the plan's weight")

    builder = flatbuffers.Builder(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


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


def read_weights(flatbuffer: bytes) -> dict[str, dict]:
    """The integer constants this module wrote, by plan weight name:
    {bits, qdata int8 [rows*groups, group] (int4 unpacked), scale, zero_point}."""
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    weights = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            name = tensor.name.decode()
            if tensor.type in (s.TensorType.INT8, s.TensorType.INT4) and name.endswith(".qdata") and name[:-6] not in weights:
                shape = [int(d) for d in tensor.shape]
                raw = bytes(model.buffers[tensor.buffer].data)
                data = unpack_int4(raw, int(np.prod(shape))) if tensor.type == s.TensorType.INT4 else np.frombuffer(raw, np.int8)
                weights[name[:-6]] = {
                    "bits": 4 if tensor.type == s.TensorType.INT4 else 8,
                    "qdata": data.reshape(shape),
                    "scale": np.asarray(tensor.quantization.scale, np.float32),
                    "zero_point": np.asarray(tensor.quantization.zeroPoint, np.int64),
                }
        for tensor in subgraph.tensors:  # grouped weights: scales in a shared float constant
            name = tensor.name.decode()
            if name.endswith(".scale") and name[:-6] in weights and tensor.buffer:
                weights[name[:-6]]["scale"] = np.frombuffer(bytes(model.buffers[tensor.buffer].data), np.float32)
                weights[name[:-6]]["zero_point"] = np.zeros_like(weights[name[:-6]]["zero_point"], shape=weights[name[:-6]]["scale"].shape)
    return weights
