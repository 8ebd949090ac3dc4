"""The Core ML exporter: convert, save the mlpackage, run it through the emulator, gate, publish.

A bundle holds model.mlpackage (one ML Program with a `prefill` and a `decode`
function sharing weights and states), the checkpoint's tokenizer files and
manifest.json. It is built in a staging directory and renamed into place only after
the parity gate passed on the package as written, so a failed export leaves nothing.
"""

from __future__ import annotations

import collections
from pathlib import Path

from qwen_mobile import progress
from qwen_mobile.bundle import copy_tokenizer, manifest_head, read_tokenizer_config, tool_versions, write_manifest
from qwen_mobile.checkpoint import Checkpoint, LoadedModel, stop_token_ids
from qwen_mobile.config import Qwen35Config
from qwen_mobile.parity import Parity
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.staging import staged_directory

from . import BACKEND, compress, emulator, lower, verify

# Measured with drift.measure(model) on qwen3.5-tiny (2,048 tokens, one per call, 50 s on one
# core). Not material: fp16 compute stores the recurrent state as one fp16 state (the
# recurrence itself still computes in fp32).
RECURRENT_STATE_DRIFT = {
    "tokens": 2048,
    "feeding": "one token per call, conv and KV state fp16 in both arms",
    "state_relative_error": 0.0002869279,
    "logits_max_diff_ratio_to_std": 0.0006204089,
    "top1_agreement": 1.0,
    "mean_kl": 1.96e-08,
    "last_256_top1_agreement": 1.0,
    "material": False,
    "rule": "material if top-1 agreement < 0.99 or max|diff| > 0.05 x std"
}


def export(
    loaded: LoadedModel,
    plan: QuantPlan,
    out: Path,
    max_context: int = lower.DEFAULT_MAX_CONTEXT,
    chunk: int = lower.DEFAULT_PREFILL_CHUNK,
) -> Path:
    checkpoint, model = loaded.checkpoint, loaded.model
    BACKEND.require_scheme(plan.scheme.name)  # the registry checked --quant; this guards library callers
    compress.check_encodable(plan, BACKEND.quant_schemes)
    read_tokenizer_config(checkpoint.path)  # fails before the slow work if the tokenizer is missing
    max_context = min(max_context, model.config.max_position_embeddings)
    chunk = min(chunk, max_context)
    recurrent_dtype = recurrent_state_dtype(plan)

    out = Path(out)
    with staged_directory(out) as staging:
        package = staging / BACKEND.artifact
        with progress.step("converting with coremltools"):
            lowered = lower.lower(model, plan, package, max_context, chunk, recurrent_dtype)
        parity = verify.require_parity(package, model, max_context, chunk, plan, checkpoint.path)
        operations = operation_counts(package)
        copy_tokenizer(checkpoint.path, staging)
        manifest = build_manifest(checkpoint, plan, max_context, chunk, recurrent_dtype, operations, lowered, parity)
        write_manifest(manifest, staging, out)
    return out


def recurrent_state_dtype(plan: QuantPlan) -> str:
    """fp32 compute keeps every state at fp32 precision; fp16 compute keeps the recurrent
    state at fp32 precision when the measured fp16 drift is material."""
    if plan.scheme.compute_dtype == "float32":
        return "float32"
    drift = RECURRENT_STATE_DRIFT
    return "float32" if drift is None or drift["material"] else "float16"


def operation_counts(package: Path) -> dict[str, dict[str, int]]:
    """Function -> op type -> count, read back from the saved program."""
    program = emulator.Package(package)
    return {
        name: dict(sorted(collections.Counter(op.type for op in function.operations).items()))
        for name, function in program.functions.items()
    }


def build_manifest(
    checkpoint: Checkpoint,
    plan: QuantPlan,
    max_context: int,
    chunk: int,
    recurrent_dtype: str,
    operations: dict,
    lowered: lower.Lowered,
    parity: Parity,
) -> dict:
    config = checkpoint.config
    split = lower.split_kinds(plan.scheme.compute_dtype, recurrent_dtype)
    return {
        **manifest_head(BACKEND, checkpoint, plan, max_context, None, list(stop_token_ids(checkpoint))),
        "max_seq_len": chunk,
        "methods": functions(config, max_context, chunk, split),
        "state": state_layout(config, max_context, split),
        "precision": {
            "compute": plan.scheme.compute_dtype,
            "states": "Core ML states are fp16; a state kept at fp32 precision is a pair of fp16 states, "
                      "value = hi + lo",
            "fp32_precision_states": sorted(split),
            "recurrent_state_drift": RECURRENT_STATE_DRIFT,
            "recurrence_ops": "fp32 (the gated delta rule composite is excluded from fp16)",
        },
        "functions": "prefill and decode share one weight blob and the same states (one make_state() serves both); "
                     "decode is the default function; a call at input_pos 0 starts a new sequence",
        "deployment_target": "iOS18 / macOS15",
        "compute_units": "ALL (Core ML places ops on the Neural Engine, GPU or CPU at load time)",
        "operations": operations,
        "export_seconds": round(lowered.seconds, 1),
        **({"weight_compression": weight_compression(plan, lowered)} if plan.weights else {}),
        "parity": {**parity.to_manifest(), "runtime": "emulator" if not verify.runtime.use_core_ml() else "coreml"},
        "tools": tool_versions("coremltools"),
    }


def weight_compression(plan: QuantPlan, lowered: lower.Lowered) -> dict:
    return {
        "encoding": "constexpr_blockwise_shift_scale (iOS 18): the plan's integers (int4 packed two per byte, or "
                    "int8), its scales in the compute dtype and its zero points (omitted when all zero), "
                    "decompressed to float before the op that uses the weight",
        "functions": {function: {name: ops[0] if len(ops) == 1 else ops for name, ops in sorted(encoded.items())}
                      for function, encoded in lowered.encoded.items()},
    }


def functions(config: Qwen35Config, max_context: int, chunk: int, split: frozenset[str]) -> dict:
    states = [name for name, _, _ in lower.stored_states(config, max_context, split)]
    logits = [{"name": "logits", "dtype": "float32", "shape": [1, config.vocab_size]}]
    position = {"name": "input_pos", "dtype": "int32", "shape": [1]}
    return {
        "prefill": {
            "inputs": [{"name": "tokens", "dtype": "int32", "shape": [1, chunk]}, position,
                       {"name": "length", "dtype": "int32", "shape": [1]}],
            "outputs": logits,
            "states": states,
            "notes": f"a chunk of {chunk} tokens of which the first `length` are real (pad the rest with any id); "
                     "logits of position length-1; padded tokens do not touch the state",
        },
        "decode": {
            "inputs": [{"name": "tokens", "dtype": "int32", "shape": [1, 1]}, position],
            "outputs": logits,
            "states": states,
            "notes": "one token; the default function",
        },
    }


def state_layout(config: Qwen35Config, max_context: int, split: frozenset[str]) -> dict:
    layout: dict[str, dict] = {}
    for layer, (layer_type, tensors) in enumerate(zip(config.layer_types, lower.state_tensors(config, max_context))):
        entry = layout.setdefault(layer_type, {"layers": [], "buffers": {}})
        entry["layers"].append(layer)
        for kind, tensor in tensors.items():
            for part in (("_hi", "_lo") if kind in split else ("",)):
                entry["buffers"][kind + part] = {
                    "name": lower.state_name("{layer}", kind) + part,
                    "shape": list(tensor.shape),
                    "dtype": "float16",
                }
    return layout
