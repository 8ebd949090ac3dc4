"""Run a written .tflite through the LiteRT interpreter, driven by the manifest's names alone.

`ai-edge-litert`'s Interpreter is the maintained successor of `tflite-runtime` (the same
interpreter); `tflite_runtime` is used when it is the only one installed. With
`xnnpack=False` the interpreter runs TFLite's reference builtin kernels
(BUILTIN_WITHOUT_DEFAULT_DELEGATES), the op set an NPU or GPU delegate falls back to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qwen_mobile.errors import QwenMobileError

PREFILL, DECODE = "prefill", "decode"


def interpreter_module():
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter
        except ImportError:
            raise QwenMobileError("the tflite backend needs ai-edge-litert (pip install ai-edge-litert)") from None
    return interpreter


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class TFLiteModel:
    """The artifact's two signatures and the state carried between calls.

    `feeds` maps each state output to the input it feeds on the next call (the manifest's
    `state_feeds`); the state starts zeroed, as the interpreter reports its shapes. A call
    at input_pos 0 starts a new sequence: the model itself zeroes its recurrent and conv
    state there, and the attention mask never reads a KV slot beyond the current position.
    """

    def __init__(self, path: Path, feeds: dict[str, str], max_context: int, xnnpack: bool = True):
        lib = interpreter_module()
        options = {} if xnnpack else {"experimental_op_resolver_type": lib.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
        try:
            # as many threads as torch (one per core); the interpreter's own default is one
            self.interpreter = lib.Interpreter(model_path=str(path), num_threads=torch.get_num_threads(), **options)
            self.prefill = self.interpreter.get_signature_runner(PREFILL)
            self.decode = self.interpreter.get_signature_runner(DECODE)
        except Exception as error:  # the interpreter raises ValueError or RuntimeError for unreadable models
            raise QwenMobileError(f"{path}: the LiteRT interpreter cannot load it ({first_line(error)})") from None
        self.path, self.feeds, self.max_context = Path(path), dict(feeds), max_context
        details = self.prefill.get_input_details()
        self.check_feeds(details)
        self.chunk = int(details["tokens"]["shape"][1])
        self.state = {
            name: np.zeros(details[name]["shape"], dtype=details[name]["dtype"]) for name in self.feeds.values()
        }

    def check_feeds(self, prefill_inputs: dict) -> None:
        """Every state_feeds entry names an output and an input both signatures have, and every
        input but the tokens, position and length is fed: a manifest cannot leave state unfed."""
        for signature in (self.prefill, self.decode):
            inputs, outputs = set(signature.get_input_details()), set(signature.get_output_details())
            fed = set(self.feeds.values())
            wrong = sorted((set(self.feeds) - outputs) | (fed - inputs) | (inputs - fed - {"tokens", "input_pos", "length"}))
            if wrong or "tokens" not in prefill_inputs:
                raise QwenMobileError(f"manifest.json: field state_feeds: does not match {self.path.name}'s signatures "
                                      f"(at {wrong[0] if wrong else 'tokens'})")

    def step(self, tokens, start: int) -> np.ndarray:
        """Feed tokens (a sequence of ids) at positions start.. and return the last one's logits [vocab]."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        length = len(tokens)
        if not 1 <= length <= self.chunk or start + length > self.max_context:
            raise QwenMobileError(
                f"{self.path.name}: {length} tokens at position {start} do not fit (1..{self.chunk} tokens per call, "
                f"max_context {self.max_context})"
            )
        position = np.array([start], dtype=np.int32)
        try:
            if length == 1:
                outputs = self.decode(tokens=tokens.reshape(1, 1), input_pos=position, **self.state)
            else:
                padded = np.zeros((1, self.chunk), dtype=np.int32)
                padded[0, :length] = tokens
                outputs = self.prefill(
                    tokens=padded, input_pos=position, length=np.array([length], dtype=np.int32), **self.state
                )
        except Exception as error:
            raise QwenMobileError(f"{self.path.name}: the LiteRT interpreter failed at input_pos {start} "
                                  f"({first_line(error)})") from None
        self.state = {name: outputs[output] for output, name in self.feeds.items()}
        return outputs["logits"].reshape(-1)
