"""The ExecuTorch exporter: lower, write, verify through the runtime, then publish the bundle.

A bundle directory holds model.pte, the checkpoint's tokenizer.json and
tokenizer_config.json, and manifest.json (what the program expects and how it was
checked). It is built in a staging directory and renamed into place only after the
parity gate passed on the file as written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_mobile import progress
from qwen_mobile.bundle import copy_tokenizer, manifest_head, read_tokenizer_config, tool_versions, write_manifest
from qwen_mobile.checkpoint import Checkpoint, LoadedModel, stop_token_ids
from qwen_mobile.config import Qwen35Config
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.parity import Parity
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.staging import staged_directory

from . import BACKEND, lower, verify

# Qwen3.5's tokenizer has no BOS token; ExecuTorch's own Qwen3.5 config gives the runner <|im_start|>.
BOS_TOKEN = "<|im_start|>"


def export(
    loaded: LoadedModel,
    plan: QuantPlan,
    out: Path,
    max_context: int = lower.DEFAULT_MAX_CONTEXT,
    max_seq_len: int = lower.DEFAULT_MAX_SEQ_LEN,
) -> Path:
    checkpoint, model = loaded.checkpoint, loaded.model
    if next(model.parameters()).dtype != torch.float32:
        raise QwenMobileError("the executorch export needs the model loaded in float32")
    read_tokenizer_config(checkpoint.path)  # fails before the slow work if the tokenizer is missing
    bos_id, eos_ids = bos_token_id(checkpoint.path), list(stop_token_ids(checkpoint))
    max_context, max_seq_len = lower.clamp_lengths(model, max_context, max_seq_len)
    metadata = lower.runner_metadata(model, max_context, max_seq_len, bos_id, eos_ids)

    out = Path(out)
    with staged_directory(out) as staging:
        with progress.step("lowering: torch.export, XNNPACK, .pte"):
            program = lower.lower(model, plan, max_context, max_seq_len, metadata)
        (staging / BACKEND.artifact).write_bytes(program.pte)
        parity = verify.require_parity(staging / BACKEND.artifact, model, max_context, max_seq_len, plan, checkpoint.path)
        copy_tokenizer(checkpoint.path, staging)
        write_manifest(build_manifest(checkpoint, plan, metadata, program, parity), staging, out)
    return out


def bos_token_id(checkpoint_dir: Path) -> int:
    from tokenizers import Tokenizer

    path = checkpoint_dir / "tokenizer.json"
    try:
        token_id = Tokenizer.from_file(str(path)).token_to_id(BOS_TOKEN)
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise QwenMobileError(f"{path}: cannot be read by tokenizers ({error})") from None
    if token_id is None:
        raise QwenMobileError(f"{path}: has no {BOS_TOKEN} token, which the ExecuTorch runner uses as BOS")
    return token_id


def build_manifest(
    checkpoint: Checkpoint,
    plan: QuantPlan,
    metadata: dict,
    program: lower.LoweredProgram,
    parity: Parity,
) -> dict:
    config = checkpoint.config
    max_context, max_seq_len = metadata["get_max_context_len"], metadata["get_max_seq_len"]
    return {
        **manifest_head(BACKEND, checkpoint, plan, max_context, metadata["get_bos_id"], metadata["get_eos_ids"]),
        "max_seq_len": max_seq_len,
        "methods": {"forward": forward_signature(config, max_seq_len), **constant_methods(metadata)},
        "state": state_layout(config, max_context),
        "portable_operators": sorted(program.portable_operators),
        "parity": parity.to_manifest(),
        "tools": tool_versions("executorch", "torchao"),
    }


def forward_signature(config: Qwen35Config, max_seq_len: int) -> dict:
    return {
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, "seq_len"]},
            {"name": "input_pos", "dtype": "int64", "shape": [1]},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, config.vocab_size]}],
        "dynamic_dims": {"seq_len": {"min": 1, "max": max_seq_len}},
        "notes": "logits of the last fed position; state is held in the program, and input_pos 0 starts a new "
        "sequence",
    }


def constant_methods(metadata: dict) -> dict:
    return {name: {"inputs": [], "outputs": [{"value": value}]} for name, value in metadata.items()}


def state_layout(config: Qwen35Config, max_context: int) -> dict:
    """Per layer type: which layers, and each state buffer's name pattern, shape and dtype."""
    layout: dict[str, dict] = {}
    for layer, (layer_type, buffers) in enumerate(zip(config.layer_types, lower.state_buffers(config, max_context))):
        entry = layout.setdefault(layer_type, {"layers": [], "buffers": {}})
        entry["layers"].append(layer)
        for kind, tensor in buffers.items():
            entry["buffers"][kind] = {
                "name": lower.buffer_name("{layer}", kind),
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
            }
    return layout
