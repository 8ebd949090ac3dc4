"""Random-weight checkpoints at the real Qwen3.5 shapes, for benchmarks and large-shape tests.

Written tensor by tensor (never a whole model in memory) in the Hugging Face layout of
the released checkpoints: Qwen3_5ForConditionalGeneration, bf16, sharded safetensors
with an index. The tokenizer is the embedded model's.

Random weights attend almost uniformly and give nearly flat logits over 248k tokens, so a key
in the wrong slot or a wrong rotary barely moves them (docs/parity.md, "At the 0.8B shape").
`peaked=True` raises the gains of the zero-centred norms that set those two scales, so a
position fault moves the logits as it would on a trained checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from qwen_mobile.checkpoint import EMBEDDED_MODEL
from qwen_mobile.config import Qwen35Config
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.staging import staged_directory

SHAPES_DIR = Path(__file__).resolve().parent / "assets" / "shapes"
SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The peaked fixture's (1 + w) gains: q and k each at 2 make q.k / sqrt(head_dim) std ~4 instead
# of ~1 (their rows have unit RMS after the norm); the final norm at 8 makes the logits' std ~5
# instead of ~0.6.
PEAKED_QK_NORM_GAIN = 2.0
PEAKED_FINAL_NORM_GAIN = 8.0


def shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def shape_config(shape: str) -> dict:
    path = SHAPES_DIR / f"{shape}.json"
    if not path.is_file():
        raise QwenMobileError(f"--shape {shape!r} is unknown; choose one of {', '.join(shapes())}")
    return json.loads(path.read_text())


def peaked_gain(name: str) -> float:
    if name == "norm.weight":
        return PEAKED_FINAL_NORM_GAIN
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return PEAKED_QK_NORM_GAIN
    return 1.0


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, peaked: bool = False) -> torch.Tensor:
    """Values in the ranges trained Qwen3.5 weights have, so activations stay sane."""
    gain = peaked_gain(name) if peaked else 1.0
    if gain != 1.0:
        return gain - 1 + torch.randn(shape, generator=generator) * 0.02
    if name.endswith("A_log"):  # decay rates A in [1, 16], as transformers initialises them
        return torch.empty(shape).uniform_(1, 16, generator=generator).log()
    if name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
        return torch.ones(shape)
    # projections, embeddings, and the (1 + w) norms' w: small values around zero
    return torch.randn(shape, generator=generator) * 0.02


def write_fixture(
    shape: str, out: Path, seed: int = 0, progress: Callable[[int, int], None] = lambda done, total: None,
    peaked: bool = False,
) -> Path:
    raw = shape_config(shape)
    config = Qwen35Config.from_dict(raw, source=f"{SHAPES_DIR / shape}.json")
    with torch.device("meta"):
        shapes_by_name = {n: tuple(p.shape) for n, p in Qwen35(config).named_parameters()}
    total_bytes = sum(math.prod(s) * 2 for s in shapes_by_name.values())
    generator = torch.Generator().manual_seed(seed)

    with staged_directory(out) as staging:
        shards: list[list[str]] = []  # tensor names per written shard
        current: dict[str, torch.Tensor] = {}
        current_bytes = written = 0

        def flush():
            nonlocal current_bytes
            save_file(current, staging / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            shards.append(list(current))
            current.clear()
            current_bytes = 0

        for name, tensor_shape in shapes_by_name.items():
            hf_name = name if name == "lm_head.weight" else f"model.language_model.{name}"
            current[hf_name] = random_tensor(name, tensor_shape, generator, peaked).to(torch.bfloat16)
            size = math.prod(tensor_shape) * 2
            current_bytes += size
            written += size
            progress(written, total_bytes)
            if current_bytes >= SHARD_BYTES:
                flush()
        if current:
            flush()

        weight_map: dict[str, str] = {}
        for number, names in enumerate(shards, start=1):
            final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            (staging / f"part-{number - 1}.safetensors").rename(staging / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps({**raw, "torch_dtype": "bfloat16"}, indent=2))
        generation = {"eos_token_id": list(config.eos_token_ids), "do_sample": False}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for file in TOKENIZER_FILES:
            shutil.copy(EMBEDDED_MODEL / file, staging / file)
    return out
