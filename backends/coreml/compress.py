"""A core quantization plan encoded into the Core ML program exactly as it is.

The exporter converts the model with a placeholder in place of each planned weight
(quant.plan.placeholder_weights: one float repeated by stride 0, each with an address of
its own), and coremltools' frontend makes each a constant whose value is a view of that
placeholder. A graph pass run first in the conversion pipeline finds each such constant
by address and replaces it with an iOS 18 `constexpr_blockwise_shift_scale` built from
the plan's own integers (int8, or int4 packed two per byte), scales and zero points:
nothing is re-rounded from float, and no planned weight is ever held in float. A planned
weight the pass cannot find is an error, never a silently float weight. Multifunction
saving then shares the constexpr's inputs between prefill and decode like any other
constant.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.plan import QuantizedWeight, QuantPlan

PASS_NAMESPACE = "qwen_mobile"
PASS_NAME = "encode_quant_plan"
PASS_ID = f"{PASS_NAMESPACE}::{PASS_NAME}"
ENCODABLE_BITS = (4, 8)  # constexpr_blockwise_shift_scale's integer types: int4, int8


def check_encodable(plan: QuantPlan, supported: tuple[str, ...]) -> None:
    """What Core ML's constexpr_blockwise_shift_scale holds: int4 or int8 weights with one
    scale (and zero point) per row and block of columns, applied before float compute."""
    schemes = ", ".join(supported)
    for name, weight in plan.weights.items():
        if weight.bits not in ENCODABLE_BITS:
            raise QwenMobileError(
                f"{name}: {weight.bits}-bit weights cannot be encoded by the coreml backend (it encodes "
                f"{' and '.join(f'int{b}' for b in ENCODABLE_BITS)} weights; schemes {schemes})"
            )
        if weight.activations is not None:
            raise QwenMobileError(
                f"{name}: activation quantization {weight.activations!r} cannot be encoded by the coreml backend "
                f"(Core ML weight compression keeps activations float; schemes {schemes})"
            )
        rows, columns = weight.qdata.shape
        if weight.scale.shape != (rows, columns // weight.group_size) or columns % weight.group_size:
            raise QwenMobileError(f"{name}: scale shape {tuple(weight.scale.shape)} is not one per row and "
                                  f"block of {weight.group_size} columns of a {rows}x{columns} weight")


def data_dtype(bits: int):
    from coremltools.converters.mil.mil import types

    return types.np_int4_dtype if bits == 4 else np.dtype(np.int8)


def encoding(weight: QuantizedWeight, float_dtype) -> dict[str, np.ndarray | None]:
    """The constexpr's inputs: data (int4/int8), scale in the program's float dtype, offset
    (the zero points, in data's type) or None when every zero point is 0."""
    qdata = weight.qdata.numpy()
    if qdata.min() < weight.qmin or qdata.max() > weight.qmax:
        raise QwenMobileError(f"integers outside the int{weight.bits} range")
    scale = weight.scale.numpy().astype(np.float32)
    encoded_scale = scale.astype(float_dtype)
    if not np.array_equal(encoded_scale.astype(np.float32), scale):
        raise QwenMobileError(f"scales not exactly representable in {np.dtype(float_dtype).name}")
    zero_point = weight.zero_point.numpy()
    offset = None if not np.any(zero_point) else zero_point.astype(data_dtype(weight.bits))
    # a view of the plan's own integers, not a copy per function (0.75 GB at 0.8B): coremltools holds
    # int4 in int8 arrays and tells them apart by their dtype's metadata, which a view sets
    return {"data": qdata.view(data_dtype(weight.bits)), "scale": encoded_scale, "offset": offset}


class PlaceholderIndex:
    """The planned weights by the address and shape of their placeholders, which the converter's
    constants are views of."""

    def __init__(self, placeholders: dict[str, torch.Tensor]):
        self.by_address: dict[tuple, list[str]] = {}
        for name, tensor in placeholders.items():
            self.by_address.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)

    def names(self, value) -> list[str]:
        if not isinstance(value, np.ndarray):
            return []
        return self.by_address.get((value.__array_interface__["data"][0], value.shape), [])


