"""How fast XNNPACK runs one decode-shaped linear under each weight encoding we lower.

    python benchmarks/linear_kernels.py [--rows 248320] [--columns 1024] [--runs 9]

A decode step is mostly matrix-vector products; the 0.8B shape's largest is the tied
lm_head (248,320 x 1,024). This lowers one bias-free linear of that shape through the
ExecuTorch backend's own path (core plan -> torchao tensors -> our XNNPACK partitioner)
for fp32, int8 weight-only and 8da4w at each group size, runs it through the ExecuTorch
runtime with one token, and prints the median call time after a warm-up, the bytes of
weights and scales the call reads, the rate that implies, and that rate as a fraction of
the machine's read bandwidth measured in the same run. It separates kernel efficiency
from everything else in a decode step (portable operators, delegate boundaries).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def lowered_linear(rows: int, columns: int, scheme_name: str, group_size: int | None):
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from qwen_mobile.backends.executorch.partition import xnnpack_partitioner
    from qwen_mobile.backends.executorch.quantize import planned_weights
    from qwen_mobile.quant.plan import make_plan, resolve_scheme

    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(columns, rows, bias=False)})
    plan = make_plan(holder, resolve_scheme(scheme_name, group_size))
    example = torch.randn(1, columns)
    with planned_weights(holder, plan), torch.no_grad():
        program = torch.export.export(holder["proj"], (example,))
    buffer = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()]).to_executorch().buffer
    weight = plan.weights.get("proj.weight")
    if weight is None:
        read = rows * columns * 4
    else:
        read = rows * columns * weight.bits // 8 + weight.scale.numel() * (2 if weight.bits == 4 else 4)
    # the program reads its weights from `buffer` in place: the caller keeps it alive
    return Runtime.get().load_program(buffer).load_method("forward"), buffer, read


def median_call(method, columns: int, runs: int) -> float:
    x = torch.randn(1, columns)
    method.execute([x])  # warm-up: XNNPACK packs weights on first use
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        method.execute([x])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


ENCODINGS = [("fp32", None), ("int8", None), ("8da4w", 32), ("8da4w", 64), ("8da4w", 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=248_320, help="output features (the 0.8B lm_head's)")
    parser.add_argument("--columns", type=int, default=1024, help="input features (the 0.8B hidden size)")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()

    from qwen_mobile.bench import measure_bandwidth

    bandwidth = measure_bandwidth()["read_bytes_per_s"]
    print(f"linear {args.rows} x {args.columns}, one token, {torch.get_num_threads()} threads; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; median of {args.runs} after a warm-up")
    print("| encoding | ms per call | MB read | GB/s | fraction of bandwidth |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for scheme, group in ENCODINGS:
        method, buffer, read = lowered_linear(args.rows, args.columns, scheme, group)
        seconds = median_call(method, args.columns, args.runs)
        del method, buffer
        name = scheme if group is None else f"{scheme} g{group}"
        print(f"| {name} | {seconds * 1e3:.2f} | {read / 1e6:.1f} | {read / seconds / 1e9:.1f} | "
              f"{read / seconds / bandwidth:.0%} |", flush=True)


if __name__ == "__main__":
    main()
