"""The parity gate every artifact passes as written, through its own runtime, against the eager model.

The core runs it (at export and in `verify`) through each runtime the backend declares:
the backend's Runner is fed token spans from position 0 (one call per span: prefill
chunks, then single-token decode steps), each call's last-position logits are kept, and
the pass runs twice on the same loaded artifact, so a second sequence started at
input_pos 0 must reproduce the first. Both passes are compared against the eager model
fed identically, by the gate the plan calls for (`gate_for`):

- float artifacts against the float model: max |diff| <= 1e-3 x the reference logits' std;
- quantized artifacts against the same plan applied to the eager model (quant.eager):
  relative difference ||diff|| / ||reference|| <= 2e-2 at every position and top-1
  agreement >= 99%, so only the lowering's own error is gated; their distance from the
  float model (mean KL, top-1) is measured and reported. Not max |diff| / std here: with
  dynamic activation quantization, a 1e-7 difference upstream (any two fp32 kernels) can
  flip one activation to the next int8 level, so single logits move by a quantization
  step even when the lowering is right; the norm measures the whole distribution;
- reduced-precision compute (fp16) against the float model: top-1 agreement >= 99%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwen_mobile import progress
from qwen_mobile.corpus import load_corpus, split_corpus
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.registry import Backend, Lengths, Runner

# uneven on purpose: 40 crosses a 32-token kernel chunk into a ragged tail, 7 never fills one
PREFILL_CHUNKS = (40, 17, 7)
# with the 3 prefill calls, 100 compared positions: one top-1 flip is 1%
DECODE_STEPS = 97
SEED = 0

Spans = list[tuple[int, int]]


@dataclass(frozen=True)
class Gate:
    reference: str  # what the artifact is compared against
    tolerance: float | None  # max |diff| as a fraction of the reference logits' std
    max_relative_diff: float | None  # max over positions of ||diff|| / ||reference||
    min_top1: float | None  # least top-1 agreement with the reference


FLOAT_GATE = Gate("float eager model", tolerance=1e-3, max_relative_diff=None, min_top1=None)
QUANTIZED_GATE = Gate(
    "eager model with the same quantization plan", tolerance=None, max_relative_diff=2e-2, min_top1=0.99
)
REDUCED_PRECISION_GATE = Gate("float eager model", tolerance=None, max_relative_diff=None, min_top1=0.99)


def gate_for(plan: QuantPlan) -> Gate:
    """Quantized weights: against the same plan in eager. Float weights computed in fp16: top-1
    against the float model (mean KL reported). Otherwise: the float gate."""
    if plan.weights:
        return QUANTIZED_GATE
    if plan.scheme.compute_dtype == "float16":
        return REDUCED_PRECISION_GATE
    return FLOAT_GATE


@dataclass
class Parity:
    reference: str
    max_abs_diff: float
    reference_std: float
    ratio_to_std: float
    tolerance: float | None
    relative_diff: float  # max over positions of ||diff|| / ||reference||
    max_relative_diff: float | None
    top1_agreement: float
    min_top1: float | None
    positions_checked: int  # logits compared per pass: one per call
    tokens_fed: int
    prefill_chunks: list[int]
    decode_steps: int
    reset_max_abs_diff: float  # second pass from input_pos 0 vs the first
    reset_allowed: float
    versus_float: dict | None  # quantized artifacts: mean KL and top-1 against the float model

    @property
    def passed(self) -> bool:
        # each comparison is written so that a NaN fails it
        close = self.tolerance is None or bool(self.ratio_to_std <= self.tolerance)
        close = close and (self.max_relative_diff is None or bool(self.relative_diff <= self.max_relative_diff))
        agrees = self.min_top1 is None or bool(self.top1_agreement >= self.min_top1)
        return close and agrees and bool(self.reset_max_abs_diff <= self.reset_allowed)

    def summary(self) -> str:
        allowed = f" (allowed {self.tolerance:g})" if self.tolerance is not None else ""
        relative = f" (allowed {self.max_relative_diff:g})" if self.max_relative_diff is not None else ""
        top1 = f" (needs {self.min_top1:g})" if self.min_top1 is not None else ""
        return (
            f"vs the {self.reference}: max|diff| {self.max_abs_diff:.3g} = {self.ratio_to_std:.3g} x std{allowed}, "
            f"relative difference {self.relative_diff:.3g}{relative}, "
            f"top-1 agreement {self.top1_agreement:.3f}{top1} over {self.positions_checked} positions, "
            f"after reset {self.reset_max_abs_diff:.3g} (allowed {self.reset_allowed:.3g})"
        )

    def to_manifest(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def feeding_plan(max_context: int, max_seq_len: int) -> tuple[Spans, Spans]:
    """(start, end) token spans, one per call: (prefill chunks no longer than max_seq_len,
    decode steps), cut to what max_context holds (at least one prefill call always fits: the
    schema and --max-context ask for a context of 2 or more)."""
    prefill = []
    position = 0
    for size in PREFILL_CHUNKS:
        while size > 0 and position < max_context:
            length = min(size, max_seq_len, max_context - position)
            prefill.append((position, position + length))
            position, size = position + length, size - length
    decode = [(p, p + 1) for p in range(position, min(position + DECODE_STEPS, max_context))]
    return prefill, decode


def sample_tokens(vocab_size: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(SEED))


@torch.no_grad()
def reference_logits(model: Qwen35, tokens: torch.Tensor, spans: Spans, max_context: int) -> torch.Tensor:
    """Eager logits [calls, vocab], fed exactly as the artifact is."""
    state = model.init_state(max_context)
    outputs = []
    for start, end in spans:
        logits, state = model(tokens[:, start:end], torch.tensor([start]), state)
        outputs.append(logits)
    return torch.cat(outputs)


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || logits) of the next-token distributions, in nats."""
    log_p, log_q = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def relative_diff(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """max over positions of ||logits - reference|| / ||reference|| (reference repeated to match)."""
    reference = reference.repeat(logits.shape[0] // reference.shape[0], 1)
    return ((logits - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()


def held_out_tokens(tokenizer_dir: Path, length: int, vocab_size: int) -> torch.Tensor:
    """The first `length` ids of the held-out corpus split, under the checkpoint's own tokenizer:
    natural text, so top-1 agreement is measured where the model has an opinion, not on the
    near-ties random ids produce."""
    from qwen_mobile.generate import load_tokenizer

    ids = load_tokenizer(tokenizer_dir).encode(split_corpus(load_corpus())[1][: length * 16], add_special_tokens=False)
    path = tokenizer_dir / "tokenizer.json"
    if len(ids) < length:
        raise QwenMobileError(f"{path}: encodes the gate's {length * 16} characters of text as {len(ids)} tokens, "
                              f"fewer than the {length} it feeds")
    beyond = [token for token in ids[:length] if not 0 <= token < vocab_size]
    if beyond:
        raise QwenMobileError(f"{path}: gives token id {beyond[0]}, outside the model's vocab_size {vocab_size} "
                              "(a tokenizer from another model?)")
    return torch.tensor([ids[:length]])


def top1_agreement(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()


@dataclass
class References:
    """What the artifact is compared against: computed once, reusable across runtimes of
    the same artifact (the eager passes cost minutes at 0.8B)."""

    tokens: torch.Tensor
    prefill: Spans
    decode: Spans
    float_logits: torch.Tensor  # the float model's
    logits: torch.Tensor  # what the gate compares against: float_logits, or the plan's in eager
    gate: Gate
    quantized: bool

    @property
    def spans(self) -> Spans:
        return self.prefill + self.decode


def references(model: Qwen35, lengths: Lengths, plan: QuantPlan, tokenizer_dir: Path | None = None) -> References:
    """The eager logits the gate needs for this plan (see the module doc), feeding the
    held-out text under the tokenizer in `tokenizer_dir` (the checkpoint's, or the bundle's
    copy of it) or, without one, seeded random ids."""
    prefill, decode = feeding_plan(lengths.max_context, lengths.max_chunk)
    max_context = lengths.max_context
    spans = prefill + decode
    needed = spans[-1][1]
    vocab_size = model.config.vocab_size
    tokens = sample_tokens(vocab_size, needed) if tokenizer_dir is None else held_out_tokens(
        tokenizer_dir, needed, vocab_size
    )
    with progress.step(f"eager reference: float model, {len(spans)} calls"):
        float_logits = reference_logits(model, tokens, spans, max_context)
    quantized = bool(plan.weights)
    logits = float_logits
    if quantized:
        with progress.step(f"eager reference: {plan.scheme.name} plan, {len(spans)} calls"), dequantized(model, plan):
            logits = reference_logits(model, tokens, spans, max_context)
    return References(tokens, prefill, decode, float_logits, logits, gate_for(plan), quantized)


def run_pass(runner: Runner, tokens: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The runner fed every span in order from position 0: each call's logits [calls, vocab]."""
    ids = tokens[0].tolist()
    return torch.stack([runner.step(ids[start:end], start).reshape(-1).float() for start, end in spans])


def compare(runner: Runner, refs: References) -> Parity:
    """Run the pass twice on the same loaded artifact (the second from input_pos 0 again: the
    reset) and measure both against the references. Raises only what the runner raises when
    the artifact cannot run."""
    with progress.step(f"artifact: 2 passes of {len(refs.spans)} calls"):
        first = run_pass(runner, refs.tokens, refs.spans)
        second = run_pass(runner, refs.tokens, refs.spans)
    reference, gate = refs.logits, refs.gate
    max_abs_diff = (torch.cat((first, second)) - reference.repeat(2, 1)).abs().max().item()
    reference_std = reference.std().item()
    return Parity(
        reference=gate.reference,
        max_abs_diff=max_abs_diff,
        reference_std=reference_std,
        ratio_to_std=max_abs_diff / reference_std if reference_std > 0 else float("inf"),
        tolerance=gate.tolerance,
        relative_diff=relative_diff(reference, torch.cat((first, second))),
        max_relative_diff=gate.max_relative_diff,
        top1_agreement=top1_agreement(reference, first),
        min_top1=gate.min_top1,
        positions_checked=len(refs.spans),
        tokens_fed=refs.tokens.shape[1],
        prefill_chunks=[end - start for start, end in refs.prefill],
        decode_steps=len(refs.decode),
        reset_max_abs_diff=(second - first).abs().max().item(),
        # a sequence restarted at input_pos 0 must reproduce the first pass as closely as fp32 must match eager
        reset_allowed=FLOAT_GATE.tolerance * reference_std,
        versus_float=(
            {"mean_kl": mean_kl(refs.float_logits, first), "top1_agreement": top1_agreement(refs.float_logits, first)}
            if refs.quantized or gate is REDUCED_PRECISION_GATE else None
        ),
    )


def gate_artifact(backend: Backend, directory: Path, manifest: dict, refs: References) -> dict:
    """The gate through every runtime the backend declares, in order, stopping at the first
    that fails (the artifact is refused either way). Each runtime's loaded artifact is
    released before the next loads: at the 0.8B shape one LiteRT interpreter holds GiBs.

    Returns the manifest's `parity`: the first runtime's figures at the top level (what
    `verify` prints), every runtime's under `runtimes`, and `passed` only when every
    runtime was measured and passed."""
    results: dict[str, Parity] = {}
    for runtime in backend.runtimes:
        with progress.step(f"loading the artifact ({runtime})"):
            runner = backend.open(directory, manifest, runtime)
        results[runtime] = compare(runner, refs)
        del runner
        if not results[runtime].passed:
            break
    first = next(iter(results.values())).to_manifest()
    return {
        **first,
        "passed": list(results) == list(backend.runtimes) and all(p.passed for p in results.values()),
        "runtimes": {name: parity.to_manifest() for name, parity in results.items()},
    }


def require_parity(backend: Backend, directory: Path, manifest: dict, refs: References) -> dict:
    """gate_artifact, refusing the artifact with a one-line error naming the runtime that disagrees."""
    parity = gate_artifact(backend, directory, manifest, refs)
    for runtime, result in parity["runtimes"].items():
        if not result["passed"]:
            summary = Parity(**{k: v for k, v in result.items() if k != "passed"}).summary()
            raise QwenMobileError(
                f"{manifest['artifact']}: the {backend.spec.name} runtime ({runtime}) disagrees with the eager "
                f"model: {summary}"
            )
    return parity
