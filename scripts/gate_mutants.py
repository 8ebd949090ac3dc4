"""Wrong programs the parity gate must refuse, beside the right one it must pass, with each one's
measured distance next to the bar.

    python scripts/gate_mutants.py BUNDLE [--source MODEL] [--float-effects | --correct-samples N]

BUNDLE is a quantized ExecuTorch bundle (`qwen-mobile export MODEL -q 8da4w`, `--no-gate` at
scales where it is slow); MODEL its checkpoint (the embedded model if omitted). Two kinds of
mutant:

- weight mutants: the bundle's own .pte with bytes edited where the lowering stored a planned
  weight (one linear's group scales off by 3%, two int4 values of one group swapped, one
  embedding row negated, one lm_head block's scales off by half). The weight check must name
  the weight; the numeric distance is reported beside it (the noise floor hides most of them,
  which is why the weights are looked up at all).
- structural mutants: the plan in eager with one thing wrong (a layer's recurrent state never
  reset, the conv state shifted by one token, rotary theta doubled, the partial-rotary split
  halved, one KV slot written one position off), run as a Runner through the gate's own
  comparison. Every one must fail the numeric gate. The correct program (the plan in eager,
  its activations rounded by a differently seeded jitter, as another kernel would) must pass.

--correct-samples N measures the other side at scale: N more right programs (the plan in eager,
rounded by N more seeds) against the bars, and how many each bar refuses.

tests/test_gate_mutants.py runs this at the embedded model's shape in CI; docs/parity.md has the
tables at the 0.8B shape.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from qwen_mobile import progress
from qwen_mobile.bundle import lengths_of, load_source, read_manifest
from qwen_mobile.generate import eager_step
from qwen_mobile.models import qwen3_5 as model_file
from qwen_mobile.parity import WORST_POSITIONS, Parity, compare, gate_artifact, references
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import QuantPlan, resolve_scheme
from qwen_mobile.registry import Runner
from qwen_mobile.swaps import ModuleSwap, swapped

SCALE_FACTOR = 1.03
SCALED = "layers.1.linear_attn.out_proj.weight"
KV_SLOT_POSITION = 70


# ---------------------------------------------------------------- weight mutants (bytes of the .pte)

def edit_pte(pte: Path, old: bytes, new: bytes) -> None:
    from qwen_mobile.backends.executorch.weights import offsets_of

    (offset,) = offsets_of(pte, [old])
    data = bytearray(pte.read_bytes())
    assert offset is not None, "the planned bytes are not in the program"
    data[offset : offset + len(new)] = new
    pte.write_bytes(bytes(data))


def weight_mutants(plan) -> dict:
    """name -> (planned weight, the plan with that weight changed), one per mutant."""
    def changed(name, **fields):
        return name, dataclasses.replace(plan.weights[name], **fields)

    scaled = plan.weights[SCALED]
    swapped_q = scaled.qdata.clone()
    row = int((scaled.qdata[:, 0] != scaled.qdata[:, 1]).nonzero()[0])
    swapped_q[row, 0], swapped_q[row, 1] = scaled.qdata[row, 1], scaled.qdata[row, 0]
    embedding = plan.weights["embed_tokens.weight"]
    negated = embedding.qdata.clone()
    negated[100] = (-negated[100]).clamp(embedding.qmin, embedding.qmax)
    head = plan.weights["lm_head.weight"]
    halved = head.scale.clone()
    halved[200, 0] = halved[200, 0] / 2
    return {
        f"scales x{SCALE_FACTOR} in {SCALED}": changed(SCALED, scale=(scaled.scale * SCALE_FACTOR).bfloat16().float()),
        "two int4 values of one group swapped": changed(SCALED, qdata=swapped_q),
        "one embedding row negated": changed("embed_tokens.weight", qdata=negated),
        "one lm_head block's scales halved": changed("lm_head.weight", scale=halved),
    }


def run_weight_mutant(bundle: Path, manifest: dict, backend, plan, refs, name: str, mutant, work: Path) -> dict:
    from qwen_mobile.backends.executorch.weights import expected_blobs

    copied = work / "mutant"
    shutil.rmtree(copied, ignore_errors=True)
    shutil.copytree(bundle, copied)
    planned = plan.weights[name]
    for old, new in zip(expected_blobs(name, planned), expected_blobs(name, mutant)):
        if old != new:
            edit_pte(copied / manifest["artifact"], old, new)
    return gate_artifact(backend, copied, manifest, refs, plan)


# ---------------------------------------------------------------- structural mutants (eager runners)

class NeverReset(model_file.GatedDeltaNet):
    """A Gated DeltaNet layer whose recurrent and conv state survive a new sequence."""

    carried = None
    at_start = False

    def forward(self, x, state, valid=None, length=None):
        if self.at_start and self.carried is not None:
            state = self.carried
        out, state = super().forward(x, state, valid, length)
        self.carried = state
        return out, state


class ShiftedConvState(model_file.GatedDeltaNet):
    def causal_conv(self, mixed, conv_state, length=None):
        out, new = super().causal_conv(mixed, conv_state, length)
        return out, torch.roll(new, 1, dims=-1)


class SlotOneOff(model_file.CacheAttention):
    def forward(self, query, key, value, positions, cache, valid=None):
        if positions.shape[0] == 1 and int(positions[0]) == KV_SLOT_POSITION:
            keys, values = (model_file.write_slots(c, new, positions + 1, valid) for c, new in zip(cache, (key, value)))
            return self.attend(query, keys, values, positions), model_file.KVState(keys, values)
        return super().forward(query, key, value, positions, cache, valid)


def retyped(cls):
    def make(original):
        mutant = copy.copy(original)
        mutant.__class__ = cls
        return mutant

    return make


def with_fields(**fields):
    def make(original):
        mutant = copy.copy(original)
        for name, value in fields.items():
            setattr(mutant, name, value(mutant) if callable(value) else value)
        return mutant

    return make


def structural_mutants(config) -> dict:
    first_linear = next(i for i, t in enumerate(config.layer_types) if t == model_file.LINEAR_ATTENTION)
    return {
        f"layer {first_linear}'s state not reset at input_pos 0": ("never_reset", first_linear),
        "conv state shifted by one token": (ModuleSwap(model_file.GatedDeltaNet, retyped(ShiftedConvState), ""),),
        "rotary theta doubled": (ModuleSwap(model_file.RotaryEmbedding, with_fields(theta=lambda m: m.theta * 2), ""),),
        "partial-rotary split halved": (
            ModuleSwap(model_file.RotaryEmbedding, with_fields(dim=lambda m: m.dim // 2), ""),
            ModuleSwap(model_file.GatedAttention, with_fields(rotary_dim=lambda m: m.rotary_dim // 2), ""),
        ),
        f"KV slot of position {KV_SLOT_POSITION} written one off": (
            ModuleSwap(model_file.CacheAttention, retyped(SlotOneOff), ""),),
    }


def eager_runner(model, max_context: int, max_chunk: int, on_start=None) -> Runner:
    step = eager_step(model, max_context)

    def call(tokens, start):
        if on_start:
            on_start(start == 0)
        return step(tokens, start)

    return Runner(call, max_context, max_chunk)


def run_structural(model, plan, refs, lengths, mutant) -> dict:
    with dequantized(model, plan):
        if mutant[0] == "never_reset":
            layer = model.layers[mutant[1]]
            original = layer.linear_attn
            layer.linear_attn = retyped(NeverReset)(original)
            try:
                runner = eager_runner(model, lengths.max_context, lengths.max_chunk,
                                      on_start=lambda start: setattr(layer.linear_attn, "at_start", start))
                return compare(runner, refs).to_manifest()
            finally:
                layer.linear_attn = original
        with swapped(model, mutant):
            return compare(eager_runner(model, lengths.max_context, lengths.max_chunk), refs).to_manifest()


CORRECT_SEED = 1000  # the floor uses seeds 0 to FLOOR_SAMPLES - 1


def run_correct(model, plan, refs, lengths, seed: int = CORRECT_SEED) -> dict:
    """The right program computed another way: the plan in eager, its dynamic activations rounded
    as a differently seeded kernel would (seeds the floor did not use)."""
    with dequantized(model, plan, jitter=(seed, 2.0)):
        return compare(eager_runner(model, lengths.max_context, lengths.max_chunk), refs).to_manifest()


def correct_samples(bundle: Path, source: str | None, count: int) -> list[dict]:
    """`count` more right programs (the plan in eager, each rounded by another seed) against the
    gate's bars from the floor: how often each bar refuses a right program, measured."""
    manifest, _ = read_manifest(bundle)
    loaded, plan = load_source(bundle, manifest, source)
    model, lengths = loaded.model, lengths_of(manifest)
    refs = references(model, lengths, plan, tokenizer_dir=bundle)
    rows = []
    for seed in range(CORRECT_SEED, CORRECT_SEED + count):
        result = run_correct(model, plan, refs, lengths, seed)
        rows.append({"seed": seed, **summary(result), "refused_by": Parity.from_manifest(result).refused_by()})
    return rows


