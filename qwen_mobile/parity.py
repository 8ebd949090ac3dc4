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
  step even when the lowering is right; the norm measures the whole distribution.
  Those flips compound through the layers and the recurrent state, more so the larger and
  flatter the model, so a plan with dynamic activations also has its noise floor measured
  on the checkpoint being exported (noise_floor: the plan in eager again with every
  quantized activation moved by a few ulps, FLOOR_SAMPLES seeds, one batch row each). The
  relative bar widens to FLOOR_FACTOR times the worst sample, never narrower than the fixed
  bar; the mean KL against the plan gets a bar of FLOOR_FACTOR times the worst sample's (the
  most sensitive check: a mean over positions, steady from sample to sample where single
  argmaxes are not), and so does the mean KL of the WORST_POSITIONS positions where it is
  largest (a fault that moves a few positions far, as a KV slot written one position off does,
  barely moves the mean over all of them; the relative bar is a worst position too, but a norm
  over the whole vocabulary, where KL weighs the tokens the model would pick). Eight samples,
  not four: on the embedded model four left the mean-KL bar refusing about 2% of right
  programs (docs/parity.md, measured). Top-1 gets the bar a correct program misses with
  probability below FALSE_REFUSAL (top1_bar: the floor's pooled flip rate, bounded above, then
  the binomial tail), since on near-flat logits each position's argmax is a coin toss a right
  program may lose. What the floor hides (a scale off by a few percent, two int4 values
  swapped) the weight check sees: a backend that can read its artifact's weights back
  (Backend.missing_weights) has every planned integer and scale compared with the plan, exactly;
- reduced-precision compute (fp16) against the float model: top-1 agreement >= 99%.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from statistics import NormalDist

import torch

from qwen_mobile import progress
from qwen_mobile.memory import return_freed_memory, widened
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


# the quantized gate's noise floor (see the module doc)
FLOOR_SAMPLES = 8
FLOOR_ULPS = 2.0
FLOOR_FACTOR = 2.0  # the relative-difference and both KL bars: this times the worst floor sample
# the worst-positions KL bar averages this many positions: one alone swings with a single near-tie
# flip and refuses right programs more often, more dilute a fault confined to a few positions
# (docs/parity.md, measured)
WORST_POSITIONS = 3
# the top-1 bar's chance of refusing a correct program, split evenly between the flip rate's estimate
# (from FLOOR_SAMPLES x positions) and the artifact's own draw of flips
FALSE_REFUSAL = 1e-3


@dataclass(frozen=True)
class Gate:
    reference: str  # what the artifact is compared against
    tolerance: float | None  # max |diff| as a fraction of the reference logits' std
    max_relative_diff: float | None  # max over positions of ||diff|| / ||reference||
    min_top1: float | None  # least top-1 agreement with the reference
    max_mean_kl: float | None = None  # most mean KL(reference || artifact): set from a noise floor
    max_worst_positions_kl: float | None = None  # most worst_positions_kl: set from a noise floor


@dataclass(frozen=True)
class NoiseFloor:
    """How far the plan in eager moves from itself when its dynamically quantized activations
    are rounded as another correct kernel might round them (FLOOR_SAMPLES seeds)."""

    relative_diffs: list[float]
    top1_agreements: list[float]
    mean_kls: list[float]
    worst_positions_kls: list[float]  # each sample's worst_positions_kl
    positions: int  # compared per sample

    def widened(self, gate: Gate) -> Gate:
        return Gate(
            gate.reference,
            gate.tolerance,
            max(gate.max_relative_diff, FLOOR_FACTOR * max(self.relative_diffs)),
            min(gate.min_top1, top1_bar(self.top1_agreements, self.positions)),
            FLOOR_FACTOR * max(self.mean_kls),
            FLOOR_FACTOR * max(self.worst_positions_kls),
        )

    def to_manifest(self) -> dict:
        return {"samples": len(self.relative_diffs), "ulps": FLOOR_ULPS, "factor": FLOOR_FACTOR,
                "false_refusal": FALSE_REFUSAL, "positions": self.positions,
                "relative_diffs": self.relative_diffs, "top1_agreements": self.top1_agreements,
                "mean_kls": self.mean_kls,
                "worst_positions": WORST_POSITIONS, "worst_positions_kls": self.worst_positions_kls}


