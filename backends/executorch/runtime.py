"""Run a written `.pte` through the ExecuTorch runtime, as an app would."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_mobile.errors import QwenMobileError, first_line


def register_llama_kernels() -> None:
    """ExecuTorch's LLM custom ops library (llama::gated_delta_rule among them) and its
    quantized kernels (quantized_decomposed::embedding_4bit and kin): importing them
    registers the kernels with the runtime, which the program needs to load. The Android
    and iOS runtime libraries link the same kernels."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def load_forward(pte: Path):
    """The program's `forward` method, with the llama:: kernels registered.

    Each call loads the program afresh, so its state buffers start zeroed; successive
    `execute` calls on the returned method share that state.
    """
    from executorch.runtime import Runtime

    register_llama_kernels()
    try:
        program = Runtime.get().load_program(Path(pte))
        method = program.load_method("forward")
    except Exception as error:  # the runtime raises RuntimeError or ValueError for unreadable programs
        raise QwenMobileError(f"{pte}: the ExecuTorch runtime cannot load it ({first_line(error)})") from None
    method.program = program  # the method runs on the program's memory: keep it alive as long as the method
    return method


def step(method, tokens: torch.Tensor, input_pos: int) -> torch.Tensor:
    """Feed tokens [1, T] at positions input_pos.. and return the last position's logits [1, vocab]."""
    try:
        (logits,) = method.execute((tokens, torch.tensor([input_pos], dtype=torch.long)))
    except Exception as error:
        raise QwenMobileError(f"the ExecuTorch runtime failed at input_pos {input_pos} ({first_line(error)})") from None
    return logits


def thread_count() -> int | None:
    """The runtime's thread pool size (None where the bindings do not say)."""
    try:
        from executorch.extension.pybindings import portable_lib

        return portable_lib._threadpool_get_thread_count()
    except (ImportError, AttributeError):
        return None
