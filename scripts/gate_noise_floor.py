"""How far the quantized gate's own reference moves when only the kernel shapes change.

Feeds a plan's eager model the gate's held-out tokens twice: as the gate's prefill chunks
then decode steps, and token by token up to the same positions (the same math, other
matmul shapes and summation orders). Their distance is the floor under which no runtime
can be held: `python scripts/gate_noise_floor.py [MODEL] [--quant 8da4w] [--decode 97]`.
"""

from __future__ import annotations

import argparse

import torch

from qwen_mobile import parity
from qwen_mobile.checkpoint import load
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import make_plan, resolve_scheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory [default: the embedded model]")
    parser.add_argument("--quant", default="8da4w")
    parser.add_argument("--decode", type=int, default=parity.DECODE_STEPS, help="decode steps compared")
    args = parser.parse_args()

    loaded = load(args.model)
    model = loaded.model
    plan = make_plan(model, resolve_scheme(args.quant))
    prefill, decode = parity.feeding_plan(max_context=4096, max_seq_len=128)
    chunked = prefill + decode[: args.decode]
    prefill_end = prefill[-1][1]
    token_by_token = [(p, p + 1) for p in range(prefill_end)] + decode[: args.decode]
    tokens = parity.held_out_tokens(loaded.checkpoint.path, chunked[-1][1], model.config.vocab_size)

    with torch.no_grad(), dequantized(model, plan):
        a = parity.reference_logits(model, tokens, chunked, 4096)
        b = parity.reference_logits(model, tokens, token_by_token, 4096)
    compared = [end - 1 for _, end in prefill] + list(range(prefill_end, b.shape[0]))
    b = b[compared]
    print(
        f"{args.quant} plan in eager, chunked vs token by token over {len(compared)} positions: "
        f"relative difference {parity.relative_diff(a, b):.4g}, "
        f"max|diff| {((a - b).abs().max() / a.std()).item():.4g} x std, top-1 {parity.top1_agreement(a, b):.3f}"
    )


if __name__ == "__main__":
    main()