def top1_bar(agreements: list[float], positions: int) -> float:
    """The least top-1 agreement over `positions` that a correct program reaches but with
    probability FALSE_REFUSAL, given the floor samples' agreements over as many positions.

    A correct program's disagreements are a sum of independent per-position flips, whose spread
    is at most a binomial's of the same mean; the mean flip rate is bounded above from the pooled
    samples (Wilson's score bound, one-sided at FALSE_REFUSAL / 2), then the artifact may
    disagree at as many positions as that binomial exceeds with probability at most
    FALSE_REFUSAL / 2. Plain arithmetic (no scipy here): two closed forms and a tail sum."""
    trials = len(agreements) * positions
    flips = sum(round((1 - agreement) * positions) for agreement in agreements)
    z = NormalDist().inv_cdf(1 - FALSE_REFUSAL / 2)
    rate = flips / trials
    centre = rate + z * z / (2 * trials)
    spread = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    bound = min(1.0, (centre + spread) / (1 + z * z / trials))
    allowed, tail = positions, 0.0  # tail: P(more than `allowed` flips), summed from the top down
    while allowed > 0:
        tail += math.comb(positions, allowed) * bound**allowed * (1 - bound) ** (positions - allowed)
        if tail > FALSE_REFUSAL / 2:
            break
        allowed -= 1
    return 1 - allowed / positions


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
    mean_kl: float  # of the next-token distributions, against the reference
    max_mean_kl: float | None
    worst_positions_kl: float  # the same KL, mean over the WORST_POSITIONS positions where it is largest
    max_worst_positions_kl: float | None
    noise_floor: dict | None  # plans with dynamic activations: what the bars were widened from

    @classmethod
    def from_manifest(cls, parity: dict) -> Parity:
        """The figures of a to_manifest() dict (or gate_artifact's, which holds them at its top level)."""
        return cls(**{field.name: parity[field.name] for field in fields(cls)})

    def refused_by(self) -> list[str]:
        """The checks this artifact fails, by name; none when it passes."""
        # each comparison is written so that a NaN fails it
        checks = {
            "max|diff|": self.tolerance is None or bool(self.ratio_to_std <= self.tolerance),
            "relative": self.max_relative_diff is None or bool(self.relative_diff <= self.max_relative_diff),
            "mean KL": self.max_mean_kl is None or bool(self.mean_kl <= self.max_mean_kl),
            "worst positions' KL": self.max_worst_positions_kl is None
            or bool(self.worst_positions_kl <= self.max_worst_positions_kl),
            "top-1": self.min_top1 is None or bool(self.top1_agreement >= self.min_top1),
            "after reset": bool(self.reset_max_abs_diff <= self.reset_allowed),
        }
        return [name for name, holds in checks.items() if not holds]

    @property
    def passed(self) -> bool:
        return not self.refused_by()

    def summary(self) -> str:
        allowed = f" (allowed {self.tolerance:g})" if self.tolerance is not None else ""
        relative = f" (allowed {self.max_relative_diff:g})" if self.max_relative_diff is not None else ""
        top1 = f" (needs {self.min_top1:g})" if self.min_top1 is not None else ""
        kl = f", mean KL {self.mean_kl:.3g} (allowed {self.max_mean_kl:.3g})" if self.max_mean_kl is not None else ""
        if self.max_worst_positions_kl is not None:
            kl += (f", KL at the {WORST_POSITIONS} worst positions {self.worst_positions_kl:.3g} "
                   f"(allowed {self.max_worst_positions_kl:.3g})")
        return (
            f"vs the {self.reference}: max|diff| {self.max_abs_diff:.3g} = {self.ratio_to_std:.3g} x std{allowed}, "
            f"relative difference {self.relative_diff:.3g}{relative}{kl}, "
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
def fed(model: Qwen35, tokens: torch.Tensor, spans: Spans, max_context: int) -> Iterator[torch.Tensor]:
    """Each call's eager logits [batch, vocab], the model fed tokens [batch, length] exactly as the
    artifact is fed, from a new sequence."""
    state = model.init_state(max_context, batch=tokens.shape[0])
    for start, end in spans:
        logits, state = model(tokens[:, start:end], torch.tensor([start]), state)
        yield logits


def reference_logits(model: Qwen35, tokens: torch.Tensor, spans: Spans, max_context: int) -> torch.Tensor:
    """Eager logits [calls, vocab] of one sequence."""
    return torch.cat(list(fed(model, tokens, spans, max_context)))


def position_kls(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || logits) of the next-token distribution at each position, in nats."""
    log_p, log_q = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """position_kls averaged over the positions."""
    return position_kls(reference, logits).mean().item()


def worst_positions_kl(kls: torch.Tensor) -> torch.Tensor:
    """Mean of the WORST_POSITIONS largest KLs along the last dimension (all of them when fewer)."""
    return kls.topk(min(WORST_POSITIONS, kls.shape[-1]), dim=-1).values.mean(-1)


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
    gate: Gate  # widened by the noise floor where there is one
    quantized: bool
    noise_floor: NoiseFloor | None = None

    @property
    def spans(self) -> Spans:
        return self.prefill + self.decode


def gate_feed(model: Qwen35, lengths: Lengths, tokenizer_dir: Path | None) -> tuple[torch.Tensor, Spans, Spans]:
    """(tokens [1, length], prefill spans, decode spans): what the gate feeds the eager model and the
    artifact alike, the held-out text under the tokenizer in `tokenizer_dir` (the checkpoint's, or
    the bundle's copy of it) or, without one, seeded random ids."""
    prefill, decode = feeding_plan(lengths.max_context, lengths.max_chunk)
    needed = (prefill + decode)[-1][1]
    vocab_size = model.config.vocab_size
    tokens = sample_tokens(vocab_size, needed) if tokenizer_dir is None else held_out_tokens(
        tokenizer_dir, needed, vocab_size
    )
    return tokens, prefill, decode


def float_reference(model: Qwen35, lengths: Lengths, tokenizer_dir: Path | None = None) -> torch.Tensor:
    """The float model's eager logits [calls, vocab] on the gate's feed: what references() computes
    first, for a caller that must release the float weights before the plan's passes (export's
    plan made with release_float), which hands them to references() as float_logits."""
    tokens, prefill, decode = gate_feed(model, lengths, tokenizer_dir)
    spans = prefill + decode
    with widened(model), progress.step(f"eager reference: float model, {len(spans)} calls"):
        return reference_logits(model, tokens, spans, lengths.max_context)


def references(model: Qwen35, lengths: Lengths, plan: QuantPlan, tokenizer_dir: Path | None = None,
               keep_float: bool = True, float_logits: torch.Tensor | None = None) -> References:
    """The eager logits the gate needs for this plan (see the module doc), fed gate_feed's tokens.
    keep_float=False, for a caller with no further use for the float model: the plan's passes
    release its planned weights for good (quant.eager.dequantized); same logits. float_logits:
    float_reference's, computed before the float weights were released (the float pass is then
    not run again)."""
    tokens, prefill, decode = gate_feed(model, lengths, tokenizer_dir)
    max_context = lengths.max_context
    spans = prefill + decode
    quantized = bool(plan.weights)
    gate, floor = gate_for(plan), None
    if float_logits is None:
        float_logits = float_reference(model, lengths, tokenizer_dir)
    with widened(model):  # the model may hold its matrices narrow (memory.py)
        logits = float_logits
        if quantized:
            with (progress.step(f"eager reference: {plan.scheme.name} plan, {len(spans)} calls"),
                  dequantized(model, plan, keep_float=keep_float)):
                logits = reference_logits(model, tokens, spans, max_context)
        if any(weight.activations for weight in plan.weights.values()):
            floor = noise_floor(model, plan, tokens, spans, max_context, logits, keep_float)
            gate = floor.widened(gate)
    return References(tokens, prefill, decode, float_logits, logits, gate, quantized, floor)


def noise_floor(model: Qwen35, plan: QuantPlan, tokens: torch.Tensor, spans: Spans, max_context: int,
                logits: torch.Tensor, keep_float: bool = True) -> NoiseFloor:
    """The plan in eager against itself, its dynamic activations jittered (quant.eager.dequantized,
    which keep_float is passed to): every seed at once, one batch row each, so that a decode step
    reads each weight once for all of them; each call's figures are taken as it comes, so no
    sample's logits are held whole."""
    seeds = torch.arange(FLOOR_SAMPLES)
    kls, relative, agrees = [], [], []
    with (progress.step(f"noise floor: {FLOOR_SAMPLES} jittered passes of the {plan.scheme.name} plan, batched"),
          dequantized(model, plan, jitter=(seeds, FLOOR_ULPS), keep_float=keep_float)):
        batch = tokens.expand(FLOOR_SAMPLES, -1)
        for reference, jittered in zip(logits, fed(model, batch, spans, max_context)):  # jittered [samples, vocab]
            kls.append(position_kls(reference, jittered))
            relative.append((jittered - reference).norm(dim=-1) / reference.norm())
            agrees.append(jittered.argmax(-1) == reference.argmax())
    kls, relative, agrees = (torch.stack(values, dim=1) for values in (kls, relative, agrees))  # [samples, calls]
    return NoiseFloor(relative.max(1).values.tolist(), agrees.float().mean(1).tolist(), kls.mean(1).tolist(),
                      worst_positions_kl(kls).tolist(), len(spans))


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
    kls = position_kls(reference, first)
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
        mean_kl=kls.mean().item(),
        max_mean_kl=gate.max_mean_kl,
        worst_positions_kl=worst_positions_kl(kls).item(),
        max_worst_positions_kl=gate.max_worst_positions_kl,
        noise_floor=None if refs.noise_floor is None else refs.noise_floor.to_manifest(),
    )


def gate_artifact(backend: Backend, directory: Path, manifest: dict, refs: References, plan: QuantPlan) -> dict:
    """The gate: the plan's weights looked up in the artifact (where the backend can), then the
    artifact run through every runtime the backend declares, in order, stopping at the first
    that fails (the artifact is refused either way). Each runtime's loaded artifact is
    released before the next loads: at the 0.8B shape one LiteRT interpreter holds GiBs.

    Returns the manifest's `parity`: the first runtime's figures at the top level (what
    `verify` prints), every runtime's under `runtimes`, the weight check under `weights`, and
    `passed` only when the weights are as planned and every runtime was measured and passed."""
    weights = check_weights(backend, directory, manifest, plan)
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
        "passed": not weights.get("differ") and list(results) == list(backend.runtimes)
        and all(p.passed for p in results.values()),
        "runtimes": {name: parity.to_manifest() for name, parity in results.items()},
        "weights": weights,
    }


