"""Quantization as a plan: every quantized weight's integers, scales and zero points, decided once.

Backends encode a plan exactly as it is and never re-round from float, so a better
plan (calibration-driven, GPTQ or AWQ, from the calibration work) reaches every
artifact unchanged. The plans made here are round-to-nearest, symmetric, with
torchao's quantization primitives doing the arithmetic.

What a plan covers: every nn.Linear of the decoder, the token embedding and the
lm_head. What it leaves in float, on purpose: norms, the depthwise conv, A_log and
dt_bias, and the two projections listed in FLOAT_LINEARS.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.static import StaticRange

SCHEMES_PATH = Path(__file__).resolve().parent / "schemes.json"
PLAN_FILE = "plan.safetensors"  # a calibrated plan, as a bundle carries it (save_plan / load_plan)
GROUP_SIZES = (32, 64, 128)
EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")
# in_proj_a and in_proj_b project to one value per value head: the decay input and beta,
# the write strength. They hold a few thousand weights, and the recurrence compounds
# their error over the whole sequence, so they stay float.
FLOAT_LINEARS = ("in_proj_a", "in_proj_b")
CHUNK_ELEMENTS = 1 << 24  # round_to_nearest quantizes this many weights at a time (64 MiB in fp32)


@dataclass(frozen=True)
class QuantScheme:
    name: str
    summary: str
    weight_bits: int | None  # None: weights stay float
    group_size: int | None  # input columns per scale; None: one scale per output channel
    activations: str | None  # dynamic activation quantization of quantized linears, or None
    compute_dtype: str
    embedding_bits: int | None  # bits of embed_tokens and lm_head

    @property
    def is_float(self) -> bool:
        return self.weight_bits is None


def scheme_table() -> dict[str, dict]:
    return {name: entry for name, entry in json.loads(SCHEMES_PATH.read_text()).items() if not name.startswith("_")}


def resolve_scheme(name: str, group_size: int | None = None, embeddings_8bit: bool = False) -> QuantScheme:
    """The scheme --quant names, with --group-size and --embeddings-8bit applied, or a one-line error."""
    table = scheme_table()
    if name not in table:
        raise QwenMobileError(f"--quant {name!r} is unknown; schemes: {', '.join(table)}")
    entry = table[name]
    grouped = entry["group_size"] is not None
    if group_size is not None:
        if not grouped:
            with_groups = ", ".join(n for n, e in table.items() if e["group_size"] is not None)
            raise QwenMobileError(f"--group-size applies to grouped schemes ({with_groups}), not to {name}")
        if group_size not in GROUP_SIZES:
            raise QwenMobileError(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    if embeddings_8bit and entry["weight_bits"] is None:
        raise QwenMobileError(f"--embeddings-8bit applies to quantized schemes, not to {name}")
    bits = entry["weight_bits"]
    return QuantScheme(
        name=name,
        summary=entry["summary"],
        weight_bits=bits,
        group_size=group_size if group_size is not None else entry["group_size"],
        activations=entry["activations"],
        compute_dtype=entry["compute_dtype"],
        embedding_bits=None if bits is None else 8 if embeddings_8bit else bits,
    )


def scheme_from_manifest(quant: dict, where: str = "manifest.json") -> QuantScheme:
    """The scheme a bundle's manifest records, to rebuild its plan for `verify`; a value no export
    writes is an error naming the manifest's field (never a CLI flag)."""
    table = scheme_table()
    if quant["scheme"] not in table:
        raise QwenMobileError(f"{where}: field quant/scheme: {quant['scheme']!r} is not a scheme ({', '.join(table)})")
    group_size = quant.get("group_size") or None
    default = table[quant["scheme"]]["group_size"]
    if default is not None and group_size is not None and group_size not in GROUP_SIZES:
        raise QwenMobileError(
            f"{where}: field quant/group_size: {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}"
        )
    return resolve_scheme(
        quant["scheme"],
        group_size=group_size if default is not None else None,
        embeddings_8bit=quant.get("embedding_bits") == 8 and quant.get("bits") != 8,
    )


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight [rows, columns] as integers in the signed range of `bits`, stored in int8,
    with a scale and zero point per row and group of `group_size` columns:
    weight ≈ (qdata - zero_point) * scale."""

    qdata: torch.Tensor  # int8 [rows, columns]
    scale: torch.Tensor  # float32 [rows, columns // group_size]
    zero_point: torch.Tensor  # int8, the shape of scale
    bits: int
    group_size: int
    activations: str | None  # dynamic activation quantization when this weight feeds a linear

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def block_size(self) -> tuple[int, int]:
        return (1, self.group_size)

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    def dequantize(self) -> torch.Tensor:
        # written in place (dequantize_rows_into): no whole-weight temporaries, where torchao's came to
        # 2 GiB over the result for the 0.8B embedding
        return self.dequantize_rows(slice(None))

    def dequantize_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """The float32 values of some rows, a slice or a tensor of row indices (the rest of the weight is not made)."""
        integers = self.qdata[rows]
        return self._dequantized(integers, rows, torch.empty(integers.shape))

    def dequantize_rows_into(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """dequantize_rows(rows) written into the first rows of the float32 buffer `out`, which is returned
        cut to them."""
        integers = self.qdata[rows]
        return self._dequantized(integers, rows, out[: integers.shape[0]])

    def _dequantized(self, integers: torch.Tensor, rows, out: torch.Tensor) -> torch.Tensor:
        # torchao's dequantize_affine, (q - zero_point) * scale in float32, rounded once per value
        # (tests/test_export_memory.py checks it against torchao bit for bit), written by hand
        # into a buffer the caller keeps: the eager passes dequantize a block of rows per linear
        # per call, where torchao makes three temporaries each time.
        grouped = out.copy_(integers).view(out.shape[0], -1, self.group_size)
        zero_point = self.zero_point[rows]
        if zero_point.any():
            grouped.sub_(zero_point.unsqueeze(-1))
        grouped.mul_(self.scale[rows].unsqueeze(-1))
        return out


def chunk_rows(columns: int) -> int:
    """How many rows of a weight `columns` wide make one chunk of CHUNK_ELEMENTS (at least one)."""
    return max(1, CHUNK_ELEMENTS // max(1, columns))


def round_to_nearest(
    weight: torch.Tensor, bits: int, group_size: int, activations: str | None, narrow: bool = False
) -> QuantizedWeight:
    """Symmetric round-to-nearest: scale = max|w| of the group over half the integer range (rounded to bf16).

    `narrow` leaves out the lowest integer (int8: [-127, 127]), as int8 x int8 kernels need:
    TFLite's hybrid FULLY_CONNECTED on x86 multiplies |activation| by the weight negated where
    the activation is negative, and -(-128) wraps to -128 in int8. On the embedded model, single
    FULLY_CONNECTEDs with a -128 were up to 0.14 (relative) from the plan in eager; with
    [-127, 127] they match it to 3e-7 on their own inputs."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    qmin, qmax = -(1 << (bits - 1)) + int(narrow), (1 << (bits - 1)) - 1
    weight = weight.detach()
    block = (1, group_size)

    def rows(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        part = part.float()  # a chunk at a time: a weight held in bf16 (memory.py) is never widened whole
        scale, zero_point = choose_qparams_affine(
            part, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax,
            scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
        )
        scale = bf16_ceil(scale)
        return quantize_affine(part, block, scale, zero_point, torch.int8, qmin, qmax), scale, zero_point

    # Each row is quantized on its own (groups lie within a row), so a few rows at a time give the
    # same integers while the float temporaries torchao makes stay at a chunk's size: whole, the
    # 0.8B embedding (1 GiB in fp32) took 2 GiB more at planning, the export's peak at the time.
    # Each chunk's results go straight into the whole weight's tensors: joined at the end, the
    # chunks and their join were both held (1.2 GiB more for the 9B embedding).
    step = chunk_rows(weight.shape[1])
    qdata = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], weight.shape[1] // group_size)
    zero_point = torch.empty(scale.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], step):
        span = slice(start, start + step)
        for whole, part in zip((qdata, scale, zero_point), rows(weight[span])):
            whole[span] = part
    return QuantizedWeight(qdata, scale, zero_point, bits, group_size, activations)


