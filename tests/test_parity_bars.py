"""The quantized gate's top-1 bar (parity.top1_bar) as a statistical test: simulated correct
programs, whose per-position argmax flips come from the same near-tie probabilities as the
noise floor's samples, are refused at most at the stated rate, while programs that flip at a
clearly higher rate are refused; and the bar moves the right way with the floor."""

import random

import pytest
import torch

from qwen_mobile.parity import FALSE_REFUSAL, FLOOR_SAMPLES, Parity, top1_bar
from qwen_mobile.quant.eager import _perturbed

POSITIONS = 100
TRIALS = 20_000


def flip_profile(kind: str, rng: random.Random) -> list[float]:
    """Per-position flip probabilities: a peaked model (few near-ties), a flat one (many), none."""
    if kind == "none":
        return [0.0] * POSITIONS
    if kind == "peaked":
        return [0.4 if rng.random() < 0.03 else 0.0 for _ in range(POSITIONS)]
    return [rng.uniform(0.2, 0.6) if rng.random() < 0.4 else 0.01 for _ in range(POSITIONS)]


def agreement(flips: list[float], rng: random.Random, extra: float = 0.0) -> float:
    return sum(rng.random() >= min(1.0, p + extra) for p in flips) / POSITIONS


def refusals(kind: str, extra: float, seed: int) -> float:
    rng = random.Random(seed)
    profile = flip_profile(kind, rng)
    bars: dict[tuple, float] = {}
    refused = 0
    for _ in range(TRIALS):
        floor = tuple(sorted(agreement(profile, rng) for _ in range(FLOOR_SAMPLES)))
        bar = bars.setdefault(floor, min(0.99, top1_bar(list(floor), POSITIONS)))
        refused += agreement(profile, rng, extra) < bar
    return refused / TRIALS


@pytest.mark.parametrize("kind", ["none", "peaked", "flat"])
def test_a_correct_program_is_refused_at_most_at_the_stated_rate(kind):
    # Monte Carlo: 20,000 trials at 1e-3 would expect 20; the binomial bound is conservative, so fewer
    assert refusals(kind, 0.0, seed=1) <= 2 * FALSE_REFUSAL


# the top-1 bar is the coarse check (the mean KL bar is the sensitive one): measured, it refuses
# nine in ten programs that flip 15 (no near-ties), 20 (a few) or 30 (many) more positions in 100
@pytest.mark.parametrize("kind,extra", [("none", 0.15), ("peaked", 0.2), ("flat", 0.3)])
def test_a_program_flipping_more_often_than_its_floor_is_refused(kind, extra):
    assert refusals(kind, extra, seed=2) > 0.9


def test_the_bar_falls_as_the_floor_flips_more_and_never_leaves_zero_to_one():
    bars = [top1_bar([1 - flips / POSITIONS] * FLOOR_SAMPLES, POSITIONS) for flips in range(0, POSITIONS + 1, 5)]
    assert all(a >= b for a, b in zip(bars, bars[1:])) and 0.85 < bars[0] < 1 and bars[-1] == 0
    # more positions compared, less relative slack for the same flip rate
    assert top1_bar([0.9] * FLOOR_SAMPLES, 400) > top1_bar([0.9] * FLOOR_SAMPLES, 100)


def test_the_batched_floor_rounds_each_row_as_its_own_seed_would():
    # parity.noise_floor runs every seed as one batch row: row i must be jittered exactly as a
    # pass of its own with seed i, or the batched floor would measure something else
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    rows = _perturbed(x, torch.tensor([0, 7, 1000]), 2.0)
    for row, seed in enumerate((0, 7, 1000)):
        assert torch.equal(rows[row], _perturbed(x[row : row + 1], seed, 2.0)[0])
    assert not torch.equal(rows[0], rows[1]) and (rows - x).abs().max() <= 2.0 * 2**-23 * x.abs().max()


def test_each_failed_check_is_named_and_a_nan_fails_its_check():
    figures = dict(reference="plan", max_abs_diff=1.0, reference_std=1.0, ratio_to_std=1.0, tolerance=None,
                   relative_diff=0.1, max_relative_diff=0.2, top1_agreement=0.9, min_top1=0.8, positions_checked=100,
                   tokens_fed=100, prefill_chunks=[40, 17, 7], decode_steps=97, reset_max_abs_diff=0.0,
                   reset_allowed=1e-3, versus_float=None, mean_kl=1e-3, max_mean_kl=2e-3, worst_positions_kl=5e-3,
                   max_worst_positions_kl=4e-3, noise_floor=None)
    parity = Parity(**figures)
    assert parity.refused_by() == ["worst positions' KL"] and not parity.passed
    assert Parity.from_manifest({**parity.to_manifest(), "runtimes": {}}) == parity
    nan = Parity(**{**figures, "worst_positions_kl": 0.0, "mean_kl": float("nan")})
    assert nan.refused_by() == ["mean KL"] and not nan.passed
    assert Parity(**{**figures, "worst_positions_kl": 0.0}).passed
