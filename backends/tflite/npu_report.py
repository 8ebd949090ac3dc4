"""What a written .tflite asks of an NPU: every op with its tensors, checked against npu_support.json.

Read straight from the flatbuffer (the schema that ships with ai-edge-litert), so the
report describes the file as written: per signature, every operator with its builtin
name and its input and output dtypes and shapes, whether every shape is static, whether
any op is custom or Flex (SELECT_TF_OPS), and per NPU target (LiteRT's Qualcomm and
MediaTek compiler plugins, whose documented op and dtype support is kept as data in
npu_support.json with its source) which ops it would accept. `precision` says which ops
compute in float (any FLOAT32 or FLOAT16 tensor) and which on integers only, and, for a file
with integer FULLY_CONNECTEDs (a8w8, a16w8), why each kind of float op stayed float
(float_ops.json).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from qwen_mobile.errors import QwenMobileError

SUPPORT_TABLE = Path(__file__).resolve().parent / "npu_support.json"
FLOAT_OPS_TABLE = Path(__file__).resolve().parent / "float_ops.json"
FLOAT_TYPES = ("FLOAT32", "FLOAT16")
FLEX_PREFIX = "Flex"


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def enum_names(enum) -> dict[int, str]:
    return {value: name for name, value in vars(enum).items() if not name.startswith("_")}


def support_table() -> dict[str, dict]:
    return {name: entry for name, entry in json.loads(SUPPORT_TABLE.read_text()).items() if not name.startswith("_")}


def read_model(path: Path):
    s = schema()
    data = Path(path).read_bytes()
    try:
        return s.ModelT.InitFromPackedBuf(data, 0)
    except Exception as error:  # a damaged flatbuffer raises whatever the generated reader trips on
        raise QwenMobileError(f"{path}: not a readable TFLite flatbuffer ({type(error).__name__})") from None


def operator_name(code, builtin_names: dict[int, str]) -> str:
    """The builtin's name, or CUSTOM:<custom code> (Flex ops are custom ops named Flex...)."""
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)  # the schema keeps small codes in the deprecated field
    name = builtin_names.get(builtin, f"UNKNOWN_{builtin}")
    if name == "CUSTOM":
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else str(code.customCode)
        return f"CUSTOM:{custom}"
    return name


def tensor_entry(tensor, type_names: dict[int, str]) -> dict:
    shape = [int(d) for d in (tensor.shape if tensor.shape is not None else [])]
    signature = [int(d) for d in tensor.shapeSignature] if tensor.shapeSignature is not None else shape
    entry = {"dtype": type_names.get(tensor.type, str(tensor.type)), "shape": shape, "static": -1 not in signature}
    quantization = tensor.quantization
    if quantization is not None and quantization.scale is not None and len(quantization.scale):
        entry["quantization"] = "per_channel" if len(quantization.scale) > 1 else "per_tensor"
    if quantization is not None and quantization.detailsType == schema().QuantizationDetails.BlockwiseQuantization:
        entry["quantization"] = "blockwise"
    return entry


def check_target(op: str, tensors: list[dict], target: dict) -> list[str]:
    """Why `target` would not take this op (empty: it would)."""
    reasons = []
    if op not in target["ops"]:
        reasons.append(f"op {op} is not in the plugin's list")
    for dtype in sorted({t["dtype"] for t in tensors} - set(target["dtypes"])):
        reasons.append(f"dtype {dtype}")
    if not target["blockwise_quantization"] and any(t.get("quantization") == "blockwise" for t in tensors):
        reasons.append("blockwise quantization")
    return reasons


def build(path: Path) -> dict:
    s = schema()
    model = read_model(path)
    builtin_names, type_names = enum_names(s.BuiltinOperator), enum_names(s.TensorType)
    codes = [operator_name(code, builtin_names) for code in model.operatorCodes]
    targets = support_table()
    operators, per_target = [], {name: Counter() for name in targets}
    for subgraph in model.subgraphs:
        signature = subgraph.name.decode() if isinstance(subgraph.name, bytes) else str(subgraph.name)
        for index, op in enumerate(subgraph.operators or []):
            name = codes[op.opcodeIndex]
            inputs = [tensor_entry(subgraph.tensors[i], type_names) for i in op.inputs if i >= 0]
            outputs = [tensor_entry(subgraph.tensors[i], type_names) for i in op.outputs if i >= 0]
            computes_in = "float" if any(t["dtype"] in FLOAT_TYPES for t in inputs + outputs) else "integer"
            entry = {"signature": signature, "index": index, "op": name, "computes_in": computes_in,
                     "inputs": inputs, "outputs": outputs}
            for target_name, target in targets.items():
                reasons = check_target(name, inputs + outputs, target)
                entry[target_name] = {"supported": not reasons, **({"why_not": reasons} if reasons else {})}
                if reasons:
                    per_target[target_name][name] += 1
            operators.append(entry)
    custom = sorted({c for c in codes if c.startswith("CUSTOM:")})
    precision = precision_summary(operators)
    return {
        "artifact": Path(path).name,
        "builtin_only": not custom,
        "custom_ops": custom,
        "flex_ops": [c for c in custom if c.removeprefix("CUSTOM:").startswith(FLEX_PREFIX)],
        "all_shapes_static": all(t["static"] for op in operators for t in op["inputs"] + op["outputs"]),
        "op_counts": dict(sorted(Counter(op["op"] for op in operators).items())),
        "precision": precision,
        "targets": {
            name: {
                "name": target["name"],
                "source": target["source"],
                "ops": len(operators),
                "supported": len(operators) - sum(per_target[name].values()),
                "unsupported_by_op": dict(sorted(per_target[name].items())),
            }
            for name, target in targets.items()
        },
        "support_table": SUPPORT_TABLE.name,
        "operators": operators,
    }


def precision_summary(operators: list[dict]) -> dict:
    """How many ops compute in float and on integers only; for a file with integer FULLY_CONNECTEDs,
    why each kind of float op is float (float_ops.json)."""
    floats = Counter(op["op"] for op in operators if op["computes_in"] == "float")
    integer_linears = sum(1 for op in operators if op["op"] == "FULLY_CONNECTED" and op["computes_in"] == "integer")
    summary = {
        "fully_integer": not floats,
        "integer_ops": len(operators) - sum(floats.values()),
        "float_ops": sum(floats.values()),
        "integer_fully_connected": integer_linears,
        "float_ops_by_op": dict(sorted(floats.items())),
    }
    if integer_linears:
        reasons = {name: why for name, why in json.loads(FLOAT_OPS_TABLE.read_text()).items() if not name.startswith("_")}
        summary["why_float"] = {name: reasons.get(name, "not described in float_ops.json") for name in sorted(floats)}
    return summary


def require_builtin_only(report: dict, path: Path) -> None:
    """Custom and Flex ops are what the NPU and GPU delegates refuse outright: never publish one."""
    if not report["builtin_only"]:
        raise QwenMobileError(f"{path.name}: has non-builtin ops {', '.join(report['custom_ops'])}")
    if not report["all_shapes_static"]:
        raise QwenMobileError(f"{path.name}: has dynamic shapes, which NPU compilers refuse")
