"""Mean KL and top-1 against the float model, on held-out text, of the static-activation plans.

For a8w8 and a16w8 and every --ranges method: the plan's eager model (which computes each
linear as the TFLite integer kernels do, quant/static.py) against the float model, every
position of WINDOWS held-out windows of WINDOW tokens, each a fresh sequence from position 0;
8da8w beside them as the dynamic-activation baseline. The ranges come from one calibration
pass (a8w8 and a16w8 have the same weights, so they see the same activations):
`python scripts/static_activations.py [MODEL] [--samples 128] [--calibration default]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from qwen_mobile import parity
from qwen_mobile.checkpoint import load
from qwen_mobile.corpus import load_corpus, split_corpus
from qwen_mobile.generate import load_tokenizer
from qwen_mobile.quant.calibrate import DEFAULT_MAX_SAMPLES, DEFAULT_SET, load_calibration
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import make_plan, resolve_scheme
from qwen_mobile.quant.static import RANGE_METHODS, collect_ranges, ranges_from

WINDOW, WINDOWS = 256, 4


@torch.no_grad()
def all_logits(model, windows: list[torch.Tensor]) -> torch.Tensor:
    outputs = []
    for window in windows:
        logits, _ = model(window, torch.tensor([0]), model.init_state(WINDOW), all_positions=True)
        outputs.append(logits[0])
    return torch.cat(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory [default: the embedded model]")
    parser.add_argument("--samples", type=int, default=DEFAULT_MAX_SAMPLES, help="calibration samples")
    parser.add_argument("--calibration", default=DEFAULT_SET)
    args = parser.parse_args()

    loaded = load(args.model)
    model, tokenizer = loaded.model, load_tokenizer(loaded.checkpoint.path)
    ids = tokenizer.encode(split_corpus(load_corpus())[1], add_special_tokens=False)[: WINDOW * WINDOWS]
    windows = [torch.tensor([ids[i: i + WINDOW]]) for i in range(0, len(ids), WINDOW)]
    reference = all_logits(model, windows)

    def row(name: str, plan) -> None:
        with dequantized(model, plan):
            logits = all_logits(model, windows)
        print(f"| {name} | {parity.mean_kl(reference, logits):.5f} | {parity.top1_agreement(reference, logits):.4f} |",
              flush=True)

    print(f"{reference.shape[0]} held-out positions ({len(windows)} windows of {WINDOW})\n")
    print("| plan | mean KL vs float (nats) | top-1 vs float |\n| --- | --- | --- |")
    row("8da8w (dynamic per-token int8)", make_plan(model, resolve_scheme("8da8w")))
    samples = load_calibration(args.calibration, tokenizer, args.samples)
    started = time.perf_counter()
    collector = collect_ranges(model, make_plan(model, resolve_scheme("a8w8")), samples)
    collected = time.perf_counter() - started
    for scheme in ("a8w8", "a16w8"):
        plan = make_plan(model, resolve_scheme(scheme))
        for method in RANGE_METHODS:
            started = time.perf_counter()
            plan.activation_ranges = ranges_from(collector, plan, method)
            chosen = time.perf_counter() - started
            row(f"{scheme}, --ranges {method} (ranges: {collected:.0f} s collecting + {chosen:.1f} s choosing)", plan)


if __name__ == "__main__":
    main()
