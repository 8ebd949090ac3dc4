"""The plan's integers and scales, found in a written .pte exactly as the lowering stores them.

Written by hand: ExecuTorch ships no Python reader for XNNPACK's serialized graph, and its
constants are opaque blobs in the program's data segments. Every constant there starts
16-byte aligned, so each planned weight's expected bytes (in the layout of the kernel that
uses it) are looked up among the file's 16-byte-aligned records and then compared whole:
a scale off by one bf16 step or two swapped int4 values is not found.

Layouts (the same the tests check):
- linears, 4-bit: XNNPACK's blockwise int4, value + 8 as nibbles, even columns in the low
  nibble; scales bf16.
- linears, 8-bit: the int8 rows as they are; scales fp32 (channelwise).
- the embedding: quantized_decomposed::embedding_4bit (value + 8, even columns in the high
  nibble) or embedding_byte (int8 rows); scales fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ALIGNMENT = 16
EMBEDDING = "embed_tokens.weight"


def _nibbles(qdata: torch.Tensor, even_low: bool) -> bytes:
    values = (qdata.to(torch.int16) + 8).to(torch.uint8).reshape(-1)
    low, high = (values[::2], values[1::2]) if even_low else (values[1::2], values[::2])
    return (high << 4 | low).numpy().tobytes()


def expected_blobs(name: str, weight) -> tuple[bytes, bytes]:
    """(integers, scales) as the program stores this planned weight."""
    if name == EMBEDDING:
        integers = _nibbles(weight.qdata, even_low=False) if weight.bits == 4 else weight.qdata.numpy().tobytes()
        return integers, weight.scale.float().numpy().tobytes()
    if weight.bits == 4:
        return _nibbles(weight.qdata, even_low=True), weight.scale.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return weight.qdata.numpy().tobytes(), weight.scale.reshape(-1).float().numpy().tobytes()


def aligned_offsets(data: bytes, blobs: list[bytes]) -> list[int | None]:
    """For each blob, an ALIGNMENT-aligned offset in `data` where it lies whole, or None."""
    usable = len(data) - len(data) % ALIGNMENT
    records = np.frombuffer(data, dtype=np.uint64, count=usable // 8).reshape(-1, 2)
    heads = np.array([np.frombuffer(blob[:ALIGNMENT], dtype=np.uint64) for blob in blobs])
    candidates = np.nonzero(np.isin(records[:, 0], heads[:, 0]))[0]
    found: list[int | None] = []
    for blob, (first, second) in zip(blobs, heads):
        match = candidates[(records[candidates, 0] == first) & (records[candidates, 1] == second)] * ALIGNMENT
        found.append(next((int(offset) for offset in match if data[offset : offset + len(blob)] == blob), None))
    return found


def missing_weights(pte: Path, plan) -> list[str]:
    """The planned weights whose integers or scales the program does not hold exactly."""
    data = Path(pte).read_bytes()
    names, blobs, missing = [], [], set()
    for name, weight in plan.weights.items():
        for blob in expected_blobs(name, weight):
            if len(blob) >= ALIGNMENT:
                names.append(name)
                blobs.append(blob)
            elif blob not in data:  # too short for the aligned lookup: searched anywhere
                missing.add(name)
    offsets = aligned_offsets(data, blobs)
    return sorted(missing | {name for name, offset in zip(names, offsets) if offset is None})
