"""GPTQ plans: the same integers-and-scales plan as round-to-nearest, with the integers chosen
to cancel each other's error on the calibration text (Frantar et al., arXiv:2210.17323).

For one linear y = x W^T with inputs X seen on calibration text, GPTQ picks integers Q on a
fixed grid to minimise ||X W^T - X (Q * scale)^T||^2. It goes over the input columns one at
a time: rounds a column, then moves the columns not yet rounded to absorb that column's
error, weighted by the inverse of the Hessian H = X^T X (kept as its upper Cholesky factor,
so every step is one outer product).

What is fixed before the update runs, so the plan stays what every backend encodes:
- the scales, decided for every group before any column moves: by default searched
  (`searched_scale`: round-to-nearest's scale or a smaller one that clips the largest
  weights, whichever rounds the group with the least input-weighted error), else
  round-to-nearest's own; either way rounded UP to a bf16 value by plan.bf16_ceil. Integers
  outside the range after an update are clamped;
- zero points 0 (symmetric), int8 storage, integers in the signed range of the weight's bits,
  [-127, 127] for 8-bit weights under dynamic activations (plan.round_to_nearest says why);
- which weights, at which bits and group size, with which activations: `weight_specs`
  mirrors plan.make_plan (a test holds the two together).

Why not a maintained implementation: torchao 0.18's `torchao.prototype.gptq.gptq_quantize`
asserts a CUDA device and its int4 path computes its own asymmetric scales and zero points
(mslk's int4_row_quantize_zp); llm-compressor's `quantize_weight` computes scales with its
own min-max observer (float, not our bf16 ceilings) and installing it downgrades transformers
below what this project needs (5.17 against >= 5.23); GPTQModel targets GPUs and its own
packing. None takes a plan's scales as given, so the update (about 40 lines) is written here.

How the Hessians are collected: layer by layer. The calibration samples' hidden states at a
layer boundary are kept (samples x tokens x hidden floats: 268 MB at the 0.8B shape with 128
samples of 512 tokens), the layer runs on them with hooks on its planned nn.Linear inputs,
each Hessian is accumulated as X^T X (never the activations themselves), the layer's weights
are decided, and the layer's outputs become the next layer's inputs: computed with float
weights (the default) or with the plan's quantized weights (`sequential`: later layers see
what they will see on the phone; it measured no better on the embedded model and costs a
second pass per layer). Only one layer's Hessians exist at a time, and the logits are never
computed (at 0.8B they would cost as much as a third of the model).

The embedding lookup has no input Hessian. A tied embedding and lm_head are one tensor: by
default it is GPTQ'd as the lm_head, on the final norm's outputs, with the Hessian
normalised and an identity added (`lookup_weight`) so each row's plain rounding error, which
is what the lookup sees, counts too; untied, the embedding rounds to nearest (on searched
scales) and the lm_head is GPTQ'd like any linear.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwen_mobile import progress
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import (
    FLOAT_LINEARS,
    QuantizedWeight,
    QuantPlan,
    QuantScheme,
    bf16_ceil,
    bits_and_group,
    planned_modules,
    round_to_nearest,
)

GPTQ_METHOD = "gptq_symmetric"
RTN_METHOD = "round_to_nearest_symmetric"
DEFAULT_DAMP = 0.01  # of the Hessian's mean diagonal, added to its diagonal
BLOCK = 128  # columns updated one by one before the rest of the weight is updated in one matmul
TIED_HEAD = "lm_head.weight"
EMBEDDING = "embed_tokens.weight"


# --- what each weight becomes --------------------------------------------------------------


@dataclass(frozen=True)
class WeightSpec:
    """How one planned weight is quantized: what plan.make_plan decides for it."""

    name: str
    bits: int
    group_size: int
    activations: str | None
    narrow: bool  # integers in [-127, 127] instead of [-128, 127]
    tied_to: str | None = None  # a tied lm_head: the embedding's integers


def weight_specs(
    model: nn.Module, scheme: QuantScheme, keep_8bit: Sequence[str] = ()
) -> tuple[dict[str, WeightSpec], list[str]]:
    """(name -> spec for every weight the scheme quantizes, the linears kept float), as
    plan.make_plan decides them, with the weights named in `keep_8bit` at 8 bits, one scale
    per output channel. A tied embedding and lm_head are one tensor: naming either keeps both."""
    if scheme.is_float:
        return {}, []
    modules = planned_modules(model)
    unknown = sorted(set(keep_8bit) - set(modules))
    if unknown:
        raise ValueError(f"keep_8bit names no planned weight: {', '.join(unknown)}")
    tied = TIED_HEAD in modules and modules[TIED_HEAD].weight is model.embed_tokens.weight
    keep = set(keep_8bit)
    if tied and keep & {EMBEDDING, TIED_HEAD}:
        keep |= {EMBEDDING, TIED_HEAD}
    specs, kept_float = {}, []
    for name, module in modules.items():
        if name.rsplit(".", 2)[-2] in FLOAT_LINEARS:
            kept_float.append(name)
            continue
        columns = module.weight.shape[1]
        bits, group = (8, columns) if name in keep else bits_and_group(scheme, name, columns)
        activations = scheme.activations if isinstance(module, nn.Linear) else None
        narrow = bits == 8 and scheme.activations is not None
        specs[name] = WeightSpec(name, bits, group, activations, narrow, EMBEDDING if tied and name == TIED_HEAD else None)
    return specs, kept_float


def rtn_weight(weight: torch.Tensor, spec: WeightSpec) -> QuantizedWeight:
    return round_to_nearest(weight, spec.bits, spec.group_size, spec.activations, spec.narrow)


def rounded_weight(weight: torch.Tensor, spec: WeightSpec, scale: torch.Tensor) -> QuantizedWeight:
    """Round to nearest on given scales (symmetric): quantize_affine's arithmetic."""
    qmin, qmax = -(1 << (spec.bits - 1)) + int(spec.narrow), (1 << (spec.bits - 1)) - 1
    step = scale.repeat_interleave(spec.group_size, dim=1)
    qdata = torch.clamp(torch.round(weight.detach().float() * (1.0 / step)), qmin, qmax).to(torch.int8)
    return QuantizedWeight(qdata, scale, torch.zeros_like(scale, dtype=torch.int8), spec.bits, spec.group_size,
                           spec.activations)


