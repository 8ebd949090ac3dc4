"""Run a written .tflite through LiteRT, driven by the manifest's names alone.

`ai-edge-litert`'s CompiledModel (the LiteRT API an Android app's CompiledModel mirrors) runs
both signatures with the CPU accelerator: XNNPACK, or with `xnnpack=False` TFLite's own builtin
kernels (CpuKernelMode.BUILTIN), the op set an NPU or GPU delegate falls back to. State lives
in TensorBuffers the runtime allocated, never in Python:

- a state input the manifest lists in `state_in_place` (the KV caches: lower.in_place_state)
  is bound as its own `_out` output too, so the slice a call writes lands in the cache
  buffer and nothing else moves;
- every other state output (the recurrent and conv states, rewritten whole by each call) is
  written into a second buffer, which the next call takes as its input (the buffers swap).

Only the tokens, the position and the logits cross into Python; the maps of buffers each call
binds are built once, for each signature and each side of the swap. The XNNPACK delegate packs
the weights into a weight cache shared by both signatures (without it, it packs every weight
once per signature), kept in a file (`weight_cache_path`) so that a later load maps the packed
weights instead of packing them again, or in memory only (IN_MEMORY) where the packed weights
are float32 and a file would be several times the artifact (backend.TFLiteBackend.open says which).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from qwen_mobile.bundle import sha256
from qwen_mobile.errors import QwenMobileError, first_line

PREFILL, DECODE = "prefill", "decode"
CACHE_ENV = "QWEN_MOBILE_CACHE"
# LiteRT's path for a weight cache kept in memory only (weight_cache.h kInMemoryCachePath): still one
# packed copy shared by both signatures, nothing written to disk
IN_MEMORY = ":memory"


def litert():
    try:
        from ai_edge_litert import compiled_model
    except ImportError:
        raise QwenMobileError("the tflite backend needs ai-edge-litert (pip install ai-edge-litert)") from None
    return compiled_model


def interpreter_module():
    """The classic Interpreter API (the manifest's signatures are read through it)."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        raise QwenMobileError("the tflite backend needs ai-edge-litert (pip install ai-edge-litert)") from None
    return interpreter


def weight_cache_path(artifact: Path) -> Path:
    """Where XNNPACK's packed weights for this exact file are kept: under $QWEN_MOBILE_CACHE
    (default ~/.cache/qwen-mobile), named by the file's SHA-256, as an app keeps them in its
    cache directory. Never inside the bundle, whose files the manifest's digests cover. The
    packed weights are found by the model's buffer indices, so a cache must never serve
    another file: hence the digest of the bytes themselves, not of a name or the manifest."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen-mobile")
    return root / "xnnpack" / f"{sha256(artifact)}.xnnpack_cache"


def verify_flatbuffer(path: Path) -> None:
    """Raise if the file is not a valid TFLite flatbuffer. CompiledModel.from_file does not check
    (ai-edge-litert 2.3.0 crashed the process on a half-truncated file); the classic interpreter
    verifies the buffer while it builds (0.2 s and 31 MiB, freed at once, at the 0.8B shape)."""
    lib = interpreter_module()
    lib.Interpreter(model_path=str(path), experimental_op_resolver_type=lib.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def thread_count() -> int:
    """One thread per core, as torch counts them (LiteRT's own default is 1)."""
    return torch.get_num_threads()


class TFLiteModel:
    """The artifact's two signatures and the state carried between calls.

    `feeds` maps each state output to the input it feeds on the next call (the manifest's
    `state_feeds`); `in_place` names the state inputs that may share their output's buffer
    (the manifest's `state_in_place`). The state starts zeroed. A call at input_pos 0 starts a
    new sequence: the model itself zeroes its recurrent and conv state there, and the
    attention mask never reads a KV slot beyond the current position.
    """

    def __init__(self, path: Path, feeds: dict[str, str], max_context: int, xnnpack: bool = True,
                 in_place=(), weight_cache: Path | str | None = None, threads: int | None = None):
        lib = litert()
        self.path, self.feeds, self.max_context = Path(path), dict(feeds), max_context
        self.threads = threads or thread_count()
        self.weight_cache = None
        cpu = {"num_threads": self.threads}
        if not xnnpack:
            cpu["kernel_mode"] = lib.CpuKernelMode.BUILTIN
        staged = None
        if xnnpack and weight_cache == IN_MEMORY:
            cpu["xnnpack_weight_cache_path"] = IN_MEMORY
        elif xnnpack:
            self.weight_cache = Path(weight_cache) if weight_cache else weight_cache_path(self.path)
            cpu["xnnpack_weight_cache_path"] = str(self.weight_cache)
            if not self.weight_cache.exists():  # built under a name of this process's, then moved into place
                self.weight_cache.parent.mkdir(parents=True, exist_ok=True)
                staged = self.weight_cache.with_name(f"{self.weight_cache.name}.{os.getpid()}.partial")
                cpu["xnnpack_weight_cache_path"] = str(staged)
        try:
            verify_flatbuffer(self.path)
            options = lib.Options(hardware_accelerators=lib.HardwareAccelerator.CPU, cpu_options=lib.CpuOptions(**cpu))
            self.model = lib.CompiledModel.from_file(str(self.path), options=options)
            signatures = self.model.get_signature_list()
            if set(signatures) != {PREFILL, DECODE}:
                raise ValueError(f"signatures {sorted(signatures)}, expected {PREFILL} and {DECODE}")
        except Exception as error:  # the wrapper raises ValueError or RuntimeError for unreadable models
            if staged is not None:
                staged.unlink(missing_ok=True)
            raise QwenMobileError(f"{path}: LiteRT cannot load it ({first_line(error)})") from None
        if staged is not None:
            if staged.exists():
                os.replace(staged, self.weight_cache)  # this process keeps its mapping of the same file
            else:
                self.weight_cache = None
        self.check_feeds(signatures)
        self.buffers = {name: self._buffers(name, signatures[name]) for name in (PREFILL, DECODE)}
        details = self.model.get_input_tensor_details(PREFILL)
        self.chunk = int(details["tokens"]["shape"][1])
        self.vocab = int(self.model.get_output_tensor_details(DECODE)["logits"]["shape"][-1])
        self.in_place = [name for name in in_place if name in self.feeds.values()]
        self.sides = sides = self._state(details), self._state(details)  # kept: the bindings hold their capsules
        for name in self.in_place:  # one buffer, both sides
            sides[1][name] = sides[0][name]
        # per signature, per side of the swap: (input buffers, output buffers), as the maps of capsules
        # CompiledModel.run_by_name would build on every call
        self.bindings = {
            signature: [self._binding(signature, sides[side], sides[1 - side]) for side in (0, 1)]
            for signature in (PREFILL, DECODE)
        }
        self.side = 0
        self.tokens = {DECODE: np.zeros((1, 1), np.int32), PREFILL: np.zeros((1, self.chunk), np.int32)}
        self.position, self.length = np.zeros(1, np.int32), np.zeros(1, np.int32)

    def _buffers(self, signature: str, names: dict) -> dict:
        inputs = {n: self.model.create_input_buffer_by_name(signature, n) for n in names["inputs"]
                  if n not in self.feeds.values()}
        return {"inputs": inputs, "logits": self.model.create_output_buffer_by_name(signature, "logits")}

    def _state(self, details: dict) -> dict:
        """A zeroed buffer for every state input (allocated by LiteRT for the decode signature's
        output of the same name, layout and size as the input it feeds)."""
        state = {}
        for output, name in self.feeds.items():
            buffer = self.model.create_output_buffer_by_name(DECODE, output)
            buffer.write(np.zeros(details[name]["shape"], dtype=details[name]["dtype"]))
            state[name] = buffer
        return state

    def _binding(self, signature: str, state: dict, written: dict) -> tuple[dict, dict]:
        buffers = self.buffers[signature]
        inputs = {**buffers["inputs"], **state}
        outputs = {"logits": buffers["logits"], **{output: written[name] for output, name in self.feeds.items()}}
        return ({name: buffer.capsule for name, buffer in inputs.items()},
                {name: buffer.capsule for name, buffer in outputs.items()})

    def check_feeds(self, signatures: dict) -> None:
        """Every state_feeds entry names an output and an input both signatures have, and every
        input but the tokens, position and length is fed: a manifest cannot leave state unfed."""
        fed = set(self.feeds.values())
        for names in signatures.values():
            inputs, outputs = set(names["inputs"]), set(names["outputs"])
            wrong = sorted((set(self.feeds) - outputs) | (fed - inputs) | (inputs - fed - {"tokens", "input_pos", "length"}))
            if wrong or "tokens" not in inputs:
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
        signature = DECODE if length == 1 else PREFILL
        inputs = self.buffers[signature]["inputs"]
        padded = self.tokens[signature]
        padded[0, :length] = tokens
        padded[0, length:] = 0
        inputs["tokens"].write(padded)
        if length > 1:
            self.length[0] = length
            inputs["length"].write(self.length)
        self.position[0] = start
        inputs["input_pos"].write(self.position)
        bound_inputs, bound_outputs = self.bindings[signature][self.side]
        try:
            self.model._model.RunByName(signature, bound_inputs, bound_outputs)
        except Exception as error:
            raise QwenMobileError(f"{self.path.name}: LiteRT failed at input_pos {start} ({first_line(error)})") from None
        self.side = 1 - self.side  # the state just written is the next call's input
        return self.buffers[signature]["logits"].read(self.vocab, np.float32)
