"""Drive a written model.mlpackage: through the CPU emulator, or Core ML itself on macOS.

On macOS (and when coremltools' Core ML bindings load) `open_session` uses the real
runtime: one MLModel per function, with one state object (make_state) shared by both
functions, since they declare identical states. Everywhere else, or with
QWEN_MOBILE_COREML_EMULATOR=1, it runs the emulator on the same files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from qwen_mobile.errors import QwenMobileError

from . import emulator

FORCE_EMULATOR = "QWEN_MOBILE_COREML_EMULATOR"


def use_core_ml() -> bool:
    return sys.platform == "darwin" and os.environ.get(FORCE_EMULATOR) != "1"


class EmulatorSession:
    """The program and its states, as an app holds them between calls."""

    runtime = "emulator"

    def __init__(self, package: Path):
        self.package = emulator.Package(package)
        self.package.check_supported()
        self.state = self.package.new_state()

    def call(self, function: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.package.run(function, inputs, self.state)["logits"]


class CoreMLSession:
    """The same calls through Core ML (macOS only; not exercised on Linux)."""

    runtime = "coreml"

    def __init__(self, package: Path):
        import coremltools as ct

        try:
            self.models = {
                function: ct.models.MLModel(str(package), function_name=function, compute_units=ct.ComputeUnit.ALL)
                for function in ("prefill", "decode")
            }
        except Exception as error:
            raise QwenMobileError(f"{package}: Core ML cannot load it ({error})") from None
        self.state = self.models["decode"].make_state()

    def call(self, function: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.models[function].predict(inputs, state=self.state)["logits"]
        except Exception as error:
            raise QwenMobileError(f"Core ML failed in {function} ({error})") from None


def open_session(package: Path):
    package = Path(package)
    if not package.is_dir():
        raise QwenMobileError(f"{package}: not found (a .mlpackage is a directory)")
    return CoreMLSession(package) if use_core_ml() else EmulatorSession(package)


def step(session, tokens: list[int], start: int, chunk: int) -> torch.Tensor:
    """Feed tokens at positions start.. (one token: decode; up to `chunk`: a padded prefill)
    and return the last position's logits [vocab] (float32)."""
    count = len(tokens)
    position = np.array([start], dtype=np.int32)
    if count == 1:
        logits = session.call("decode", {"tokens": np.array([tokens], dtype=np.int32), "input_pos": position})
    elif 1 < count <= chunk:
        padded = np.zeros((1, chunk), dtype=np.int32)
        padded[0, :count] = tokens
        logits = session.call("prefill", {"tokens": padded, "input_pos": position,
                                          "length": np.array([count], dtype=np.int32)})
    else:
        raise QwenMobileError(f"a call takes 1 to {chunk} tokens, got {count}")
    return torch.from_numpy(np.asarray(logits, dtype=np.float32).reshape(-1).copy())