def share_integers(weight: QuantizedWeight, activations: str | None) -> QuantizedWeight:
    """A tied lm_head's entry: the embedding's own integers, scales and zero points."""
    if weight.activations == activations:
        return weight
    return QuantizedWeight(weight.qdata, weight.scale, weight.zero_point, weight.bits, weight.group_size, activations)


def rtn_plan(model: nn.Module, scheme: QuantScheme, keep_8bit: Sequence[str] = ()) -> QuantPlan:
    """plan.make_plan with `keep_8bit` weights at 8 bits per channel (make_plan itself when empty)."""
    specs, kept_float = weight_specs(model, scheme, keep_8bit)
    modules = planned_modules(model)
    plan = QuantPlan(scheme, {}, kept_float)
    for name, spec in specs.items():
        if spec.tied_to:
            plan.weights[name] = share_integers(plan.weights[spec.tied_to], spec.activations)
        else:
            plan.weights[name] = rtn_weight(modules[name].weight, spec)
    return plan


# --- the GPTQ update on one weight ---------------------------------------------------------


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of (H + damping)^-1, and the damping fraction that made H
    positive definite: `damp` first, ten times more each time Cholesky fails."""
    mean_diagonal = hessian.diagonal().mean().item()
    fraction = damp
    for _ in range(6):
        damped = hessian.clone()
        damped.diagonal().add_(fraction * mean_diagonal)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper, fraction
        fraction *= 10
    raise ValueError(f"the Hessian stays singular with damping {fraction / 10:g} of its mean diagonal")


SCALE_SHRINK = tuple(1.0 - 0.02 * i for i in range(16))  # 1.0 down to 0.70: the scales searched


def searched_scale(weight: torch.Tensor, spec: WeightSpec, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per group, the scale among round-to-nearest's (max |w| over half the range) times each
    SCALE_SHRINK factor, each rounded up to bf16 as plan.bf16_ceil does, whose rounding error
    costs least: sum(importance x (w - q x scale)^2), `importance` [columns] weighting each
    input column (a linear's Hessian diagonal: that input's energy on the calibration text),
    equal weights when None. A smaller scale clips the group's largest weights but rounds the
    rest more finely. (Weighting by the group's whole Hessian block instead measured worse
    after GPTQ on the embedded model: KL 0.0142 against 0.0137.)"""
    rtn = rtn_weight(weight, spec).scale
    qmin, qmax = -(1 << (spec.bits - 1)) + int(spec.narrow), (1 << (spec.bits - 1)) - 1
    rows, columns = weight.shape
    groups, size = columns // spec.group_size, spec.group_size
    w = weight.detach().float().reshape(rows, groups, size)
    weights = torch.ones(columns) if importance is None else importance.float().clamp(min=0)
    weights = weights.reshape(1, groups, size)
    best, best_cost = rtn, None
    for shrink in SCALE_SHRINK:
        scale = rtn if shrink == 1.0 else bf16_ceil(rtn * shrink)
        error = w - torch.clamp(torch.round(w * (1.0 / scale)[..., None]), qmin, qmax) * scale[..., None]
        cost = (weights * error * error).sum(-1)
        if best_cost is None:
            best_cost = cost
            continue
        better = cost < best_cost
        best, best_cost = torch.where(better, scale, best), torch.where(better, cost, best_cost)
    return best


