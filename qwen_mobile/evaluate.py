"""Language-model quality on held-out text: the yardstick for quantization damage."""

from __future__ import annotations

import math
from collections import Counter

import torch

from qwen_mobile.models.qwen3_5 import Qwen35


@torch.no_grad()
def perplexity(model: Qwen35, tokens: list[int], window: int = 256) -> float:
    """Token perplexity over non-overlapping windows, each a fresh sequence from position 0."""
    total_nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = torch.tensor([tokens[start : start + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits, _ = model(chunk[:, :-1], torch.tensor([0]), model.init_state(window), all_positions=True)
        total_nll += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total_nll / count)


def unigram_perplexity(train_tokens: list[int], eval_tokens: list[int], vocab_size: int) -> float:
    """The baseline a model must beat: token frequencies from training text, add-one smoothed."""
    counts = Counter(train_tokens)
    total = len(train_tokens) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / total) for t in eval_tokens)
    return math.exp(nll / len(eval_tokens))
