"""What a checkpoint holds, in the numbers that matter on a phone."""

from __future__ import annotations

import math

import torch

from qwen_mobile.checkpoint import Checkpoint
from qwen_mobile.config import FULL_ATTENTION, LINEAR_ATTENTION
from qwen_mobile.models.qwen3_5 import Qwen35, state_tensors

FP32_BYTES, HALF_BYTES = 4, 2


def parameter_counts(model: Qwen35) -> dict[str, int]:
    counts = {"total": 0, "embedding": 0, "lm_head": 0, "linear_attention": 0, "full_attention": 0, "mlp": 0}
    for name, parameter in model.named_parameters():  # a tied lm_head is the embedding: counted once
        count = parameter.numel()
        counts["total"] += count
        for part, key in (
            ("embed_tokens", "embedding"),
            ("lm_head", "lm_head"),
            (".linear_attn.", "linear_attention"),
            (".self_attn.", "full_attention"),
            (".mlp.", "mlp"),
        ):
            if part in name:
                counts[key] += count
    return counts


def describe(checkpoint: Checkpoint) -> dict:
    config = checkpoint.config
    with torch.device("meta"):
        model = Qwen35(config)
    sequence_state = 0  # bytes that do not grow with context: conv (fp32 here) + recurrent (fp32)
    kv_per_token = 0
    for tensor in state_tensors(config, max_context=1):
        if tensor.layer_type == LINEAR_ATTENTION:
            sequence_state += math.prod(tensor.shape) * FP32_BYTES
        else:
            kv_per_token += math.prod(tensor.shape)
    return {
        "source": checkpoint.source,
        "path": str(checkpoint.path),
        "model_type": config.model_type,
        "config_hash": checkpoint.config_hash,
        "layers": {
            "total": config.num_hidden_layers,
            LINEAR_ATTENTION: config.layer_types.count(LINEAR_ATTENTION),
            FULL_ATTENTION: config.layer_types.count(FULL_ATTENTION),
            "pattern": "".join("L" if t == LINEAR_ATTENTION else "F" for t in config.layer_types),
        },
        "parameters": parameter_counts(model),
        "tied_embeddings": config.tie_word_embeddings,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "recurrent_state_bytes_per_sequence": sequence_state,
        "kv_cache_bytes_per_token": {"fp32": kv_per_token * FP32_BYTES, "fp16": kv_per_token * HALF_BYTES},
        "skipped": {"parts": list(config.skipped), "tensors": checkpoint.skipped_tensors},
    }
