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

import os
from pathlib import Path

import numpy as np
import torch

ALIGNMENT = 16
SCAN_BYTES = 64 << 20  # a multiple of ALIGNMENT
EMBEDDING = "embed_tokens.weight"


def _nibbles(qdata: torch.Tensor, even_low: bool) -> bytes:
    values = (qdata.to(torch.int16) + 8).to(torch.uint8).reshape(-1)
    low, high = (values[::2], values[1::2]) if even_low else (values[1::2], values[::2])
    return (high << 4 | low).numpy().tobytes()


def expected_blobs(name: str, weight, rows: slice = slice(None)) -> tuple[bytes, bytes]:
    """(integers, scales) as the program stores this planned weight, or the start of them: the
    bytes of `rows` only (the layouts are row-major)."""
    qdata, scale = weight.qdata[rows], weight.scale[rows]
    if name == EMBEDDING:
        integers = _nibbles(qdata, even_low=False) if weight.bits == 4 else qdata.numpy().tobytes()
        return integers, scale.float().numpy().tobytes()
    if weight.bits == 4:
        return _nibbles(qdata, even_low=True), scale.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return qdata.numpy().tobytes(), scale.reshape(-1).float().numpy().tobytes()


def _heads(name: str, weight) -> tuple[bytes, bytes]:
    """The first ALIGNMENT bytes of each expected blob, from the first few rows only."""
    # 2 * ALIGNMENT integers fill ALIGNMENT bytes at 4 bits (more at 8), ALIGNMENT / 2 scales at bf16 or wider
    rows = max(-(-2 * ALIGNMENT // weight.qdata.shape[1]), -(-ALIGNMENT // 2 // weight.scale.shape[1]))
    return tuple(blob[:ALIGNMENT] for blob in expected_blobs(name, weight, slice(0, rows)))


def _aligned_candidates(file, heads: set[bytes]) -> dict[bytes, list[int]]:
    """head -> every ALIGNMENT-aligned offset of the file where it starts, the file read a chunk
    at a time (a 2B program is 1.3 GiB; the whole of it in memory was most of the gate's peak)."""
    if not heads:
        return {}
    firsts = np.unique(np.array([np.frombuffer(head[:8], dtype=np.uint64)[0] for head in heads], dtype=np.uint64))
    found: dict[bytes, list[int]] = {head: [] for head in heads}
    file.seek(0)
    base = 0
    while chunk := file.read(SCAN_BYTES):
        records = np.frombuffer(chunk, dtype=np.uint64, count=len(chunk) // ALIGNMENT * 2).reshape(-1, 2)
        at = np.minimum(np.searchsorted(firsts, records[:, 0]), len(firsts) - 1)
        for record in np.nonzero(firsts[at] == records[:, 0])[0]:
            head = chunk[record * ALIGNMENT : (record + 1) * ALIGNMENT]
            if head in found:
                found[head].append(base + int(record) * ALIGNMENT)
        base += len(chunk)
    return found


def _found_at(file, blob: bytes, candidates: list[int]) -> int | None:
    for offset in candidates:
        if os.pread(file.fileno(), len(blob), offset) == blob:
            return offset
    return None


def _contains(file, blob: bytes) -> bool:
    """Whether the short blob lies anywhere in the file, aligned or not."""
    file.seek(0)
    tail = b""
    while chunk := file.read(SCAN_BYTES):
        if blob in tail + chunk:
            return True
        tail = chunk[-(len(blob) - 1):] if len(blob) > 1 else b""
    return False


def offsets_of(pte: Path, blobs: list[bytes]) -> list[int | None]:
    """For each blob (ALIGNMENT bytes or longer), an aligned offset in the file where it lies whole, or None."""
    with open(pte, "rb") as file:
        found = _aligned_candidates(file, {blob[:ALIGNMENT] for blob in blobs})
        return [_found_at(file, blob, found[blob[:ALIGNMENT]]) for blob in blobs]


def missing_weights(pte: Path, plan) -> list[str]:
    """The planned weights whose integers or scales the program does not hold exactly. The file is
    scanned once for where each expected blob could start; then each weight's blobs are made, one
    weight at a time, and compared whole there."""
    with open(pte, "rb") as file:
        heads = {name: _heads(name, weight) for name, weight in plan.weights.items()}
        found = _aligned_candidates(file, {head for pair in heads.values() for head in pair if len(head) == ALIGNMENT})
        missing = []
        for name, weight in plan.weights.items():
            for blob in expected_blobs(name, weight):
                held = (_found_at(file, blob, found[blob[:ALIGNMENT]]) is not None if len(blob) >= ALIGNMENT
                        else _contains(file, blob))  # too short for the aligned lookup: searched anywhere
                if not held:
                    missing.append(name)
                    break
        return sorted(missing)
