"""Static activation quantization (a8w8, a16w8): each planned linear's input and output ranges,
decided once from calibration text and carried by the plan, as NPUs need them.

An NPU runs a linear as int8 (or int16) activations x int8 weights -> int32 accumulators,
requantized to the output's own static range. So a plan for these schemes holds, beside each
weight's integers, one scale and zero point for the linear's input and one for its output
(`StaticRange`), per tensor. They are chosen here from the values the linear sees over the
calibration set, with the plan's own dequantized weights in place (what the artifact computes
with), by one of RANGE_METHODS:

- minmax: the smallest and largest value seen. Nothing clips; rare outliers stretch the step.
- percentile: the PERCENTILE and 1 - PERCENTILE quantiles: the far tails clip, the step shrinks.
- mse: the clipping of the min-max range (MSE_STEPS fractions of it) whose quantize-dequantize
  has the least squared error on the values seen.

int8 activations are asymmetric (a zero point in [-128, 127]); int16 activations are symmetric
with zero point 0, which TFLite's 16x8 kernels require (and Qualcomm's HTP path takes).

`static_linear` computes a linear as the LiteRT kernels the gate runs compute it, so
quant/eager.py can make the plan's eager model round where the artifact rounds (read in google-ai-edge/LiteRT's
sources, and checked on one linear by tests/test_tflite_static.py):

- QUANTIZE: x times the float32 reciprocal of the scale, in float32, rounded half to even:
  XNNPACK's f32->qs8 convert, and TFLite's optimized kernel, whose NEON code the x86 build runs
  through NEON_2_SSE (its scalar tail divides in double instead; the rows here are multiples of 8).
- FULLY_CONNECTED per channel: exact int32 accumulation, requantized as TFLite's reference kernel
  does, round(acc * (double(input_scale) * filter_scale / output_scale)) half away from zero.
  XNNPACK's int8 kernel gave the same integers on every output tested; TFLite's optimized kernels
  (ruy) move 0.3-0.6% of them one step on near-ties, which the gate's noise floor covers
  (parity.noise_floor: every static quantizer's input moved by a few ulps).
- DEQUANTIZE: (q - zero_point) * scale in float32, as XNNPACK; TFLite's NEON code computes
  q * scale + (-zero_point * scale), a few ulps away where the terms cancel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwen_mobile import progress
from qwen_mobile.errors import QwenMobileError

INT8_STATIC = "int8_static_per_tensor"
INT16_STATIC = "int16_static_per_tensor"
STATIC_ACTIVATIONS = {INT8_STATIC: (-128, 127), INT16_STATIC: (-32768, 32767)}

RANGE_METHODS = ("minmax", "percentile", "mse")
PERCENTILE = 1e-4  # each tail's share clipped by --ranges percentile
MSE_STEPS = 40  # clipping fractions of the min-max range searched by --ranges mse, from 1 down to MSE_LOWEST
MSE_LOWEST = 0.2
# values kept per linear, input and output, per calibration sample (seeded random draws from each
# call's): the min and max are exact over everything; percentile and mse read these values. At
# 128 samples, 131,072 values per tensor: about 13 beyond a 1e-4 quantile, 512 KiB each.
VALUES_PER_CALL = 1024


def is_static(activations: str | None) -> bool:
    return activations in STATIC_ACTIVATIONS


@dataclass(frozen=True)
class StaticRange:
    """One linear's static activation quantization: real = (q - zero_point) * scale, for its
    input and its output, integers in the range of `activations`."""

    activations: str  # INT8_STATIC or INT16_STATIC
    input_scale: float  # float32-exact
    input_zero_point: int
    output_scale: float
    output_zero_point: int

    @property
    def qmin(self) -> int:
        return STATIC_ACTIVATIONS[self.activations][0]

    @property
    def qmax(self) -> int:
        return STATIC_ACTIVATIONS[self.activations][1]


def check_ranges_flag(ranges: str | None, scheme) -> str | None:
    """--ranges, checked: a method for static schemes (the scheme's default_ranges in schemes.json
    when not given), None otherwise."""
    from qwen_mobile.quant.plan import scheme_table

    static = is_static(scheme.activations)
    if ranges is not None and ranges not in RANGE_METHODS:
        raise QwenMobileError(f"--ranges {ranges!r} is unknown; methods: {', '.join(RANGE_METHODS)}")
    if ranges is not None and not static:
        raise QwenMobileError(f"--ranges applies to schemes with static activations (a8w8, a16w8), not to {scheme.name}")
    return (ranges or scheme_table()[scheme.name]["default_ranges"]) if static else None


def quantization_params(low: float, high: float, activations: str) -> tuple[float, int]:
    """(scale, zero point) covering [low, high] (widened to hold 0, so padding and zeros are exact),
    through torchao's affine parameters: asymmetric for int8, symmetric (zero point 0) for int16."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine_with_min_max

    qmin, qmax = STATIC_ACTIVATIONS[activations]
    symmetric = activations == INT16_STATIC
    scale, zero_point = choose_qparams_affine_with_min_max(
        torch.tensor([min(low, 0.0)]), torch.tensor([max(high, 0.0)]),
        MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC, (1,), torch.int32, qmin, qmax,
        eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32, zero_point_dtype=torch.int32,
    )
    return float(scale.reshape(())), 0 if symmetric else int(zero_point.reshape(()))


