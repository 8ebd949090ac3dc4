"""The TFLite / LiteRT backend behind the core's interface (qwen_mobile.registry.Backend)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qwen_mobile.models.qwen3_5 import StateTensor
from qwen_mobile.registry import Backend, ExportTarget, Lengths, Runner

from . import lower, npu_report, runtime
from .swaps import stored_shape

NPU_REPORT = "npu_report.json"
# runtime name -> XNNPACK on (LiteRT's default CPU path) or TFLite's own builtin kernels
# (the op set an NPU or GPU delegate falls back to); a bundle must pass its gate on both
RUNTIMES = {"xnnpack": True, "builtin_kernels": False}


class TFLiteBackend(Backend):
    runtimes = tuple(RUNTIMES)
    default_lengths = Lengths(max_context=512, max_chunk=32)
    tools = ("litert-torch", "ai-edge-litert")
    # the converter takes each planned weight as a float32 signature input traced through a
    # placeholder: its values are never read, and quantize.encode writes the plan's (lower.convert)
    lowering_reads_planned_weights = False

    def check(self, plan, lengths: Lengths) -> None:
        from . import quantize

        if plan.weights:
            quantize.check_encodable(plan)

    def lower(self, target: ExportTarget, directory: Path) -> dict:
        model, lengths = target.model, target.lengths
        started = time.perf_counter()
        with converter_stdout_silenced():
            flatbuffer = lower.convert(model, lengths.max_context, lengths.max_chunk, target.plan)
        convert_seconds = time.perf_counter() - started
        artifact = directory / self.spec.artifact
        artifact.write_bytes(flatbuffer)
        report = npu_report.build(artifact)
        npu_report.require_builtin_only(report, artifact)
        (directory / NPU_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        feeds = lower.state_feeds(model.config, lengths.max_context)
        return {
            "methods": signatures(artifact),
            "state_feeds": feeds,
            # inputs an app may bind as their own `_out` output too (the caches then never move)
            "state_in_place": lower.in_place_state(flatbuffer, feeds),
            "export": {"convert_seconds": round(convert_seconds, 1), "artifact_bytes": len(flatbuffer)},
        }

    def stored_state(self, tensor: StateTensor, plan) -> list[dict]:
        (entry,) = super().stored_state(tensor, plan)
        return [{**entry, "shape": list(stored_shape(tensor))}]

    def open(self, bundle: Path, manifest: dict, runtime_name: str | None = None) -> Runner:
        """The bundle's model.tflite in LiteRT's CompiledModel (XNNPACK unless runtime_name is builtin_kernels),
        the caches in place where the manifest allows it."""
        model = runtime.TFLiteModel(
            Path(bundle) / manifest["artifact"], manifest["state_feeds"], manifest["max_context"],
            xnnpack=RUNTIMES[runtime_name or self.runtimes[0]], in_place=manifest.get("state_in_place", ()),
            weight_cache=None if packs_small(manifest["quant"]) else runtime.IN_MEMORY,
        )

        def step(tokens: list[int], start: int) -> torch.Tensor:
            return torch.from_numpy(model.step(tokens, start))

        return Runner(step, max_context=manifest["max_context"], max_chunk=manifest["max_seq_len"])

    def missing_weights(self, bundle: Path, manifest: dict, plan) -> list[str]:
        """The integer constants read back from model.tflite, against the plan, and for static
        activations each integer FULLY_CONNECTED's input and output ranges (in every signature).
        A tied lm_head is the embedding's constant, so the embedding's check covers it."""
        from . import quantize

        flatbuffer = (Path(bundle) / manifest["artifact"]).read_bytes()
        missing = differing_ranges(quantize.static_ranges(flatbuffer), plan)
        found = set()
        try:
            for name, entry in quantize.stored_weights(flatbuffer):  # one weight's integers held at a time
                found.add(name)
                weight = plan.weights.get(name)
                if weight is not None and not stores(entry, weight):
                    missing.append(name)
        except AssertionError as error:  # one weight in two buffers: not what the encoder writes
            return [str(error).split(":")[0]]
        owner = plan.weights.get("embed_tokens.weight")
        for name, weight in plan.weights.items():
            tied = name != "embed_tokens.weight" and owner is not None and weight.qdata is owner.qdata
            if name not in found and not tied:
                missing.append(name)
        return sorted(set(missing))

    def thread_counts(self) -> dict:
        """What runtime.TFLiteModel runs with, as an app would set it."""
        return {
            "litert": runtime.thread_count(),  # CpuOptions.num_threads: one per core, as torch counts them
            "litert_api": "CompiledModel, CPU accelerator (XNNPACK)",
            "xnnpack_weight_cache": "shared by both signatures: a file for schemes with quantized activations, in memory otherwise",
            "state": "caches bound in place (state_in_place), other state in swapped buffers",
        }


def stores(entry: dict, weight) -> bool:
    """Whether a weight read back from the file (quantize.stored_weights) holds the plan's integers,
    scales and zero points exactly."""
    return (entry["qdata"].size == weight.qdata.numel() and entry["scale"].size == weight.scale.numel()
            and np.array_equal(entry["qdata"].reshape(weight.qdata.shape), weight.qdata.numpy())
            and np.array_equal(entry["scale"].reshape(weight.scale.shape), weight.scale.float().numpy())
            and np.array_equal(entry["zero_point"].reshape(weight.zero_point.shape), weight.zero_point.numpy()))


def differing_ranges(found: dict[str, list[dict]], plan) -> list[str]:
    """The plan's static-activation linears whose integer FULLY_CONNECTEDs (one per signature) do not
    carry the plan's input and output scale and zero point, exactly, and its activation type; and any
    integer FULLY_CONNECTED the plan does not describe."""
    from qwen_mobile.quant.static import INT16_STATIC

    differ = sorted(set(found) - set(plan.activation_ranges))
    for name, spec in plan.activation_ranges.items():
        expected = {"activations": "INT16" if spec.activations == INT16_STATIC else "INT8",
                    "input": [spec.input_scale, spec.input_zero_point], "output": [spec.output_scale, spec.output_zero_point]}
        entries = found.get(name, [])
        if len(entries) != len(lower.SIGNATURES) or any(
                {key: entry[key] for key in expected} != expected or entry["output_type"] != expected["activations"]
                for entry in entries):
            differ.append(name)
    return differ


def packs_small(quant: dict) -> bool:
    """Whether XNNPACK's packed weights are about the artifact's size, so worth a file: the schemes
    whose linears run on quantized activations (8da8w, 8da4w, a8w8, a16w8). fp32 and the weight-only schemes (which
    it unpacks to float32) pack to several times a quantized file; their cache stays in memory."""
    return bool(quant.get("activations"))


@contextlib.contextmanager
def converter_stdout_silenced():
    """litert-torch and the TFLite converter print ~60 progress lines on stdout, from C++ as well
    as Python. stdout is for results (the core reports its own steps on stderr), so file
    descriptor 1 points at /dev/null meanwhile; errors still raise, and C++ logs keep stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.close(devnull)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def signatures(artifact: Path) -> dict:
    """Each signature's inputs and outputs as the interpreter reads them from the written file."""
    interpreter = runtime.interpreter_module().Interpreter(model_path=str(artifact))
    methods = {}
    for name in (lower.PREFILL, lower.DECODE):
        runner = interpreter.get_signature_runner(name)
        methods[name] = {
            "inputs": [tensor_entry(n, d) for n, d in runner.get_input_details().items()],
            "outputs": [tensor_entry(n, d) for n, d in runner.get_output_details().items()],
        }
    methods[lower.PREFILL]["notes"] = (
        "tokens holds `length` real tokens then padding (any id); padding changes no state and the logits are "
        "the last real token's. Every `<name>_out` output feeds input `<name>` on the next call (state_feeds)."
    )
    methods[lower.DECODE]["notes"] = "one token; state as for prefill. input_pos 0 starts a new sequence."
    return methods


def tensor_entry(name: str, details: dict) -> dict:
    return {"name": name, "dtype": np.dtype(details["dtype"]).name, "shape": [int(s) for s in details["shape"]]}