def bf16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each (positive) scale.

    Scales are kept bf16-exact: XNNPACK stores blockwise scales in bf16, and fp16 (Core ML,
    TFLite) holds every such value in a weight's range, so each backend encodes the plan's
    scales bit for bit instead of rounding them its own way. Rounding up, not to nearest,
    keeps the largest weight of a group inside the integer range (no clamping error)."""
    rounded = scale.to(torch.bfloat16)
    next_up = (rounded.view(torch.int16) + 1).view(torch.bfloat16)  # positive floats order like their bits
    return torch.where(rounded.float() < scale, next_up, rounded).float()


@dataclass
class QuantPlan:
    scheme: QuantScheme
    weights: dict[str, QuantizedWeight]  # the model's parameter name -> its quantized form
    kept_float: list[str] = field(default_factory=list)  # linears deliberately left in float
    method: str = "round_to_nearest_symmetric"  # how the integers were chosen (quant/gptq.py: gptq_symmetric)
    # how a calibrated plan was made: calibration set, options, and for mixed precision the
    # weights kept at 8 bits with their measured sensitivities (quant/mixed.py); None for RTN
    calibration: dict | None = None
    # static-activation schemes (a8w8, a16w8): weight name -> its linear's input and output
    # ranges (quant/static.py StaticRange), decided from calibration text; empty otherwise
    activation_ranges: dict = field(default_factory=dict)

    def group_fallbacks(self) -> list[str]:
        """Weights whose width the scheme's group size does not divide: one scale per row instead."""
        return sorted(
            name for name, w in self.weights.items()
            if self.scheme.group_size and w.group_size != self.scheme.group_size
        )

    def to_manifest(self) -> dict:
        scheme = self.scheme
        entry = {"scheme": scheme.name, "compute_dtype": scheme.compute_dtype}
        if scheme.is_float:
            return entry
        return {
            **entry,
            "bits": scheme.weight_bits,
            "group_size": scheme.group_size or 0,  # 0: per output channel
            "activations": scheme.activations,
            "embedding_bits": scheme.embedding_bits,
            "method": self.method,
            "higher_precision": sorted(
                [n for n in self.kept_float]
                + [n for n, w in self.weights.items() if w.bits > scheme.weight_bits]
            ),
            "per_channel_fallback": self.group_fallbacks(),
            "layers": {
                name: {"bits": w.bits, "group_size": w.group_size, "activations": w.activations}
                for name, w in self.weights.items()
            },
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"activation_ranges": {
                name: {"input": [r.input_scale, r.input_zero_point], "output": [r.output_scale, r.output_zero_point]}
                for name, r in self.activation_ranges.items()}} if self.activation_ranges else {}),
        }