def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightSpec,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    block: int = BLOCK,
    search_scales: bool = False,
) -> QuantizedWeight:
    """GPTQ of one weight [rows, columns] with input Hessian [columns, columns] (X^T X, any
    positive multiple), on round-to-nearest's scales.

    `act_order` rounds the columns with the largest Hessian diagonal (the inputs with the
    most energy) first, so their error can still be absorbed by many columns; each column
    keeps the scale of its own group (scales were fixed beforehand), so no column permutation
    reaches the plan."""
    if search_scales:
        scale = searched_scale(weight, spec, hessian.diagonal())
    else:
        scale = rtn_weight(weight, spec).scale
    rows, columns = weight.shape
    qmin, qmax = -(1 << (spec.bits - 1)) + int(spec.narrow), (1 << (spec.bits - 1)) - 1
    hessian = hessian.detach().float().clone()
    work = weight.detach().float().clone()
    dead = hessian.diagonal() == 0  # inputs that were always zero: their columns round to nearest
    hessian[dead, dead] = 1.0
    order = (
        torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order else torch.arange(columns)
    )
    hessian = hessian[order][:, order]
    # columns as rows ([columns, rows], each column contiguous): on a CPU every per-column read,
    # write and rank-1 update below then walks memory in order (3x faster at the 0.8B shapes)
    work = work[:, order].T.contiguous()
    step = scale.repeat_interleave(spec.group_size, dim=1)[:, order].T.contiguous()
    inverse_step = 1.0 / step  # quantize_affine multiplies by the reciprocal: the same arithmetic as RTN
    hinv, _ = _upper_cholesky_of_inverse(hessian, damp)
    qdata = torch.empty(columns, rows, dtype=torch.int8)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk = work[start:end].clone()
        errors = torch.empty_like(chunk)
        local = hinv[start:end, start:end]
        for i in range(end - start):
            column = chunk[i]
            q = torch.clamp(torch.round(column * inverse_step[start + i]), qmin, qmax)
            qdata[start + i] = q.to(torch.int8)
            error = (column - q * step[start + i]) / local[i, i]
            chunk[i:] -= local[i, i:, None] * error[None, :]
            errors[i] = error
        work[end:] -= hinv[start:end, end:].T @ errors
    qdata = qdata.T
    qdata = qdata[:, torch.argsort(order)].contiguous()
    zero_point = torch.zeros_like(scale, dtype=torch.int8)
    return QuantizedWeight(qdata, scale, zero_point, spec.bits, spec.group_size, spec.activations)


# --- running the model layer by layer -------------------------------------------------------


def fresh_state(model: Qwen35, max_context: int):
    """A new sequence's state: the one place calibration makes one."""
    return model.init_state(max_context)


def calibration_logits(model: Qwen35, tokens: Sequence[int]) -> torch.Tensor:
    """The model's logits [T, vocab] at every position of one sample from position 0."""
    ids = torch.tensor([list(tokens)])
    logits, _ = model(ids, torch.tensor([0]), fresh_state(model, ids.shape[1]), all_positions=True)
    return logits[0]


