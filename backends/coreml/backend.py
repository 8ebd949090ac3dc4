"""The Core ML backend behind the core's interface (qwen_mobile.registry.Backend)."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

from qwen_mobile.models.qwen3_5 import STATE_TENSOR_NAMES, StateTensor
from qwen_mobile.registry import Backend, ExportTarget, Lengths, Runner

from . import compress, emulator, lower, runtime

# coremltools announces as it is imported that this OS has no Core ML runtime (the emulator runs
# the program here) and that versions this project pins are untested: ten lines of stderr on
# every command that opens the backend. Its errors still show.
logging.getLogger("coremltools").setLevel(logging.ERROR)

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
EMULATOR_REFUSAL = "the Core ML emulator is not a performance runtime; `qwen-mobile bench` times Core ML bundles on macOS only"


class CoreMLBackend(Backend):
    default_lengths = Lengths(max_context=512, max_chunk=32)
    tools = ("coremltools",)
    # the converter traces a placeholder for each planned weight, which the plan's integers replace (lower.lower)
    lowering_reads_planned_weights = False

    @property
    def runtimes(self) -> tuple[str, ...]:
        return ("coreml",) if runtime.use_core_ml() else ("emulator",)

    def check(self, plan, lengths: Lengths) -> None:
        compress.check_encodable(plan, self.spec.quant_schemes)

    def lower(self, target: ExportTarget, directory: Path) -> dict:
        model, plan, lengths = target.model, target.plan, target.lengths
        recurrent_dtype = recurrent_state_dtype(plan)
        package = directory / self.spec.artifact
        lowered = lower.lower(model, plan, package, lengths.max_context, lengths.max_chunk, recurrent_dtype)
        split = lower.split_kinds(plan.scheme.compute_dtype, recurrent_dtype)
        return {
            "methods": functions(model.config, lengths, split),
            "precision": {
                "compute": plan.scheme.compute_dtype,
                "states": "Core ML states are fp16; a state kept at fp32 precision is a pair of fp16 states, "
                          f"value = hi + lo / {lower.composite.LO_SCALE:g}",
                "fp32_precision_states": sorted(STATE_TENSOR_NAMES[field] for field in split),
                "recurrent_state_drift": RECURRENT_STATE_DRIFT,
                "recurrence_ops": "fp32 (the gated delta rule composite is excluded from fp16)",
            },
            "functions": "prefill and decode share one weight blob and the same states (one make_state() serves "
                         "both); decode is the default function; a call at input_pos 0 starts a new sequence",
            "deployment_target": "iOS18 / macOS15",
            "compute_units": "ALL (Core ML places ops on the Neural Engine, GPU or CPU at load time)",
            "operations": operation_counts(package),
            "export_seconds": round(lowered.seconds, 1),
            **({"weight_compression": weight_compression(lowered)} if plan.weights else {}),
        }

    def stored_state(self, tensor: StateTensor, plan) -> list[dict]:
        # every state is stored fp16; one kept at fp32 precision as an _hi/_lo pair (lower.stored_parts)
        split = lower.split_kinds(plan.scheme.compute_dtype, recurrent_state_dtype(plan))
        return [{"name": tensor.name + part, "shape": list(tensor.shape), "dtype": "float16",
                 **({"part": part[1:]} if part else {})} for part in lower.stored_parts(tensor, split)]

    def open(self, bundle: Path, manifest: dict, runtime_name: str | None = None) -> Runner:
        session = runtime.open_session(Path(bundle) / manifest["artifact"])
        chunk = manifest["max_seq_len"]
        return Runner(lambda tokens, start: runtime.step(session, tokens, start, chunk),
                      max_context=manifest["max_context"], max_chunk=chunk)

    def missing_weights(self, bundle: Path, manifest: dict, plan) -> list[str]:
        """Each function's constexpr_blockwise_shift_scale ops read back from the package, against the plan."""
        stored = compress.stored_encodings(emulator.Package(Path(bundle) / manifest["artifact"]))
        functions = manifest.get("weight_compression", {}).get("functions", {})
        missing = set()
        for function in stored:
            missing.update(compress.mismatches(stored[function], functions.get(function, {}), plan.weights))
        return sorted(missing)

    def bench_refusal(self) -> str | None:
        return None if runtime.use_core_ml() else EMULATOR_REFUSAL


def recurrent_state_dtype(plan) -> str:
    """fp32 compute keeps every state at fp32 precision; fp16 compute keeps the recurrent
    state at fp32 precision when the measured fp16 drift is material."""
    if plan.scheme.compute_dtype == "float32":
        return "float32"
    return "float32" if RECURRENT_STATE_DRIFT["material"] else "float16"


def operation_counts(package: Path) -> dict[str, dict[str, int]]:
    """Function -> op type -> count, read back from the saved program's protobuf (its weights are
    not read: decoding them, as the emulator does, cost the 2B export 1.9 GB to count ops)."""
    functions = emulator.read_spec(package).mlProgram.functions
    return {
        name: dict(sorted(collections.Counter(
            op.type for op in function.block_specializations[function.opset].operations).items()))
        for name, function in functions.items()
    }


def weight_compression(lowered: lower.Lowered) -> dict:
    return {
        "encoding": "constexpr_blockwise_shift_scale (iOS 18): the plan's integers (int4 packed two per byte, or "
                    "int8), its scales in the compute dtype and its zero points (omitted when all zero), "
                    "decompressed to float before the op that uses the weight",
        "functions": {function: {name: ops[0] if len(ops) == 1 else ops for name, ops in sorted(encoded.items())}
                      for function, encoded in lowered.encoded.items()},
    }


def functions(config, lengths: Lengths, split: frozenset[str]) -> dict:
    states = [name for name, _ in lower.stored_states(config, lengths.max_context, split)]
    logits = [{"name": "logits", "dtype": "float32", "shape": [1, config.vocab_size]}]
    position = {"name": "input_pos", "dtype": "int32", "shape": [1]}
    chunk = lengths.max_chunk
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