def check_weights(backend: Backend, directory: Path, manifest: dict, plan: QuantPlan) -> dict:
    """{"checked": how many planned weights, "differ": those the artifact does not hold as planned},
    or {"checked": 0, ...} with the reason when there is nothing to check or the backend cannot look."""
    if not plan.weights:
        return {"checked": 0, "note": "float weights: nothing planned to look up"}
    with progress.step(f"weights: {len(plan.weights)} planned weights looked up in the artifact"):
        missing = backend.missing_weights(directory, manifest, plan)
    # what it read back is freed but stays in glibc's heap (1.4 GB for the 2B Core ML package,
    # measured alone), under the runtime that loads the artifact next
    return_freed_memory()
    if missing is None:
        return {"checked": 0, "note": f"the {backend.spec.name} backend cannot read its artifact's weights back"}
    return {"checked": len(plan.weights), "differ": missing}


def require_parity(backend: Backend, directory: Path, manifest: dict, refs: References, plan: QuantPlan) -> dict:
    """gate_artifact, refusing the artifact with a one-line error naming the runtime that disagrees."""
    parity = gate_artifact(backend, directory, manifest, refs, plan)
    if parity["weights"].get("differ"):
        names = parity["weights"]["differ"]
        raise QwenMobileError(
            f"{manifest['artifact']}: does not hold the plan's integers and scales for {names[0]}"
            + (f" and {len(names) - 1} more weights" if len(names) > 1 else "")
        )
    for runtime, result in parity["runtimes"].items():
        if not result["passed"]:
            summary = Parity.from_manifest(result).summary()
            raise QwenMobileError(
                f"{manifest['artifact']}: the {backend.spec.name} runtime ({runtime}) disagrees with the eager "
                f"model: {summary}"
            )
    return parity