# ---------------------------------------------------------------- the table

def measure_all(bundle: Path, source: str | None = None) -> list[dict]:
    manifest, spec = read_manifest(bundle)
    loaded, plan = load_source(bundle, manifest, source)
    model, lengths = loaded.model, lengths_of(manifest)
    refs = references(model, lengths, plan, tokenizer_dir=bundle)  # once: every mutant is measured against them
    backend = spec.load()
    rows = [{"mutant": "none: the bundle as written", "kind": "artifact", "expect": "pass",
             **summary(gate_artifact(backend, bundle, manifest, refs, plan))},
            {"mutant": "none: the plan in eager, other activation rounding", "kind": "eager", "expect": "pass",
             **summary(run_correct(model, plan, refs, lengths))}]
    with tempfile.TemporaryDirectory() as work:
        for label, (name, mutant) in weight_mutants(plan).items():
            result = run_weight_mutant(bundle, manifest, backend, plan, refs, name, mutant, Path(work))
            rows.append({"mutant": label, "kind": "artifact", "expect": "refuse", **summary(result)})
    for label, mutant in structural_mutants(model.config).items():
        rows.append({"mutant": label, "kind": "eager", "expect": "refuse",
                     **summary(run_structural(model, plan, refs, lengths, mutant))})
    return rows