def planned_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that owns it, for every weight a plan may quantize."""
    modules = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or isinstance(module, nn.Linear):
            modules[f"{name}.weight"] = module
    return modules


@contextlib.contextmanager
def replaced_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Inside the block each named weight (a planned_modules name) is the given tensor; the
    model's own weights come back afterwards. Swapped in place rather than copied, so a
    0.8B model is not held twice."""
    modules = planned_modules(model)
    originals = {name: modules[name].weight for name in weights}
    try:
        for name, tensor in weights.items():
            modules[name].weight = nn.Parameter(tensor, requires_grad=False)
        yield model
    finally:
        for name, weight in originals.items():
            modules[name].weight = weight


def release_planned_weights(model: nn.Module, plan: QuantPlan) -> None:
    """Free the values of the weights `plan` quantizes: each becomes a float32 meta tensor of its
    shape (tied weights stay tied), so the model still describes itself to a lowering that swaps
    the plan's own tensors in (replaced_weights), but can no longer compute. For a caller done with
    the float model: at 0.8B those weights are 3 GB of the 3.1 GB."""
    modules = planned_modules(model)
    for weight in {id(modules[name].weight): modules[name].weight for name in plan.weights}.values():
        _release(modules, weight)


def _release(modules: dict[str, nn.Module], weight: torch.Tensor) -> None:
    """Every module holding `weight` (a tied one: both) given one meta tensor of its shape in its place."""
    # float32 whatever it was held in (memory.py): the model describes what it computes
    released = nn.Parameter(torch.empty(weight.shape, device="meta"), requires_grad=False)
    for module in modules.values():
        if module.weight is weight:
            module.weight = released


def one_per_tensor(model: nn.Module, plan: QuantPlan, make) -> dict[str, torch.Tensor]:
    """Planned weight name -> make(its tensor), made once per tensor: tied weights share the result."""
    modules = planned_modules(model)
    made: dict[int, torch.Tensor] = {}
    for name in plan.weights:
        weight = modules[name].weight
        if id(weight) not in made:
            made[id(weight)] = make(weight)
    return {name: made[id(modules[name].weight)] for name in plan.weights}


