"""The TFLite exporter: convert, write, verify through the LiteRT interpreter, then publish the bundle.

A bundle directory holds model.tflite, the checkpoint's tokenizer files, npu_report.json
(every op of the artifact against the NPU support table) and manifest.json (both
signatures' inputs and outputs as written, which state output feeds which input, how it
was checked). It is built in a staging directory and renamed into place only after the
parity gate passed on the file as written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from qwen_mobile import progress
from qwen_mobile.bundle import copy_tokenizer, manifest_head, read_tokenizer_config, tool_versions, write_manifest
from qwen_mobile.checkpoint import Checkpoint, LoadedModel, stop_token_ids
from qwen_mobile.config import Qwen35Config
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.staging import staged_directory

from . import BACKEND, lower, npu_report, runtime, verify

NPU_REPORT = "npu_report.json"


def export(
    loaded: LoadedModel,
    plan: QuantPlan,
    out: Path,
    max_context: int = lower.DEFAULT_MAX_CONTEXT,
    prefill_chunk: int = lower.DEFAULT_PREFILL_CHUNK,
) -> Path:
    checkpoint, model = loaded.checkpoint, loaded.model
    BACKEND.require_scheme(plan.scheme.name)  # the registry checked --quant; this guards library callers
    if next(model.parameters()).dtype != torch.float32:
        raise QwenMobileError("the tflite export needs the model loaded in float32")
    read_tokenizer_config(checkpoint.path)  # fails before the slow work if the tokenizer is missing
    max_context, prefill_chunk = lower.clamp_lengths(model, max_context, prefill_chunk)
    feeds = lower.state_feeds(checkpoint.config)

    out = Path(out)
    with staged_directory(out) as staging:
        started = time.perf_counter()
        with progress.step("converting with litert-torch"):
            flatbuffer = lower.convert(model, max_context, prefill_chunk, plan)
        convert_seconds = time.perf_counter() - started
        artifact = staging / BACKEND.artifact
        artifact.write_bytes(flatbuffer)
        report = npu_report.build(artifact)
        npu_report.require_builtin_only(report, artifact)
        parity = verify.require_parity(artifact, feeds, model, max_context, prefill_chunk, plan, checkpoint.path)
        copy_tokenizer(checkpoint.path, staging)
        (staging / NPU_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        manifest = build_manifest(checkpoint, plan, artifact, max_context, prefill_chunk, parity)
        manifest["export"] = {"convert_seconds": round(convert_seconds, 1), "artifact_bytes": len(flatbuffer)}
        write_manifest(manifest, staging, out)
    return out


def build_manifest(
    checkpoint: Checkpoint, plan: QuantPlan, artifact: Path, max_context: int, prefill_chunk: int, parity: dict
) -> dict:
    config = checkpoint.config
    return {
        **manifest_head(BACKEND, checkpoint, plan, max_context, None, list(stop_token_ids(checkpoint))),
        "max_seq_len": prefill_chunk,
        "methods": signatures(artifact),
        "state_feeds": lower.state_feeds(config),
        "state": state_layout(config, max_context),
        "parity": parity,
        "tools": tool_versions("litert-torch", "ai-edge-litert"),
    }


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


def state_layout(config: Qwen35Config, max_context: int) -> dict:
    """Per layer type: which layers, and each state tensor's name pattern, shape and dtype."""
    layout: dict[str, dict] = {}
    specs = dict(lower.state_specs(config, max_context))
    for layer, layer_type in enumerate(config.layer_types):
        entry = layout.setdefault(layer_type, {"layers": [], "buffers": {}})
        entry["layers"].append(layer)
        for kind in lower.STATE_NAMES[layer_type]:
            tensor = specs[lower.state_name(layer, kind)]
            entry["buffers"][kind] = {
                "name": lower.state_name("{layer}", kind),
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
            }
    return layout
