"""Qwen35 -> a stateful, multifunction Core ML ML Program (iOS 18 / macOS 15).

Two functions share one weight blob:
- `prefill(tokens int32[1, C], input_pos int32[1], length int32[1]) -> logits [1, vocab]`:
  a fixed chunk of C tokens of which the first `length` are real; the logits are those
  of position length-1. Padded tokens never touch the state: the core model's `length`
  (qwen_mobile/models/qwen3_5.py) keeps them out of it.
- `decode(tokens int32[1, 1], input_pos int32[1]) -> logits [1, vocab]`: one token.

Conv, recurrent and KV state are Core ML states (`ct.StateType`), updated in place by
the program. Core ML states are fp16 only, so a state kept at fp32 precision (all of them
under fp32 compute) is a pair of fp16 states, hi + lo / 2048 (see stored_parts); a call at
input_pos 0 starts a new sequence (the core model zeroes the conv and recurrent states
there; KV slots beyond a query's position are masked). All shapes are static: both
functions pass the core a `length` (decode: 1), so KV caches are written by the core's
one-hot form rather than a slice_update at a dynamic offset, and a prefill chunk never
writes past the cache.

With a quantized plan (int8, int4), each planned weight is stored as the plan's own
integers, scales and zero points in a constexpr_blockwise_shift_scale op (compress.py);
the program computes in the scheme's compute dtype on the decompressed weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.memory import return_freed_memory
from qwen_mobile.models.qwen3_5 import Qwen35, StateTensor, state_from_tensors, state_tensors, state_to_tensors
from qwen_mobile.quant.plan import QuantPlan, placeholder_weights, replaced_weights

from . import composite, compress

FUNCTIONS = ("prefill", "decode")
DEFAULT_FUNCTION = "decode"


@torch.library.custom_op("qwen_mobile_coreml::pair_join", mutates_args=())
def pair_join(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """A state held as an fp16 hi/lo pair, as fp32. Its own op so that the converter can keep
    it in fp32 inside an fp16 program (composite.build_pair_join)."""
    return high.float() + low.float() * (1.0 / composite.LO_SCALE)


@torch.library.custom_op("qwen_mobile_coreml::pair_split", mutates_args=())
def pair_split(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (hi = fp16-representable part, lo = the rest x LO_SCALE), both fp32 (composite.build_pair_split)."""
    high = value.float().to(torch.float16).float()
    return high, (value.float() - high) * composite.LO_SCALE


def stored_parts(tensor: StateTensor, split: frozenset[str]) -> tuple[str, ...]:
    """The suffixes a state tensor is stored under: ("_hi", "_lo") for a kind kept at fp32 precision.

    Core ML states are fp16 only (coremltools 9.0 refuses any other dtype, for iOS 18 and
    iOS 26 targets alike). A kind in `split` keeps fp32 precision as two fp16 states,
    `_hi` = fp16(x) and `_lo` = fp16((x - hi) * LO_SCALE), value = hi + lo / LO_SCALE: the same
    bytes as one fp32 tensor, and 22 significant bits instead of 11 (see composite.LO_SCALE)."""
    return ("_hi", "_lo") if tensor.field in split else ("",)


