"""Text generation with the export-ready model on this CPU: chunked prefill, then decode."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.registry import Runner

PREFILL_CHUNK = 128


def load_tokenizer(checkpoint_dir: Path):
    """The checkpoint's own tokenizer (tokenizer.json + tokenizer_config.json with its chat template)."""
    from transformers import AutoTokenizer

    if not (checkpoint_dir / "tokenizer.json").is_file():
        raise QwenMobileError(f"{checkpoint_dir / 'tokenizer.json'}: not found")
    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except Exception as error:  # transformers raises many types for a malformed tokenizer
        raise QwenMobileError(f"{checkpoint_dir / 'tokenizer.json'}: cannot be loaded ({error})") from None


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer.encode(text, add_special_tokens=False)
    if not tokenizer.chat_template:
        raise QwenMobileError("--chat: tokenizer_config.json has no chat_template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over the top_p probability mass."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


Step = Callable[[list[int], int], torch.Tensor]
"""Feed token ids at positions start.. of the current sequence; return the last position's logits [vocab]."""


def eager_runner(model: Qwen35, max_context: int) -> Runner:
    return Runner(eager_step(model, max_context), max_context=max_context, max_chunk=PREFILL_CHUNK)


def eager_step(model: Qwen35, max_context: int) -> Step:
    """The export-ready model on this CPU, its state kept between calls."""
    state = model.init_state(max_context)

    @torch.no_grad()
    def step(tokens: list[int], start: int) -> torch.Tensor:
        nonlocal state
        logits, state = model(torch.tensor([tokens]), torch.tensor([start]), state)
        return logits[0]

    return step


def generate_tokens(
    step: Step,
    prompt: list[int],
    *,
    max_new_tokens: int,
    max_context: int,
    max_chunk: int = PREFILL_CHUNK,
    stop_ids: tuple[int, ...] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    context_flag: str = "max_context",
) -> Iterator[int]:
    """Yields new token ids until a stop id (yielded too), max_new_tokens, or a full context.
    The prompt goes in as prefill chunks of up to max_chunk tokens, then one token per step.
    `context_flag` names what sets the context, for the error when the prompt does not fit."""
    if not prompt:
        raise QwenMobileError("--prompt is empty")
    if len(prompt) >= max_context:
        raise QwenMobileError(
            f"--prompt is {len(prompt)} tokens; the context holds {max_context} (see {context_flag})"
        )
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    for start in range(0, len(prompt), max_chunk):
        logits = step(prompt[start : start + max_chunk], start)
    position = len(prompt)
    for _ in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        yield token
        if token in stop_ids or position >= max_context:
            return
        logits = step([token], position)
        position += 1


@dataclass
class GenerationStats:
    """Wall time of the runner's calls, split the way a user reads a generation: the prompt
    (prefill calls, which also give the first token) and each token after it (decode steps)."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0

    def timed(self, step: Step, prompt_tokens: int) -> Step:
        self.prompt_tokens = prompt_tokens

        def call(tokens: list[int], position: int) -> torch.Tensor:
            start = time.perf_counter()
            logits = step(tokens, position)
            elapsed = time.perf_counter() - start
            if position < prompt_tokens:
                self.prefill_s += elapsed
            else:
                self.decode_steps += 1
                self.decode_s += elapsed
            return logits

        return call

    def summary(self) -> str:
        text = f"prompt: {self.prompt_tokens} tokens in {self.prefill_s:.2f} s"
        if self.prefill_s > 0:
            text += f" ({self.prompt_tokens / self.prefill_s:.1f} tokens/s)"
        if self.decode_steps and self.decode_s > 0:
            text += f"; decode: {self.decode_steps} steps, {self.decode_steps / self.decode_s:.1f} tokens/s"
        return text


def generate_text(
    runner: Runner,
    tokenizer,
    prompt: str,
    *,
    chat: bool,
    stop_ids: tuple[int, ...],
    stats: GenerationStats | None = None,
    **sampling,
) -> Iterator[str]:
    """Text pieces continuing `prompt`, from any runner: the eager model or an artifact's runtime.
    `sampling` holds generate_tokens' max_new_tokens, temperature, top_p and seed; `stats`,
    when given, is filled with the runner's timings as the pieces are drawn."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat)
    step = stats.timed(runner.step, len(prompt_ids)) if stats else runner.step
    tokens = generate_tokens(
        step, prompt_ids, max_context=runner.max_context, max_chunk=runner.max_chunk, stop_ids=stop_ids, **sampling,
    )
    return stream_text(tokenizer, tokens, stop_ids)


def stream_text(tokenizer, tokens: Iterator[int], stop_ids: tuple[int, ...]) -> Iterator[str]:
    """Decoded text as it grows; byte-level BPE may split a character across tokens,
    so a piece is released only once it decodes without a replacement character."""
    generated: list[int] = []
    shown = ""
    for token in tokens:
        if token in stop_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