def placeholder(shape) -> torch.Tensor:
    """A float32 tensor of `shape` whose one element is repeated by stride 0: what a lowering that
    encodes the plan's own integers traces a planned weight's shape through, never its values
    (which may be released). Each call has an element of its own, so a converter that keeps views
    of its inputs tells placeholders apart by address (the Core ML backend's encoding pass)."""
    return torch.zeros((), dtype=torch.float32).expand(tuple(shape))


def placeholder_weights(model: nn.Module, plan: QuantPlan) -> dict[str, torch.Tensor]:
    """A placeholder for each weight `plan` quantizes (for replaced_weights), tied weights sharing one."""
    return one_per_tensor(model, plan, lambda weight: placeholder(weight.shape))


def bits_and_group(scheme: QuantScheme, name: str, columns: int) -> tuple[int, int]:
    """The scheme's bits and group size for one weight: the embedding and lm_head at the
    scheme's embedding bits (one scale per row when those are wider than the weights'), and
    one scale per row wherever the group size does not divide the width."""
    if name in EMBEDDINGS:
        bits = scheme.embedding_bits
        group = columns if bits > scheme.weight_bits else scheme.group_size or columns
    else:
        bits, group = scheme.weight_bits, scheme.group_size or columns
    return bits, columns if columns % group else group


def make_plan(model: nn.Module, scheme: QuantScheme, release_float: bool = False) -> QuantPlan:
    """Round-to-nearest for every weight the scheme quantizes (an empty plan for float schemes).

    A tied lm_head gets the embedding's own QuantizedWeight (same integers); linears take
    the scheme's activation quantization, the embedding lookup none.

    release_float, for a caller with no further use for the float weights the plan quantizes:
    each is released (release_planned_weights) as soon as its integers are made, so the float
    matrices and the integers are never held whole together (at 9B, 16.7 GiB of bf16 beside 8.3
    GiB of integers, over this project's 24 GB machine)."""
    plan = QuantPlan(scheme, {})
    if scheme.is_float:
        return plan
    modules = planned_modules(model)
    # decided before either weight is released
    embedding, lm_head = modules.get("embed_tokens.weight"), modules.get("lm_head.weight")
    tied_lm_head = embedding is not None and lm_head is not None and lm_head.weight is embedding.weight
    for name, module in modules.items():
        if name.rsplit(".", 2)[-2] in FLOAT_LINEARS:
            plan.kept_float.append(name)
            continue
        weight = module.weight
        bits, group = bits_and_group(scheme, name, weight.shape[1])
        activations = scheme.activations if isinstance(module, nn.Linear) else None
        tied = name == "lm_head.weight" and tied_lm_head
        if tied and activations is None:
            plan.weights[name] = plan.weights["embed_tokens.weight"]
        elif tied:
            embedding = plan.weights["embed_tokens.weight"]
            plan.weights[name] = QuantizedWeight(
                embedding.qdata, embedding.scale, embedding.zero_point, embedding.bits, embedding.group_size, activations
            )
        else:
            # 8-bit weights meet int8 dynamic activations in int8 x int8 kernels (round_to_nearest says why
            # narrow); the embedding too, as a tied lm_head computes with its integers
            narrow = bits == 8 and scheme.activations is not None
            plan.weights[name] = round_to_nearest(weight, bits, group, activations, narrow)
        if release_float:
            _release(modules, module.weight)
    return plan


# --- a plan on disk: what a bundle carries so `verify` checks against it instead of re-deciding it

PLAN_FORMAT = 2  # 2: integers of 4 bits or fewer stored two to a byte
PLAN_HEADER = "qwen_mobile.quant_plan"