def choose_range(values: torch.Tensor, low: float, high: float, method: str, activations: str) -> tuple[float, int]:
    """(scale, zero point) by `method` (module doc); `low` and `high` are the exact extremes seen."""
    if method == "minmax":
        return quantization_params(low, high, activations)
    if method == "percentile":
        sample = values.double()
        return quantization_params(float(torch.quantile(sample, PERCENTILE)), float(torch.quantile(sample, 1 - PERCENTILE)),
                                   activations)
    qmin, qmax = STATIC_ACTIVATIONS[activations]
    fractions = torch.linspace(1.0, MSE_LOWEST, MSE_STEPS).tolist()
    candidates = [quantization_params(low * fraction, high * fraction, activations) for fraction in fractions]
    # float32 is exact enough to rank clippings, and half the work of float64
    scales = torch.tensor([scale for scale, _ in candidates], dtype=torch.float32)[:, None]
    zeros = torch.tensor([zero for _, zero in candidates], dtype=torch.float32)[:, None]
    sample = values.float()[None, :]
    restored = (torch.clamp(round_half_away(sample / scales) + zeros, qmin, qmax) - zeros) * scales
    errors = (restored - sample).pow(2).mean(dim=1)
    return candidates[int(errors.argmin())]


class RangeCollector:
    """Forward hooks on linears keeping each one's input and output extremes (exact) and a seeded
    subset of their values (VALUES_PER_CALL per call)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.extremes: dict[tuple[str, str], list[float]] = {}
        self.values: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.generator = torch.Generator().manual_seed(0)
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _keep(self, key: tuple[str, str], x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        low, high = float(flat.min()), float(flat.max())
        seen = self.extremes.setdefault(key, [low, high])
        seen[0], seen[1] = min(seen[0], low), max(seen[1], high)
        if flat.numel() > VALUES_PER_CALL:
            flat = flat[torch.randint(flat.numel(), (VALUES_PER_CALL,), generator=self.generator)]
        self.values.setdefault(key, []).append(flat.clone())

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._keep((name, "input"), inputs[0])
            self._keep((name, "output"), output)

        return hook

    def range(self, name: str, side: str, method: str, activations: str) -> tuple[float, int]:
        low, high = self.extremes[(name, side)]
        return choose_range(torch.cat(self.values[(name, side)]), low, high, method, activations)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def collect_ranges(model: nn.Module, plan, samples: Sequence[Sequence[int]]) -> RangeCollector:
    """What every static-activation linear of `plan` sees over `samples` (load_calibration's token
    ids), run through `model` with the plan's dequantized weights and float activations."""
    from qwen_mobile.quant.gptq import calibration_logits
    from qwen_mobile.quant.plan import planned_modules, replaced_weights

    if not samples:
        raise QwenMobileError("static activation ranges need calibration text (--calibration); it got no samples")
    static = [name for name, weight in plan.weights.items() if is_static(weight.activations)]
    modules = planned_modules(model)
    dequantized = {}
    for weight in plan.weights.values():
        dequantized.setdefault(id(weight.qdata), weight.dequantize())
    collector = RangeCollector({name: modules[name] for name in static})
    try:
        with progress.step(f"activation ranges of {len(static)} linears over {len(samples)} samples"), \
                replaced_weights(model, {name: dequantized[id(w.qdata)] for name, w in plan.weights.items()}):
            for sample in samples:
                calibration_logits(model, sample)
    finally:
        collector.close()
    return collector


