"""Prefill and decode latency of bundles, side by side, through their backends' runtimes.

    python benchmarks/compare_bundles.py BUNDLE [BUNDLE ...]

Each figure is the median of --repeats runs after one warm-up, all bundles measured in
the same process so that the ratios between them hold on a noisy machine. Decode at
position P is the time of one step fed after a prefill that filled P slots.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

from qwen_mobile.bundle import open_runner

PREFILL = 128
DECODE_POSITIONS = (128, 1024, 2000)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1e3


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    return statistics.median(timed(function) for _ in range(repeats))


def measure(bundle: Path, repeats: int) -> dict[str, float]:
    runner, _ = open_runner(bundle)
    tokens = [(7 * i) % 1000 + 3 for i in range(max(DECODE_POSITIONS) + 1)]

    def prefill_in_chunks(length: int) -> None:
        for start in range(0, length, runner.max_chunk):
            runner.step(tokens[start : min(start + runner.max_chunk, length)], start)

    figures = {
        f"prefill {PREFILL} (chunked calls) ms": median_ms(lambda: prefill_in_chunks(PREFILL), repeats),
        f"{PREFILL} decode calls ms": median_ms(
            lambda: [runner.step([tokens[p]], p) for p in range(PREFILL)], repeats
        ),
    }
    for position in DECODE_POSITIONS:
        prefill_in_chunks(position)
        figures[f"decode step at {position} ms"] = median_ms(lambda: runner.step([tokens[position]], position), repeats)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {bundle: measure(bundle, args.repeats) for bundle in args.bundles}
    names = list(next(iter(results.values())))
    print("| figure | " + " | ".join(str(b) for b in results) + " |")
    print("| --- |" + " --- |" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[name]:.2f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
