"""GenerationStats splits a generation's runner calls into the prompt and the decode steps."""

import time

import torch

from qwen_mobile.generate import GenerationStats, generate_tokens


def test_prefill_and_decode_calls_are_timed_apart():
    calls = []

    def step(tokens, position):
        calls.append((len(tokens), position))
        time.sleep(0.02 if len(tokens) > 1 else 0.001)
        logits = torch.zeros(10)
        logits[(position + len(tokens)) % 10] = 1  # greedy: a deterministic next token
        return logits

    stats = GenerationStats()
    prompt = list(range(7))
    tokens = list(generate_tokens(stats.timed(step, len(prompt)), prompt, max_new_tokens=5, max_context=64, max_chunk=4))
    assert len(tokens) == 5
    assert calls[:2] == [(4, 0), (3, 4)]  # the prompt in chunks of 4, then one token per call
    assert stats.prompt_tokens == 7 and stats.decode_steps == len(calls) - 2 == 5
    assert stats.prefill_s >= 0.04 and stats.decode_s < stats.prefill_s
    assert "prompt: 7 tokens" in stats.summary() and "decode: 5 steps" in stats.summary()
