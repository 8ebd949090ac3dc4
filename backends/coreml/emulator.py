"""A CPU emulator of saved Core ML ML Programs: Core ML itself runs only on Apple systems.

It reads the `.mlpackage` as written (the ML Program protobuf through coremltools'
generated classes, weights through coremltools' blob reader) and executes a function op
by op with NumPy (see emulator_ops.py): states persist between calls, constexpr ops
expand compressed weights, and every op's result is rounded to the dtype the program
declares for it, so an fp16 op computes as fp16. An op it does not know, a value whose
shape or dtype disagrees with the program, or an unreadable package is a QwenMobileError
naming the op, value or file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_mobile.errors import QwenMobileError

from . import emulator_ops

SPEC = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")

# MIL proto DataType enum -> numpy dtype, for the types our exporter's programs use
DTYPES = {1: np.bool_, 10: np.float16, 11: np.float32, 12: np.float64, 21: np.int8, 22: np.int16, 23: np.int32,
          24: np.int64, 25: np.int8, 31: np.uint8, 32: np.uint16, 33: np.uint32, 35: np.uint8}
DTYPE_NAMES = {1: "bool", 2: "string", 10: "fp16", 11: "fp32", 12: "fp64", 21: "int8", 22: "int16", 23: "int32",
               24: "int64", 25: "int4", 31: "uint8", 32: "uint16", 33: "uint32", 35: "uint4"}
BLOB_READERS = {10: "read_fp16_data", 11: "read_float_data", 21: "read_int8_data", 31: "read_uint8_data",
                25: "read_int4_data", 35: "read_uint4_data", 22: "read_int16_data", 32: "read_uint16_data",
                23: "read_int32_data", 33: "read_uint32_data"}


@dataclass
class Operation:
    type: str
    name: str
    inputs: dict  # input name -> a value name, a constant, or a list of them (variadic)
    outputs: list[tuple[str, int, tuple | None]]  # (name, proto dtype, static shape or None)
    attributes: dict


@dataclass
class Function:
    name: str
    inputs: list[str]
    state_inputs: list[str]
    operations: list[Operation]
    outputs: list[str]
    released: list[list[str]]  # per op: the values to drop once it has run (last_reads)

    @property
    def op_types(self) -> set[str]:
        return {op.type for op in self.operations}


def tensor_shape(value_type) -> tuple | None:
    tensor = value_type.tensorType if value_type.HasField("tensorType") else None
    if tensor is None:
        return None
    shape = []
    for dimension in tensor.dimensions:
        if not dimension.HasField("constant"):
            return None
        shape.append(dimension.constant.size)
    return tuple(shape)


def tensor_dtype(value_type) -> int:
    if value_type.HasField("tensorType"):
        return value_type.tensorType.dataType
    if value_type.HasField("stateType"):
        return value_type.stateType.wrappedType.tensorType.dataType
    return 0


def read_spec(package: Path):
    """The package's ML Program protobuf (coremltools' Model_pb2.Model), decoded alone: no weight is read."""
    from coremltools.proto import Model_pb2

    spec_path = Path(package) / SPEC
    try:
        data = spec_path.read_bytes()
    except OSError as error:
        raise QwenMobileError(f"{spec_path}: cannot be read ({error.strerror or error})") from None
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except Exception as error:  # protobuf's DecodeError, or a RuntimeWarning-turned-error
        raise QwenMobileError(f"{spec_path}: not a Core ML model protobuf ({error})") from None
    if not spec.HasField("mlProgram"):
        raise QwenMobileError(f"{spec_path}: not an ML Program (the emulator runs ML Programs only)")
    return spec


class Package:
    """One saved .mlpackage: its functions, decoded, and its weights, read on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.spec = read_spec(self.path)
        self._blobs: dict[str, object] = {}
        self._blob_cache: dict[tuple, np.ndarray] = {}
        self.functions = {name: self._function(name, f) for name, f in self.spec.mlProgram.functions.items()}
        self.states = self._state_types()

    # -- decoding -------------------------------------------------------------------------
    def _function(self, name: str, function) -> Function:
        block = function.block_specializations[function.opset]
        inputs, states = [], []
        for named in function.inputs:
            (states if named.type.HasField("stateType") else inputs).append(named.name)
        operations = constants_at_first_use([self._operation(op) for op in block.operations], list(block.outputs))
        outputs = list(block.outputs)
        return Function(name, inputs, states, operations, outputs, last_reads(operations, outputs))

    def _operation(self, op) -> Operation:
        inputs = {}
        for key, argument in op.inputs.items():
            bindings = [b.name if b.name else self.value(b.value, f"{op.type} input {key}") for b in argument.arguments]
            inputs[key] = bindings if key in emulator_ops.VARIADIC.get(op.type, ()) else bindings[0]
        attributes = {key: value for key, value in op.attributes.items()}
        name = attributes["name"].immediateValue.tensor.strings.values[0] if "name" in attributes else op.outputs[0].name
        outputs = [(o.name, tensor_dtype(o.type), tensor_shape(o.type)) for o in op.outputs]
        return Operation(op.type, name, inputs, outputs, attributes)

    def value(self, value, what: str):
        """A proto Value (immediate or in the weight blob) as a numpy array (strings as str)."""
        dtype_code = tensor_dtype(value.type)
        shape = tensor_shape(value.type)
        if value.HasField("blobFileValue"):
            return self._blob_value(value.blobFileValue, dtype_code, shape, what)
        tensor = value.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        if dtype_code == 2:
            strings = list(tensor.strings.values)
            return strings[0] if shape == () else np.array(strings)
        if kind == "bytes":
            raw = np.frombuffer(tensor.bytes.values, dtype=np.uint8)
            array = unpack_sub_byte(raw, dtype_code, int(np.prod(shape))) if dtype_code in (25, 35) else \
                raw.view(DTYPES[dtype_code])
        elif kind is None:
            array = np.zeros(0, DTYPES.get(dtype_code, np.float32))
        else:
            array = np.array(getattr(tensor, kind).values)
        if dtype_code not in DTYPES:
            raise QwenMobileError(f"{self.path}: {what} has dtype {DTYPE_NAMES.get(dtype_code, dtype_code)}, "
                                  "which the emulator does not read")
        array = array.astype(DTYPES[dtype_code])
        return array.reshape(shape) if shape is not None else array

    def _blob_value(self, blob, dtype_code: int, shape, what: str) -> np.ndarray:
        key = (blob.fileName, blob.offset, dtype_code)
        if key in self._blob_cache:
            return self._blob_cache[key]
        reader_name = BLOB_READERS.get(dtype_code)
        if reader_name is None:
            raise QwenMobileError(f"{self.path}: {what} is stored as {DTYPE_NAMES.get(dtype_code, dtype_code)}, "
                                  "which the emulator does not read")
        file = self.path / WEIGHTS_DIR / blob.fileName.removeprefix("@model_path/weights/")
        reader = self._reader(file)
        try:
            flat = np.array(getattr(reader, reader_name)(blob.offset))
        except Exception as error:  # the reader raises RuntimeError on a bad offset or a corrupted blob header
            raise QwenMobileError(f"{file}: {what} at offset {blob.offset} cannot be read ({error})") from None
        if dtype_code == 10:
            flat = flat.view(np.float16)
        array = flat.astype(DTYPES[dtype_code])
        if shape is not None:
            if array.size != int(np.prod(shape)):
                raise QwenMobileError(f"{file}: {what} at offset {blob.offset} holds {array.size} values, "
                                      f"the program declares {shape}")
            array = array.reshape(shape)
        array.setflags(write=False)
        self._blob_cache[key] = array
        return array

    def _reader(self, file: Path):
        from coremltools.libmilstoragepython import _BlobStorageReader

        if str(file) not in self._blobs:
            if not file.is_file():
                raise QwenMobileError(f"{file}: missing from the package")
            try:
                self._blobs[str(file)] = _BlobStorageReader(str(file))
            except Exception as error:
                raise QwenMobileError(f"{file}: not a Core ML weight blob ({error})") from None
        return self._blobs[str(file)]

    def _state_types(self) -> dict[str, tuple[tuple, type]]:
        states = {}
        for function in self.spec.mlProgram.functions.values():
            for named in function.inputs:
                if named.type.HasField("stateType"):
                    wrapped = named.type.stateType.wrappedType
                    states[named.name] = (tensor_shape(wrapped), DTYPES[tensor_dtype(named.type)])
        return states

    # -- running --------------------------------------------------------------------------
    def new_state(self) -> dict[str, np.ndarray]:
        """Zero-filled states, as Core ML's make_state() gives them."""
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self.states.items()}

    def op_types(self) -> dict[str, list[str]]:
        return {name: sorted(f.op_types) for name, f in self.functions.items()}

    def check_supported(self) -> None:
        """Every op of every function has an implementation, before anything runs."""
        for function in self.functions.values():
            for op in function.operations:
                if op.type not in emulator_ops.OPS:
                    raise QwenMobileError(
                        f"{self.path}: function {function.name!r} uses the op {op.type!r} ({op.name}), which the "
                        f"Core ML emulator does not implement (it knows {', '.join(sorted(emulator_ops.OPS))})"
                    )

    def run(self, function: str, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute `function` on `inputs`; `state` is read and updated in place."""
        if function not in self.functions:
            raise QwenMobileError(f"{self.path}: has no function {function!r} (it has {', '.join(self.functions)})")
        fn = self.functions[function]
        env: dict[str, object] = {}
        for name in fn.inputs:
            if name not in inputs:
                raise QwenMobileError(f"{self.path}: function {function!r} needs the input {name!r}")
            env[name] = np.asarray(inputs[name])
        for name in fn.state_inputs:
            env[name] = emulator_ops.StateRef(name, state)
        for index, op in enumerate(fn.operations):
            implementation = emulator_ops.OPS.get(op.type)
            if implementation is None:
                raise QwenMobileError(f"{self.path}: the op {op.type!r} ({op.name}) is not implemented by the "
                                      "Core ML emulator")
            args = {key: resolve(env, value) for key, value in op.inputs.items()}
            if op.type == "const":
                args["val"] = self._const(op)
            try:
                results = implementation(**args)
            except QwenMobileError:
                raise
            except Exception as error:
                raise QwenMobileError(f"{self.path}: op {op.name} ({op.type}) failed in the emulator: {error}") from None
            if not isinstance(results, tuple):
                results = (results,)
            if len(results) != len(op.outputs):
                raise QwenMobileError(f"{self.path}: op {op.name} ({op.type}) gave {len(results)} outputs, "
                                      f"the program declares {len(op.outputs)}")
            for result, (name, dtype_code, shape) in zip(results, op.outputs):
                env[name] = conform(result, dtype_code, shape, op, self.path)
            for name in fn.released[index]:
                del env[name]
        return {name: env[name] for name in fn.outputs}

    def _const(self, op: Operation):
        if "_value" not in op.attributes:  # decoded once per op
            op.attributes["_value"] = self.value(op.attributes["val"], f"const {op.name}")
        return op.attributes["_value"]


def names_read(op: Operation) -> list[str]:
    return [name for value in op.inputs.values() for name in (value if isinstance(value, list) else [value])
            if isinstance(name, str)]


def constants_at_first_use(operations: list[Operation], outputs: list[str]) -> list[Operation]:
    """The ops in an order where each const and constexpr op that reads only constants runs just
    before the first op that reads its result, every other op keeping its place. coremltools puts
    all of a program's constexpr ops first: run in that order, a call would decompress every
    weight before the first layer runs (at the 0.8B shape 1.5 GB of fp16 held at once). They
    depend on nothing computed, so moving them changes no value; one nothing reads never runs."""
    made_by = {name: op for op in operations for name, _, _ in op.outputs}
    deferred = set()
    for op in operations:
        if (op.type == "const" or op.type.startswith("constexpr_")) and all(
                id(made_by.get(name)) in deferred for name in names_read(op)):
            deferred.add(id(op))
    ordered, placed = [], set()

    def place(op: Operation) -> None:
        if id(op) in placed:
            return
        for name in names_read(op):
            producer = made_by.get(name)
            if producer is not None and id(producer) in deferred:
                place(producer)
        placed.add(id(op))
        ordered.append(op)

    for op in operations:
        if id(op) not in deferred:
            place(op)
    for name in outputs:  # a function output made by a constant op alone
        if name in made_by:
            place(made_by[name])
    return ordered


def last_reads(operations: list[Operation], outputs: list[str]) -> list[list[str]]:
    """For each op, the values to drop once it has run: those it is the last to read, and its own
    results that nothing reads, never a function output. A call then holds a weight its constexpr
    op decompressed only until the op using it has run, not to the end of the call (at the 2B
    shape every weight decompressed at once is 3.8 GB of fp16)."""
    last = {}
    for index, op in enumerate(operations):
        for name in names_read(op):
            last[name] = index
        for name, _, _ in op.outputs:
            last.setdefault(name, index)
    released = [[] for _ in operations]
    kept = set(outputs)
    for name, index in last.items():
        if name not in kept:
            released[index].append(name)
    return released


def resolve(env: dict, value):
    if isinstance(value, list):
        return [resolve(env, v) for v in value]
    if isinstance(value, str):
        if value not in env:
            raise QwenMobileError(f"the program reads {value!r} before any op defines it")
        return env[value]
    return value


def conform(result, dtype_code: int, shape, op: Operation, path: Path):
    """The op's result in the dtype (fp16 rounding included) and shape the program declares."""
    if isinstance(result, str) or dtype_code == 2:
        return result
    array = np.asarray(result)
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise QwenMobileError(f"{path}: op {op.name} ({op.type}) outputs {DTYPE_NAMES.get(dtype_code, dtype_code)}, "
                              "which the emulator does not model")
    if array.dtype != dtype:
        array = array.astype(dtype)
    if shape is not None and array.shape != shape:
        raise QwenMobileError(f"{path}: op {op.name} ({op.type}) computed shape {list(array.shape)}, the program "
                              f"declares {list(shape)}")
    return array


def unpack_sub_byte(raw: np.ndarray, dtype_code: int, count: int) -> np.ndarray:
    """4-bit values packed two per byte, low nibble first (the blob format's order)."""
    low, high = raw & 0x0F, raw >> 4
    values = np.stack((low, high), axis=-1).reshape(-1)[:count].astype(np.int16)
    if dtype_code == 25:  # int4: sign-extend
        values = np.where(values >= 8, values - 16, values)
    return values