def float_effects(bundle: Path, source: str | None = None) -> list[dict]:
    """Each structural fault's whole effect, no quantization anywhere: the float model against
    the float model with the fault, fed the gate's tokens as the gate feeds them. Set beside the
    scheme's noise floor, it says whether any logit comparison could see the fault on this
    checkpoint. The unreset state is left out: a single pass from position 0 cannot show it."""
    from qwen_mobile.parity import mean_kl, position_kls, reference_logits, relative_diff, top1_agreement

    manifest, _ = read_manifest(bundle)
    loaded, _ = load_source(bundle, manifest, source)
    model, lengths = loaded.model, lengths_of(manifest)
    refs = references(model, lengths, QuantPlan(resolve_scheme("fp32"), {}), tokenizer_dir=bundle)
    rows = []
    for label, mutant in structural_mutants(model.config).items():
        if mutant[0] == "never_reset":
            continue
        with swapped(model, mutant):
            faulty = reference_logits(model, refs.tokens, refs.spans, lengths.max_context)
        rows.append({"fault": label, "mean_kl": mean_kl(refs.float_logits, faulty),
                     "worst_kl": position_kls(refs.float_logits, faulty).max().item(),
                     "relative_diff": relative_diff(refs.float_logits, faulty),
                     "top1_agreement": top1_agreement(refs.float_logits, faulty)})
    return rows