class HessianCollector:
    """Forward pre-hooks on linears that accumulate X^T X of their inputs (each call's product
    in float32, the running sums in float64, so a long calibration set adds up without drift). Linears fed the very same tensor (q/k/v, the
    DeltaNet input projections, gate/up) share one accumulator."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # linear -> the linear whose accumulator it shares
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            if self._last is not None and self._last[0] is x:
                self.owner[name] = self._last[1]
                return
            key = self.owner.setdefault(name, name)
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if key not in self.sums:
                self.sums[key] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
                self.rows[key] = 0
            # one sample's X^T X in float32 (4x faster than float64 at 0.8B), summed in float64
            self.sums[key] += (flat.T @ flat).double()
            self.rows[key] += flat.shape[0]
            self._last = (x, key)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        key = self.owner[name]
        return (self.sums[key] / max(self.rows[key], 1)).float()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


@contextlib.contextmanager
def collecting(modules: dict[str, nn.Module]) -> Iterator[HessianCollector]:
    collector = HessianCollector(modules)
    try:
        yield collector
    finally:
        collector.close()


class LayerwiseRunner:
    """Qwen35.forward taken apart at the layer boundaries, for samples that all start at
    position 0: the hidden states of every sample at one boundary are kept, and each layer
    runs on them when asked. A test holds this to the model's own forward."""

    def __init__(self, model: Qwen35, samples: Sequence[Sequence[int]]):
        self.model = model
        self.samples = [torch.tensor([list(s)]) for s in samples]
        self.hidden = [model.embed_tokens(ids) for ids in self.samples]
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _rotary(self, length: int, dtype: torch.dtype):
        if length not in self._rope:
            positions = torch.arange(length)
            self._rope[length] = tuple(t.to(dtype) for t in self.model.rotary(positions))
        return self._rope[length]

    def run_layer(self, index: int) -> list[torch.Tensor]:
        """Layer `index` on the kept hidden states; returns its outputs (does not advance)."""
        return [self.run_one(index, x) for x in self.hidden]

    def run_one(self, index: int, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        cos, sin = self._rotary(length, x.dtype)
        state = fresh_state(self.model, length)[index]
        out, _ = self.model.layers[index](x, cos, sin, torch.arange(length), state)
        return out

    def advance(self, outputs: list[torch.Tensor]) -> None:
        self.hidden = outputs

    def final_normed(self) -> list[torch.Tensor]:
        """The lm_head's inputs: the final norm of the last layer's outputs."""
        return [self.model.norm(x) for x in self.hidden]


# --- a whole plan ---------------------------------------------------------------------------


@dataclass
class GptqOptions:
    """Each default is what measured best on the embedded model, int4 g32, calibrated on 64 x 512
    tokens of the training split and measured on other training-split text (mean KL vs float;
    RTN: 0.0208), never on the held-out text (docs/quantization-calibration.md has the table)."""

    damp: float = DEFAULT_DAMP  # 0.1 and 0.001 measured the same (KL 0.0132, 0.0136 against 0.0137)
    act_order: bool = True  # off: KL 0.0134 against 0.0127 (with every other default)
    # later layers calibrated on the outputs of already-quantized ones: KL 0.0129 against 0.0127
    # without, at twice the forward passes, so off
    sequential: bool = False
    # a tied embedding/lm_head: "gptq" on the lm_head's Hessian (KL 0.0148 against 0.0162 for "rtn")
    tied_head: str = "gptq"
    # scales by searched_scale instead of round-to-nearest's: KL 0.0142 against 0.0162
    search_scales: bool = True
    # a tied head by GPTQ: H / mean(diag H) + lookup_weight x I, so the rows also serve the
    # embedding lookups (whose error is plain |w - q x scale|^2): KL 0.0127 at 1, 0.0134 at 0
    lookup_weight: float = 1.0

    def to_manifest(self) -> dict:
        return {"damp": self.damp, "act_order": self.act_order, "sequential": self.sequential,
                "tied_head": self.tied_head, "search_scales": self.search_scales,
                "lookup_weight": self.lookup_weight, "block": BLOCK}


def _layer_groups(specs: dict[str, WeightSpec], index: int) -> list[str]:
    prefix = f"layers.{index}."
    return [name for name in specs if name.startswith(prefix)]


@torch.no_grad()
def gptq_plan(
    model: Qwen35,
    scheme: QuantScheme,
    samples: Sequence[Sequence[int]],
    keep_8bit: Sequence[str] = (),
    options: GptqOptions | None = None,
) -> QuantPlan:
    """A GPTQ plan of `model` under `scheme` (see the module doc), calibrated on `samples`
    (token id lists, e.g. from calibrate.load_calibration), with the `keep_8bit` weights at 8
    bits per channel (GPTQ'd too). A tied embedding and lm_head share one QuantizedWeight's
    integers: GPTQ'd as the lm_head (options.tied_head "gptq", the default) or rounded to
    nearest as the embedding ("rtn")."""
    options = options or GptqOptions()
    if options.tied_head not in ("rtn", "gptq"):
        raise ValueError(f"tied_head {options.tied_head!r}: choose rtn or gptq")
    if not samples:
        raise ValueError("GPTQ needs calibration samples; none were given")
    specs, kept_float = weight_specs(model, scheme, keep_8bit)
    plan = QuantPlan(scheme, {}, kept_float, method=GPTQ_METHOD)
    if not specs:
        return plan
    modules = planned_modules(model)
    head_by_gptq = options.tied_head == "gptq" and specs.get(TIED_HEAD, None) is not None
    tied = TIED_HEAD in specs and specs[TIED_HEAD].tied_to == EMBEDDING
    started = time.perf_counter()

    embedding = specs.get(EMBEDDING)
    if embedding is not None and not (tied and head_by_gptq):
        table = modules[EMBEDDING].weight
        plan.weights[EMBEDDING] = (
            rounded_weight(table, embedding, searched_scale(table, embedding)) if options.search_scales
            else rtn_weight(table, embedding)
        )
    runner = _start(model, samples, plan, options)

    for index in range(len(model.layers)):
        names = _layer_groups(specs, index)
        with progress.step(f"GPTQ layer {index + 1} of {len(model.layers)}"):
            with collecting({n: modules[n] for n in names}) as collector:
                float_outputs = runner.run_layer(index)
            for name in names:
                plan.weights[name] = gptq_weight(
                    modules[name].weight, collector.hessian(name), specs[name], options.damp, options.act_order,
                    search_scales=options.search_scales,
                )
            if options.sequential:
                with dequantized(model, QuantPlan(scheme, {n: plan.weights[n] for n in names})):
                    runner.advance(runner.run_layer(index))
            else:
                runner.advance(float_outputs)

    if TIED_HEAD in specs:
        head = specs[TIED_HEAD]
        if tied and not head_by_gptq:
            plan.weights[TIED_HEAD] = share_integers(plan.weights[EMBEDDING], head.activations)
        else:
            with progress.step("GPTQ lm_head"):
                inputs = runner.final_normed()
                hessian = sum((x[0].T @ x[0]).double() for x in inputs) / sum(x.shape[1] for x in inputs)
                if tied and options.lookup_weight:
                    hessian = hessian / hessian.diagonal().mean()
                    hessian.diagonal().add_(options.lookup_weight)
                plan.weights[TIED_HEAD] = gptq_weight(
                    modules[TIED_HEAD].weight, hessian.float(), head, options.damp, options.act_order,
                    search_scales=options.search_scales,
                )
            if tied:
                plan.weights[EMBEDDING] = share_integers(plan.weights[TIED_HEAD], embedding.activations)
    plan.weights = {name: plan.weights[name] for name in specs}  # make_plan's order
    plan.calibration = {
        "method": GPTQ_METHOD,
        "options": options.to_manifest(),
        "samples": len(samples),
        "tokens": sum(len(s) for s in samples),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return plan


def _start(model: Qwen35, samples, plan: QuantPlan, options: GptqOptions) -> LayerwiseRunner:
    """The runner at layer 0's inputs: the quantized embedding's rows when it is already decided
    and the plan is sequential."""
    if options.sequential and EMBEDDING in plan.weights:
        with dequantized(model, QuantPlan(plan.scheme, {EMBEDDING: plan.weights[EMBEDDING]})):
            return LayerwiseRunner(model, samples)
    return LayerwiseRunner(model, samples)
