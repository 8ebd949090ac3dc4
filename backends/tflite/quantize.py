"""Encode the core's quantization plan into a converted .tflite exactly, without re-rounding.

The model is converted with the plan's dequantized weights (quant.eager.dequantized), so
every planned weight sits in the flatbuffer as a float32 constant whose bytes equal
`plan.weights[name].dequantize()`. Each such constant is then replaced, in every
signature that uses it, by the plan's own integers and scales:

    int8 constant [rows * groups, group_size]  (per-channel quantized on axis 0: one scale
        and zero point per row and group, i.e. the plan's scale/zero_point flattened)
      -> DEQUANTIZE -> float32 [rows * groups, group_size]
      -> RESHAPE    -> float32 [rows, columns]   (only when groups > 1)
      -> the FULLY_CONNECTED / EMBEDDING_LOOKUP that used the float constant

so the weights stay weight-only quantized (float activations), in builtin ops, with
blockwise groups expressed as per-channel quantization of the reshaped weight (which
LiteRT's NPU plugins accept, unlike the schema's blockwise quantization). The ints in
the file are the plan's ints: the test reads them back.

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


def _float_buffers(model) -> dict[bytes, int]:
    found = {}
    for index, buffer in enumerate(model.buffers):
        if buffer.data is not None and len(buffer.data) and not buffer.offset:
            found.setdefault(bytes(buffer.data[:256]), index)
    return found


def encode(flatbuffer: bytes, plan: QuantPlan) -> bytes:
    """The converted flatbuffer with every planned weight replaced by the plan's integers (see module doc)."""
    import flatbuffers

    check_encodable(plan)
    activation_ranges(plan)
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    by_prefix = _float_buffers(model)
    dequantize_op = _opcode_index(model, s.BuiltinOperator.DEQUANTIZE, 4)
    reshape_op = _opcode_index(model, s.BuiltinOperator.RESHAPE, 1)

    encoded: dict[int, str] = {}  # float buffer -> the plan weight that replaced it
    for name, weight in plan.weights.items():
        dequantized = weight.dequantize().contiguous().numpy().astype(np.float32).tobytes()
        index = by_prefix.get(dequantized[:256])
        if index in encoded:  # a tied weight (lm_head): the same constant, already encoded
            continue
        if index is None or bytes(model.buffers[index].data) != dequantized:
            raise QwenMobileError(f"{name}: the converted model holds no constant equal to the plan's weight")
        encoded[index] = name
        rows, columns = weight.qdata.shape
        groups = columns // weight.group_size
        stored_shape = [rows * groups, weight.group_size]
        qbuffer = _add_buffer(model, weight.qdata.reshape(stored_shape).numpy().astype(np.int8).tobytes())
        shape_buffer = _add_buffer(model, np.array([rows, columns], np.int32).tobytes()) if groups > 1 else None
        for subgraph in model.subgraphs:
            users = [t for t, tensor in enumerate(subgraph.tensors) if tensor.buffer == index]
            new_ops = []
            for user in users:
                target = subgraph.tensors[user]
                target.buffer = 0  # now computed: buffer 0 is the schema's empty sentinel
                label = f"{name}.qdata"
                qtensor = _tensor(subgraph, label, stored_shape, s.TensorType.INT8, qbuffer, _quantization(weight))
                op = s.OperatorT()
                op.opcodeIndex, op.inputs = dequantize_op, np.array([qtensor], np.int32)
                if groups == 1:
                    op.outputs = np.array([user], np.int32)
                    new_ops.append(op)
                    continue
                flat = _tensor(subgraph, f"{name}.dequantized", stored_shape, s.TensorType.FLOAT32, 0)
                shape = _tensor(subgraph, f"{name}.shape", [2], s.TensorType.INT32, shape_buffer)
                op.outputs = np.array([flat], np.int32)
                reshape = s.OperatorT()
                reshape.opcodeIndex = reshape_op
                reshape.inputs, reshape.outputs = np.array([flat, shape], np.int32), np.array([user], np.int32)
                new_ops += [op, reshape]
            subgraph.operators = new_ops + list(subgraph.operators)
        model.buffers[index].data = None  # the float copy leaves the file

    builder = flatbuffers.Builder(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def read_weights(flatbuffer: bytes) -> dict[str, dict]:
    """The int8 constants this module wrote, by plan weight name: {qdata [rows*groups, group], scale, zero_point}."""
    s = schema()
    model = s.ModelT.InitFromPackedBuf(flatbuffer, 0)
    weights = {}
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            name = tensor.name.decode()
            if tensor.type == s.TensorType.INT8 and name.endswith(".qdata") and name[:-6] not in weights:
                data = np.frombuffer(bytes(model.buffers[tensor.buffer].data), dtype=np.int8)
                weights[name[:-6]] = {
                    "qdata": data.reshape([int(d) for d in tensor.shape]),
                    "scale": np.asarray(tensor.quantization.scale, np.float32),
                    "zero_point": np.asarray(tensor.quantization.zeroPoint, np.int64),
                }
    return weights