def encode_pass(plan: QuantPlan, placeholders: dict[str, torch.Tensor]):
    """The graph pass (an AbstractGraphPass instance) that encodes `plan` into a program converted
    with `placeholders` (planned weight -> its placeholder) in place of the planned weights; after
    it ran, its `encoded` maps each planned weight to the constexpr ops made for it."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    index = PlaceholderIndex(placeholders)

    class EncodeQuantPlan(AbstractGraphPass):
        def __init__(self):
            super().__init__()
            self.encoded: dict[str, list[str]] = {name: [] for name in plan.weights}
            self.made: dict[tuple[int, str], object] = {}  # (block, weight) -> its constexpr's output

        def apply(self, prog):
            for function in prog.functions.values():
                self.encode_block(function)
            missing = sorted(name for name, ops in self.encoded.items() if not ops)
            if missing:
                raise QwenMobileError(
                    f"the converted Core ML program has no constant made from the placeholders of the plan's "
                    f"weights {', '.join(missing)}; they cannot be encoded as the plan's integers"
                )

        @block_context_manager
        def encode_block(self, block):
            for op in list(block.operations):
                for inner in op.blocks:
                    self.encode_block(inner)
                if op.op_type != "const":
                    continue
                names = index.names(op.outputs[0].val)
                if not names:
                    continue
                name = names[0]  # several names: tied weights, the same plan entry
                # one constexpr per weight and block: a tied weight's second constant (the lm_head's)
                # reads the embedding's, as coremltools' deduplication would leave it, so that the
                # manifest names the ops the saved program holds
                new = self.made.get((id(block), name))
                if new is None:
                    new = self.constexpr(name, op)
                    self.made[(id(block), name)] = new
                    for tied in names:
                        self.encoded[tied].append(new.op.name)
                block.replace_uses_of_var_after_op(
                    anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
                )
                block.remove_ops([op])

        def constexpr(self, name: str, const):
            """The plan's encoding of weight `name`, placed before the constant `const` it replaces."""
            try:
                inputs = encoding(plan.weights[name], const.outputs[0].val.dtype.type)
            except QwenMobileError as error:
                raise QwenMobileError(f"{name}: cannot be encoded for Core ML: {error}") from None
            if inputs["offset"] is None:
                del inputs["offset"]
            # named after the plan's weight, already a valid MIL identifier (the backend's name
            # sanitizer leaves it as it is), so the manifest can name each weight's op
            op_name = name.replace(".", "_") + "_quantized"
            if self.encoded[name]:
                op_name += f"_{len(self.encoded[name])}"
            return mb.constexpr_blockwise_shift_scale(**inputs, before_op=const, name=op_name)

    return EncodeQuantPlan()


@contextlib.contextmanager
def pipeline_with(plan: QuantPlan, placeholders: dict[str, torch.Tensor]):
    """A conversion pass pipeline (the default one) that starts with the plan's encoding pass, and
    the pass itself, for what it encoded. First, so that no other pass reads or copies a
    placeholder as a weight (the program is then one that holds the plan's integers from the
    start, as coremltools' own compressed-weight conversion makes). Float plans get the default pipeline."""
    import coremltools as ct
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    pipeline = ct.PassPipeline.DEFAULT
    if not plan.weights:
        yield pipeline, None
        return
    graph_pass = encode_pass(plan, placeholders)
    PASS_REGISTRY.add(PASS_NAMESPACE, graph_pass, override=True, name=PASS_NAME)
    try:
        pipeline.insert_pass(0, PASS_ID)
        yield pipeline, graph_pass
    finally:
        PASS_REGISTRY.passes.pop(PASS_ID, None)


def stored_encodings(package) -> dict[str, dict[str, dict]]:
    """Function -> constexpr_blockwise_shift_scale op name -> its inputs as read back from the
    saved package (an emulator.Package, values through coremltools' blob reader): `data`,
    `scale`, `offset` (None when absent) as arrays, and `dtypes` / `offsets`, each input's
    stored type name and weight-blob offset."""
    from .emulator import DTYPE_NAMES, tensor_dtype

    found = {}
    for function_name, function in package.spec.mlProgram.functions.items():
        block = function.block_specializations[function.opset]
        found[function_name] = ops = {}
        for op in block.operations:
            if op.type != "constexpr_blockwise_shift_scale":
                continue
            entry = {"data": None, "scale": None, "offset": None, "dtypes": {}, "offsets": {}}
            for key in ("data", "scale", "offset"):
                if key not in op.inputs:
                    continue
                value = op.inputs[key].arguments[0].value
                entry[key] = package.value(value, f"{op.outputs[0].name} input {key}")
                entry["dtypes"][key] = DTYPE_NAMES.get(tensor_dtype(value.type))
                if value.HasField("blobFileValue"):
                    entry["offsets"][key] = value.blobFileValue.offset
            ops[op.outputs[0].name] = entry
    return found


def mismatches(stored: dict, encoded: dict, weights: dict) -> list[str]:
    """Planned weights whose integers, scales or zero points differ from what one function of the
    package holds. stored: that function's stored_encodings; encoded: planned weight -> the
    constexpr op (or ops) that hold it (the manifest's weight_compression); weights: the plan's."""
    def holds(entry, weight) -> bool:
        offset = np.zeros_like(weight.zero_point.numpy()) if entry["offset"] is None else entry["offset"]
        return (
            entry["dtypes"].get("data") == f"int{weight.bits}"
            and np.array_equal(entry["data"], weight.qdata.numpy())
            and np.array_equal(entry["scale"], weight.scale.numpy())
            and np.array_equal(offset, weight.zero_point.numpy())
        )

    wrong = []
    for name, weight in weights.items():
        ops = encoded.get(name, [])
        ops = [ops] if isinstance(ops, str) else ops
        if not ops or not all(op in stored and holds(stored[op], weight) for op in ops):
            wrong.append(name)
    return wrong