def pack_nibbles(qdata: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], two to a byte (the even column in the low nibble); an odd last
    column is padded with 0."""
    flat = qdata.reshape(qdata.shape[0], -1).to(torch.int16) & 0xF
    if flat.shape[1] % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, columns: int) -> torch.Tensor:
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :columns]
    return (nibbles.to(torch.int16) ^ 8).sub(8).to(torch.int8)  # sign-extend the 4-bit two's complement


def save_plan(plan: QuantPlan, path: str | Path) -> Path:
    """Write `plan` as one safetensors file: each weight's integers (int8, or two to a uint8 for
    4 bits and fewer: pack_nibbles), scales (float32) and zero points (int8) as tensors
    `<name>:qdata`, `<name>:scale`, `<name>:zero_point`, and
    a JSON header (metadata key qwen_mobile.quant_plan) with the scheme, method, kept-float
    linears, calibration record and each weight's bits, group size and activations. A weight
    that shares another's integers (a tied lm_head) is stored once and says whose it holds.
    Static activation ranges are tensors too, `<name>:input_range` and `<name>:output_range`
    (float64 [scale, zero point]: a float32 scale and an int zero point, both exact)."""
    from safetensors.torch import save_file

    tensors, entries, owners = {}, {}, {}
    for name, weight in plan.weights.items():
        owner = owners.setdefault(id(weight.qdata), name)
        if owner == name:
            tensors[f"{name}:qdata"] = (pack_nibbles(weight.qdata) if weight.bits <= 4 else weight.qdata).contiguous()
            tensors[f"{name}:scale"] = weight.scale.float().contiguous()
            tensors[f"{name}:zero_point"] = weight.zero_point.contiguous()
        entries[name] = {
            "bits": weight.bits,
            "group_size": weight.group_size,
            "activations": weight.activations,
            "integers_of": None if owner == name else owner,
            "shape": list(weight.qdata.shape),
        }
    for name, spec in plan.activation_ranges.items():
        tensors[f"{name}:input_range"] = torch.tensor([spec.input_scale, spec.input_zero_point], dtype=torch.float64)
        tensors[f"{name}:output_range"] = torch.tensor([spec.output_scale, spec.output_zero_point], dtype=torch.float64)
    header = {
        "format": PLAN_FORMAT,
        "scheme": asdict(plan.scheme),
        "method": plan.method,
        "kept_float": list(plan.kept_float),
        "calibration": plan.calibration,
        "weights": entries,
        "activation_ranges": {name: spec.activations for name, spec in plan.activation_ranges.items()},
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={PLAN_HEADER: json.dumps(header)})
    return path


def load_plan(path: str | Path) -> QuantPlan:
    """The plan save_plan wrote, bit for bit (a tied lm_head shares the embedding's tensors again)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if PLAN_HEADER not in metadata:
                raise QwenMobileError(f"{path}: not a quantization plan (no {PLAN_HEADER} header)")
            header = json.loads(metadata[PLAN_HEADER])
            if header.get("format") != PLAN_FORMAT:
                raise QwenMobileError(f"{path}: plan format {header.get('format')!r}; this version reads {PLAN_FORMAT}")
            weights: dict[str, QuantizedWeight] = {}
            for name, entry in header["weights"].items():
                owner = entry["integers_of"]
                if owner is None:
                    qdata, scale, zero_point = (handle.get_tensor(f"{name}:{part}") for part in ("qdata", "scale", "zero_point"))
                    if entry["bits"] <= 4:
                        qdata = unpack_nibbles(qdata, entry["shape"][1])
                    if list(qdata.shape) != entry["shape"]:
                        raise ValueError(f"{name}: integers of shape {list(qdata.shape)}, the header says {entry['shape']}")
                else:
                    if owner not in weights:
                        raise QwenMobileError(f"{path}: {name} shares the integers of {owner}, which comes later or not at all")
                    qdata, scale, zero_point = weights[owner].qdata, weights[owner].scale, weights[owner].zero_point
                weights[name] = QuantizedWeight(
                    qdata, scale, zero_point, entry["bits"], entry["group_size"], entry["activations"]
                )
            ranges = {}
            for name, activations in header.get("activation_ranges", {}).items():
                (input_scale, input_zero), (output_scale, output_zero) = (
                    handle.get_tensor(f"{name}:{side}_range").tolist() for side in ("input", "output"))
                ranges[name] = StaticRange(activations, input_scale, int(input_zero), output_scale, int(output_zero))
            return QuantPlan(
                QuantScheme(**header["scheme"]), weights, list(header["kept_float"]), header["method"],
                header["calibration"], ranges,
            )
    except (SafetensorError, OSError) as error:
        raise QwenMobileError(f"{path}: not a readable safetensors file ({error})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a header that is not save_plan's
        raise QwenMobileError(f"{path}: not a quantization plan this version reads ({type(error).__name__}: {error})") from None