def stored_states(config, max_context: int, split: frozenset[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(Core ML state name, shape) for every state the program holds, in order."""
    return [(tensor.name + part, tensor.shape) for tensor in state_tensors(config, max_context)
            for part in stored_parts(tensor, split)]


class CoreMLQwen35(nn.Module):
    """The core model driven for Core ML: state in registered buffers assigned in place (which
    coremltools turns into states), a fixed chunk of `size` tokens with its `length`."""

    def __init__(self, model: Qwen35, max_context: int, size: int, split: frozenset[str]):
        super().__init__()
        self.model, self.size, self.split = model, size, split
        self.tensors = state_tensors(model.config, max_context)
        for name, shape in stored_states(model.config, max_context, split):
            self.register_buffer(name, torch.zeros(shape))

    def read(self, tensor: StateTensor) -> torch.Tensor:
        parts = [getattr(self, tensor.name + part) for part in stored_parts(tensor, self.split)]
        return pair_join(*parts) if len(parts) == 2 else parts[0]

    def write(self, tensor: StateTensor, value: torch.Tensor) -> None:
        """Slice assignment of the whole buffer: coremltools' form of an in-place state update."""
        parts = pair_split(value) if tensor.field in self.split else (value,)
        for part, part_value in zip(stored_parts(tensor, self.split), parts):
            getattr(self, tensor.name + part)[:] = part_value

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, length: torch.Tensor | None = None):
        if length is None:  # decode: the one token is real
            length = torch.ones(1, dtype=torch.int32)
        state = state_from_tensors(self.model.config, {t.name: self.read(t) for t in self.tensors})
        logits, new_state = self.model(tokens, input_pos, state, length=length)
        new_tensors = state_to_tensors(new_state)
        for tensor in self.tensors:
            self.write(tensor, new_tensors[tensor.name])
        return logits


@dataclass
class Lowered:
    """What the export wrote and measured, for the manifest."""

    seconds: float = 0.0
    operations: dict[str, dict[str, int]] = field(default_factory=dict)  # function -> op type -> count
    encoded: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # function -> planned weight -> constexpr ops


def split_kinds(compute_dtype: str, recurrent_dtype: str) -> frozenset[str]:
    """The state kinds held as fp16 hi/lo pairs: all of them when computing in fp32, the
    recurrent state alone when computing in fp16 with an fp32 recurrent state."""
    if compute_dtype == "float32":
        return frozenset(("conv", "recurrent", "keys", "values"))
    return frozenset(("recurrent",)) if recurrent_dtype == "float32" else frozenset()


def trace(model: Qwen35, max_context: int, chunk: int | None, split: frozenset[str]) -> torch.jit.ScriptModule:
    size = chunk or 1
    wrapper = CoreMLQwen35(model, max_context, size, split).eval()
    example = (torch.zeros(1, size, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    if chunk is not None:
        example = (*example, torch.full((1,), size, dtype=torch.int32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about buffers assigned in place
        return torch.jit.trace(wrapper, example, check_trace=False)


def convert_function(
    model: Qwen35, max_context: int, chunk: int | None, compute_dtype: str, split: frozenset[str], plan: QuantPlan,
    placeholders: dict[str, torch.Tensor],
):
    """One function (prefill when `chunk` is given, else decode) as an ML Program MLModel, with
    the plan's weights encoded as constexpr_blockwise_shift_scale (compress.py), and what
    was encoded: planned weight -> constexpr op names. `model` holds `placeholders` in place of
    the planned weights."""
    import coremltools as ct

    composite.register()
    traced = trace(model, max_context, chunk, split)
    size = chunk or 1
    inputs = [ct.TensorType(name="tokens", shape=(1, size), dtype=np.int32),
              ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32)]
    if chunk is not None:
        inputs.append(ct.TensorType(name="length", shape=(1,), dtype=np.int32))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
              for name, shape in stored_states(model.config, max_context, split)]
    if compute_dtype == "float16":
        # everything in fp16 except the recurrence's composite (its ops carry GDR_TAG)
        precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: composite.GDR_TAG not in op.name)
    else:
        precision = ct.precision.FLOAT32
    with quiet(), composite.exact_reciprocal(), compress.pipeline_with(plan, placeholders) as (pipeline, encoder):
        mlmodel = ct.convert(
            traced, inputs=inputs, states=states,
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
            convert_to="mlprogram", skip_model_load=True, pass_pipeline=pipeline,
        )
    return mlmodel, ({} if encoder is None else encoder.encoded)


def numpy_dtype(name: str):
    return {"float32": np.float32, "float16": np.float16}[name]


# where coremltools 9.0 makes its progress bars: (module, the name it calls tqdm by)
PROGRESS_BARS = (("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
                 ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"))


@contextlib.contextmanager
def quiet():
    """coremltools reports progress bars and untested-version notes on stderr; keep the CLI's output
    clean (its bars are tqdm's, which it offers no switch for: each is made with disable=True here)."""
    import importlib
    import logging
    from functools import partial

    from tqdm import tqdm

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    modules = [(importlib.import_module(module), name) for module, name in PROGRESS_BARS]
    bars = [getattr(module, name) for module, name in modules]
    try:
        for module, name in modules:
            setattr(module, name, partial(tqdm, disable=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for (module, name), bar in zip(modules, bars):
            setattr(module, name, bar)
        logger.setLevel(level)


def weight_key(array: np.ndarray) -> tuple:
    # hashed through a view of the array's own bytes: a const of the program is not copied to be looked up
    return array.shape, array.dtype.str, hashlib.sha1(np.ascontiguousarray(array).data).hexdigest()


@contextlib.contextmanager
def exact_shared_weights():
    """save_multifunction finds the constants the functions share with coremltools' const_deduplication
    pass, which compares each candidate pair with np.allclose: both widened to float64, 5.9 GiB
    over the rest of the merge at 0.8B (the embedding's integers alone are 254 M values). Inside
    the block the pass pairs constants by a digest of their bytes instead: exact equality, which
    is what two functions converted from one model's weights share (what coremltools' own
    comparison also finds there, without the float64 copies). Restored afterwards (it is global)."""
    from coremltools.converters.mil.mil import ListVar
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    deduplication = type(PASS_REGISTRY["common::const_deduplication"])
    original = deduplication.__dict__["find_constants"]

    def find_constants(blocks) -> dict:
        """The pass's own contract: first constant of each value -> the later ones equal to it."""
        first_of, later = {}, {}
        for block in blocks:
            for op in block.operations:
                if op.op_type != "const" or isinstance(op.outputs[0], ListVar):
                    continue
                var = op.outputs[0]
                if not deduplication.should_be_deduplicated(var.val):
                    continue
                key = (getattr(op, "weight_key", None), var.dtype, weight_key(np.asarray(var.val)))
                first = first_of.setdefault(key, var)
                later.setdefault(first, [])
                if first is not var:
                    later[first].append(var)
        return later

    deduplication.find_constants = staticmethod(find_constants)
    try:
        yield
    finally:
        deduplication.find_constants = original


def lower(model: Qwen35, plan: QuantPlan, out: Path, max_context: int, chunk: int, recurrent_dtype: str) -> Lowered:
    """Convert both functions and save them as one multifunction mlpackage at `out`. The planned
    weights' values are never read: each is traced as a placeholder (quant.plan.placeholder_weights)
    that the encoding pass replaces with the plan's integers, so they may be released (meta
    tensors) when this is called; the model's own weights come back afterwards."""
    import coremltools as ct

    compute_dtype = plan.scheme.compute_dtype
    started = time.perf_counter()
    lowered = Lowered()
    placeholders = placeholder_weights(model, plan)
    with tempfile.TemporaryDirectory(prefix="coreml-functions-") as scratch, replaced_weights(model, placeholders):
        if any(parameter.dtype != torch.float32 for parameter in model.parameters()):
            raise QwenMobileError("the coreml export needs the model loaded in float32")
        descriptor = ct.utils.MultiFunctionDescriptor()
        for function, size in (("prefill", chunk), ("decode", None)):
            mlmodel, lowered.encoded[function] = convert_function(
                model, max_context, size, compute_dtype, split_kinds(compute_dtype, recurrent_dtype), plan,
                placeholders,
            )
            path = Path(scratch) / f"{function}.mlpackage"
            mlmodel.save(str(path))
            del mlmodel
            # coremltools' MIL programs: their ops, blocks and values refer to each other, so only
            # the cycle collector frees them (the merge's two left 3.7 GB resident at 2B, 1.7 at 0.8B)
            return_freed_memory()
            descriptor.add_function(str(path), src_function_name="main", target_function_name=function)
        descriptor.default_function_name = DEFAULT_FUNCTION
        with quiet(), exact_shared_weights():
            ct.utils.save_multifunction(descriptor, str(out))
        return_freed_memory()
    lowered.seconds = time.perf_counter() - started
    return lowered
