"""Where a decode step's time goes in an ExecuTorch program: ETDump events, summed by name.

    python benchmarks/profile_etdump.py MODEL.pte [--position 128] [--steps 16] [--chunk 0]

Loads the program with ETDump enabled (ExecuTorch's devtools), feeds one untimed
prefill-free warm-up step and then --steps one-token calls at --position onward (or
calls of --chunk tokens, when given, to profile prefill), and prints each event name's
time per call and its share of the top-level time. Events nest: DELEGATE_CALL (every
XNNPACK subgraph call) holds XNNPACK's own events (Fully Connected, Multiply, ...), and
OPERATOR_CALL (every non-delegated operator) holds native_call_* (portable operators and
the llama:: kernels); the top-level time is DELEGATE_CALL + OPERATOR_CALL. No ETRecord is
needed: the names are the runtime's own.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import torch


def profile(pte: Path, position: int, steps: int, chunk: int) -> list[tuple[str, float, int]]:
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    from qwen_mobile.backends.executorch.runtime import register_llama_kernels

    register_llama_kernels()
    program = Runtime.get().load_program(pte, enable_etdump=True, debug_buffer_size=0)
    method = program.load_method("forward")
    length = max(chunk, 1)
    for step in range(steps + 1):
        start = position + step * length
        tokens = torch.tensor([[(7919 * (start + i) + 11) % 1000 for i in range(length)]])
        method.execute((tokens, torch.tensor([start], dtype=torch.long)))
    with tempfile.TemporaryDirectory() as directory:
        etdump = Path(directory) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(directory) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for block in inspector.event_blocks[1:] if len(inspector.event_blocks) > 1 else inspector.event_blocks:
        for event in block.events:  # the first block is the warm-up call
            if not event.perf_data:
                continue
            name = event.name
            if name in ("Method::execute", "Program::load_method"):
                continue
            totals[name] += sum(event.perf_data.raw)
            counts[name] += len(event.perf_data.raw)
    return sorted(((n, t, counts[n]) for n, t in totals.items()), key=lambda item: -item[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pte", type=Path)
    parser.add_argument("--position", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=0, help="Tokens per call (0: decode, one token)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = profile(args.pte, args.position, args.steps, args.chunk)
    total = sum(t for name, t, _ in rows if name in ("DELEGATE_CALL", "OPERATOR_CALL"))
    print(f"{args.pte}: {args.steps} calls of {max(args.chunk, 1)} token(s) from position {args.position}; "
          f"{total / args.steps:.2f} ms per call in top-level events (DELEGATE_CALL + OPERATOR_CALL)")
    print("| event | ms per call | share of top level | events per call |")
    print("| --- | ---: | ---: | ---: |")
    for name, spent, count in rows[: args.top]:
        print(f"| {name} | {spent / args.steps:.3f} | {spent / total:.1%} | {count / args.steps:.0f} |")


if __name__ == "__main__":
    main()
