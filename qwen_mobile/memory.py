"""Memory: weights kept narrow at rest and widened to float32 where the eager model computes;
freed memory handed back between stages.

A checkpoint ships its matrices in bf16 (fp16 for some); the model computes in float32. Held
in float32 the 2B model is 7.3 GiB, twice its checkpoint, and 4B (15.7 GiB) or 9B (33.4 GiB)
would not fit this project's 24 GB machine beside the plan and the gate. Widening bf16 or fp16
to float32 is exact, so a model whose Linear and Embedding weights stay in the checkpoint's
dtype, and are widened a block at a time as it runs (`linear`), computes the same logits bit for
bit (tests/test_export_memory.py), and a decode step reads half the bytes. The plan's passes
compute from its integers the same way (`linear` dequantizes a block at a time, quant.eager), so
no dequantized copy of a weight is held either: at 9B that copy would be 16.7 GiB in fp16.

Only eager computation goes through this (the gate's references, `verify`); a lowering traces
the model and must see float32 weights or the plan's tensors, never `widened`.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.quant.plan import QuantizedWeight, QuantPlan, planned_modules

WIDEN_ELEMENTS = 1 << 20  # linear's block: 4 MiB in float32


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in float32 for a weight held in any float dtype or as a plan's integers, a block of
    WIDEN_ELEMENTS weights at a time: each block is widened (or dequantized) into one float32 buffer
    that stays in cache, so a decode step reads the narrow weight once (measured on this machine,
    one decode step through a 62080 x 2048 fp16 weight: 18 ms, against 27 ms for F.linear on the
    float32 weight and 148 ms for widening it whole first), and the plan's passes never hold a
    dequantized copy of a weight. Blocks of a float32 weight are read in place: the same sums
    whichever way the weight is held."""
    rows = max(1, WIDEN_ELEMENTS // weight.shape[1])
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    in_place = isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
    buffer = None if in_place else torch.empty(min(rows, weight.shape[0]), weight.shape[1])
    # several sequences (the gate's batched noise floor): one product per sequence, as each alone
    # would take it, so that batching changes no summation order in the linears
    sequences = x.unsqueeze(0) if x.dim() < 3 else x
    results = out.unsqueeze(0) if x.dim() < 3 else out
    for start in range(0, weight.shape[0], rows):
        span = slice(start, start + rows)
        if in_place:
            block = weight[span]
        elif isinstance(weight, QuantizedWeight):
            block = weight.dequantize_rows_into(span, buffer)
        else:
            block = buffer[: min(rows, weight.shape[0] - start)].copy_(weight[span])
        bias_rows = None if bias is None else bias[span]
        for sequence, result in zip(sequences, results):
            result[..., span] = F.linear(sequence, block, bias_rows)
    return out


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _widen_rows(module: nn.Module, args, output):
    # a lookup copies rows: widening the rows looked up is the same as looking them up widened
    return output.float() if output.dtype != torch.float32 else output


@contextlib.contextmanager
def widened(model: nn.Module):
    """Inside the block every Linear computes through `linear` (whatever dtype its weight is held
    in), unless a forward of its own is set on it already (quant.eager.dequantized's, which call
    `linear` too), and every Embedding returns float32 rows."""
    handles, linears = [], []
    try:
        for module in planned_modules(model).values():
            if isinstance(module, nn.Embedding):
                handles.append(module.register_forward_hook(_widen_rows))
            elif "forward" not in vars(module):
                module.forward = types.MethodType(_linear_forward, module)
                linears.append(module)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module in linears:
            vars(module).pop("forward", None)


def widen_unplanned(model: nn.Module, plan: QuantPlan) -> None:
    """The Linear weights `plan` leaves in float (FLOAT_LINEARS; every one for a float scheme) in
    float32 for good: a lowering reads them from the model, which must hold them as it computes them."""
    for name, module in planned_modules(model).items():
        if name not in plan.weights and module.weight.dtype != torch.float32:
            module.weight = nn.Parameter(module.weight.float(), requires_grad=False)


def return_freed_memory() -> None:
    """Free what a stage left in reference cycles, then hand the heap glibc keeps back to the
    system (that part a no-op without glibc). A converter's graphs (torch.fx, ExecuTorch's and
    coremltools' programs) refer to each other, so only the cycle collector frees them, whenever
    it next runs."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return