def summary(parity: dict) -> dict:
    return {key: parity.get(key) for key in ("passed", "relative_diff", "max_relative_diff", "top1_agreement",
                                            "min_top1", "mean_kl", "max_mean_kl", "worst_positions_kl",
                                            "max_worst_positions_kl", "reset_max_abs_diff", "reset_allowed")} | {
        "weights_differ": (parity.get("weights") or {}).get("differ")}


def print_step(name: str, seconds: float | None) -> None:
    if seconds is not None:
        print(f"  {name} {seconds:.1f} s", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    with progress.reporting(print_step):  # each step's time on stderr: minutes each at 0.8B
        return measure_and_print(argv)


def measure_and_print(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--source")
    parser.add_argument("--float-effects", action="store_true",
                        help="instead: each structural fault's effect on the float model (float_effects)")
    parser.add_argument("--correct-samples", type=int, metavar="N",
                        help="instead: N more right programs against the bars (correct_samples)")
    args = parser.parse_args(argv)
    if args.correct_samples:
        rows = correct_samples(args.bundle, args.source, args.correct_samples)
        print(f"| seed | relative diff | top-1 | mean KL | KL, {WORST_POSITIONS} worst positions | refused by |")
        print("| --- | --- | --- | --- | --- | --- |")
        for row in rows:
            print(f"| {row['seed']} | {row['relative_diff']:.4f} | {row['top1_agreement']:.3f} | {row['mean_kl']:.2e} "
                  f"| {row['worst_positions_kl']:.2e} | {', '.join(row['refused_by']) or '-'} |")
        first = rows[0]
        print(f"bars: relative {first['max_relative_diff']:.4f}, top-1 {first['min_top1']:.3f}, mean KL "
              f"{first['max_mean_kl']:.2e}, KL at the {WORST_POSITIONS} worst positions "
              f"{first['max_worst_positions_kl']:.2e}")
        refusals = Counter(check for row in rows for check in row["refused_by"])
        print(f"refused by any check: {sum(bool(row['refused_by']) for row in rows)} of {len(rows)} right programs"
              + "".join(f"; {check} {count}" for check, count in refusals.items()))
        return 0
    if args.float_effects:
        print("| fault, float model against float model | mean KL | worst position's KL | relative | top-1 |")
        print("| --- | --- | --- | --- | --- |")
        for row in float_effects(args.bundle, args.source):
            print(f"| {row['fault']} | {row['mean_kl']:.2e} | {row['worst_kl']:.2e} | {row['relative_diff']:.3f} "
                  f"| {row['top1_agreement']:.2f} |")
        return 0
    rows = measure_all(args.bundle, args.source)
    print("| mutant | expected | gate | relative diff (bar) | top-1 (bar) | mean KL (bar) "
          f"| KL, {WORST_POSITIONS} worst positions (bar) "
          "| after reset (allowed) | weights differ |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['mutant']} | {row['expect']} | {'pass' if row['passed'] else 'refused'} "
              f"| {row['relative_diff']:.4f} ({row['max_relative_diff']:.4f}) | {row['top1_agreement']:.3f} "
              f"({row['min_top1']:.3f}) | {row['mean_kl']:.2e} ({row['max_mean_kl']:.2e}) "
              f"| {row['worst_positions_kl']:.2e} ({row['max_worst_positions_kl']:.2e}) "
              f"| {row['reset_max_abs_diff']:.3g} "
              f"({row['reset_allowed']:.3g}) | {', '.join(row['weights_differ'] or []) or '-'} |")
    wrong = [row["mutant"] for row in rows if (row["expect"] == "pass") != bool(row["passed"])]
    if wrong:
        print("the gate decided wrongly on: " + "; ".join(wrong), file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
