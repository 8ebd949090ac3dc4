"""The measurements in docs/quantization-calibration.md, reproducible:

    python calibration/measure.py quality [--calibration default] [--json out.json]
        the embedded model on the held-out split: float, RTN, GPTQ and auto mixed precision
        (perplexity, its increase over float, mean KL and top-1 agreement vs float, plan bytes)
    python calibration/measure.py cost CHECKPOINT [--samples 128] [--max-tokens 512]
        the time of a GPTQ plan of CHECKPOINT (run it under /usr/bin/time -v for peak memory)

Quality is measured as qwen_mobile.evaluate.perplexity does: the held-out split under the
checkpoint's tokenizer, in non-overlapping windows of 256 tokens, each a fresh sequence from
position 0; KL and top-1 compare every position's next-token distribution with the float
model's. Calibration never sees the held-out text (tests/test_calibration.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_mobile.checkpoint import EMBEDDED_MODEL, load
from qwen_mobile.corpus import load_corpus, split_corpus
from qwen_mobile.generate import load_tokenizer
from qwen_mobile.quant.calibrate import DEFAULT_MAX_SAMPLES, DEFAULT_MAX_TOKENS, DEFAULT_SET, load_calibration
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.gptq import calibration_logits, gptq_plan
from qwen_mobile.quant.mixed import mixed_plan, plan_bytes
from qwen_mobile.quant.plan import make_plan, resolve_scheme

WINDOW = 256


def held_out_windows(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(split_corpus(load_corpus())[1], add_special_tokens=False)
    return [ids[s : s + WINDOW + 1] for s in range(0, len(ids) - 1, WINDOW) if len(ids[s : s + WINDOW + 1]) > 1]


@torch.no_grad()
def log_probs(model, windows) -> list[torch.Tensor]:
    return [calibration_logits(model, w[:-1]).log_softmax(-1) for w in windows]


@torch.no_grad()
def quality(model, windows, reference, plan=None) -> dict:
    nll = kl = top1 = count = 0.0
    context = dequantized(model, plan) if plan is not None and plan.weights else None
    if context:
        context.__enter__()
    try:
        for window, ref in zip(windows, reference):
            lp = ref if plan is None else calibration_logits(model, window[:-1]).log_softmax(-1)
            target = torch.tensor(window[1:])
            nll += -lp.gather(1, target[:, None]).sum().item()
            kl += (ref.exp() * (ref - lp)).sum().item()
            top1 += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
            count += len(target)
    finally:
        if context:
            context.__exit__(None, None, None)
    return {"perplexity": math.exp(nll / count), "mean_kl": kl / count, "top1": top1 / count, "tokens": int(count)}


def run_quality(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = load(None).model.eval()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    scheme = resolve_scheme(args.quant)
    windows = held_out_windows(tokenizer)
    reference = log_probs(model, windows)
    rows = [{"plan": "float", **quality(model, windows, reference), "bytes": None, "seconds": 0.0}]

    def done(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sensitivity"}), file=sys.stderr, flush=True)

    base = make_plan(model, scheme)
    done({"plan": f"RTN {args.quant} g{scheme.group_size}", **quality(model, windows, reference, base),
          "bytes": plan_bytes(base), "seconds": 0.0})
    for name in args.calibration:
        samples = load_calibration(name, tokenizer, DEFAULT_MAX_SAMPLES, DEFAULT_MAX_TOKENS)
        started = time.perf_counter()
        plan = gptq_plan(model, scheme, samples)
        seconds = time.perf_counter() - started
        done({"plan": f"GPTQ ({name})", **quality(model, windows, reference, plan),
              "bytes": plan_bytes(plan), "seconds": seconds})
        if args.auto:
            for method in ("gptq", "rtn"):
                started = time.perf_counter()
                mixed = mixed_plan(model, scheme, samples, method=method, keep_8bit="auto")
                seconds = time.perf_counter() - started
                record = mixed.calibration["keep_8bit"]
                done({"plan": f"{method.upper()} + auto 8-bit ({name})", **quality(model, windows, reference, mixed),
                      "bytes": plan_bytes(mixed), "seconds": seconds, "kept": record["kept"],
                      "sensitivity": record["sensitivity"]})
        print(f"measured with calibration set {name}", file=sys.stderr, flush=True)
    float_ppl, rtn_increase = rows[0]["perplexity"], rows[1]["perplexity"] - rows[0]["perplexity"]
    print("| plan | perplexity | increase | cut vs RTN | mean KL | top-1 | plan bytes | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        increase = row["perplexity"] - float_ppl
        cut = "" if row["plan"] == "float" else f"{1 - increase / rtn_increase:+.0%}"
        size = "" if row["bytes"] is None else f"{row['bytes']:,}"
        print(f"| {row['plan']} | {row['perplexity']:.3f} | {increase:+.3f} | {cut} | {row['mean_kl']:.4f} | "
              f"{row['top1']:.3f} | {size} | {row['seconds']:.0f} |")
    for row in rows:
        if "kept" in row:
            print(f"{row['plan']} kept: " + ", ".join(f"{n} (KL {k['kl_at_4bit']:.5f}, +{k['added_bytes']:,} B)"
                                                     for n, k in row["kept"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def run_cost(args) -> None:
    from qwen_mobile import progress

    torch.set_num_threads(args.threads)
    begun = time.perf_counter()

    def listen(step: str, seconds: float | None) -> None:
        if seconds is not None:
            print(f"[{time.perf_counter() - begun:7.1f} s] {step}: {seconds:.1f} s", file=sys.stderr, flush=True)

    started = time.perf_counter()
    loaded = load(args.checkpoint)
    tokenizer = load_tokenizer(loaded.checkpoint.path)
    samples = load_calibration(args.calibration, tokenizer, args.samples, args.max_tokens)
    loading = time.perf_counter() - started
    started = time.perf_counter()
    with progress.reporting(listen):
        plan = gptq_plan(loaded.model.eval(), resolve_scheme(args.quant), samples)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "checkpoint": args.checkpoint, "samples": len(samples), "tokens": sum(map(len, samples)),
        "load_seconds": round(loading, 1), "gptq_seconds": round(seconds, 1), "weights": len(plan.weights),
        "plan_bytes": plan_bytes(plan), "threads": torch.get_num_threads(),
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quality")
    q.add_argument("--calibration", nargs="+", default=[DEFAULT_SET])
    q.add_argument("--quant", default="int4")
    q.add_argument("--no-auto", dest="auto", action="store_false")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--json")
    c = commands.add_parser("cost")
    c.add_argument("checkpoint")
    c.add_argument("--calibration", default=DEFAULT_SET)
    c.add_argument("--samples", type=int, default=DEFAULT_MAX_SAMPLES)
    c.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    c.add_argument("--quant", default="int4")
    c.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run_quality(args) if args.command == "quality" else run_cost(args)


if __name__ == "__main__":
    main()