def ranges_from(collector: RangeCollector, plan, method: str) -> dict[str, StaticRange]:
    """Every static-activation linear's StaticRange by `method`, from what `collector` saw."""
    if method not in RANGE_METHODS:
        raise QwenMobileError(f"--ranges {method!r} is unknown; methods: {', '.join(RANGE_METHODS)}")
    ranges = {}
    for name, weight in plan.weights.items():
        if not is_static(weight.activations):
            continue
        if (name, "input") not in collector.extremes:
            raise QwenMobileError(f"{name}: the calibration pass never ran this linear, so it has no activation range")
        input_scale, input_zero = collector.range(name, "input", method, weight.activations)
        output_scale, output_zero = collector.range(name, "output", method, weight.activations)
        ranges[name] = StaticRange(weight.activations, input_scale, input_zero, output_scale, output_zero)
    return ranges


def activation_ranges(model: nn.Module, plan, samples: Sequence[Sequence[int]], method: str) -> dict[str, StaticRange]:
    """The plan's static activation ranges by `method` over `samples` (collect_ranges, ranges_from)."""
    if method not in RANGE_METHODS:
        raise QwenMobileError(f"--ranges {method!r} is unknown; methods: {', '.join(RANGE_METHODS)}")
    return ranges_from(collect_ranges(model, plan, samples), plan, method)


# --- the integer linear, as TFLite's builtin kernels compute it (module doc)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """std::round: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_input(x: torch.Tensor, spec: StaticRange) -> torch.Tensor:
    """QUANTIZE: the integers (as float64) the kernels write for `x`: x times the float32 reciprocal
    of the scale, in float32, rounded half to even, plus the zero point, clamped."""
    reciprocal = torch.tensor(1.0 / spec.input_scale, dtype=torch.float32)
    return torch.clamp(torch.round(x.float() * reciprocal).double() + spec.input_zero_point, spec.qmin, spec.qmax)


def integer_linear(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor, spec: StaticRange) -> torch.Tensor:
    """QUANTIZE -> FULLY_CONNECTED (per-channel int8 weights `qdata` [out, in] with `weight_scale`
    [out], no bias): the output integers (as float64) of TFLite's reference integer kernels. The
    accumulation is exact in float64 (|acc| < 2^53 for any width a model has)."""
    q = quantize_input(x, spec) - spec.input_zero_point
    accumulators = q @ qdata.double().t()
    multipliers = (torch.tensor(spec.input_scale, dtype=torch.float64) * weight_scale.double().reshape(-1)
                   / spec.output_scale)
    return torch.clamp(round_half_away(accumulators * multipliers) + spec.output_zero_point, spec.qmin, spec.qmax)


def static_linear(x: torch.Tensor, qdata: torch.Tensor, weight_scale: torch.Tensor, spec: StaticRange) -> torch.Tensor:
    """integer_linear, then DEQUANTIZE: float32 (double(scale) * (q - zero_point)), as x's dtype."""
    out = integer_linear(x, qdata, weight_scale, spec)
    return ((out - spec.output_zero_point) * spec.output_scale).float().to(x.dtype)
