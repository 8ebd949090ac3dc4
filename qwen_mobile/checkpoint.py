"""Load a Qwen3.5 checkpoint (Hugging Face layout) into the export-ready model.

A checkpoint is a directory with config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer.json, tokenizer_config.json and
generation_config.json; a hub id is downloaded into the local cache first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwen_mobile.config import Qwen35Config, read_config
from qwen_mobile.errors import QwenMobileError, first_line
from qwen_mobile.jsonfiles import read_json
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.quant.plan import planned_modules

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "qwen3.5-tiny"
EMBEDDED_NAME = "qwen3.5-tiny"
CHECKPOINT_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
]
# Qwen3_5ForConditionalGeneration nests the decoder; Qwen3_5ForCausalLM does not.
TEXT_PREFIXES = ("model.language_model.", "model.")
SKIPPED_PREFIXES = ("model.visual.", "visual.", "mtp.")
LOADABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class Checkpoint:
    path: Path
    source: str  # where it came from: an absolute path, a hub id (with revision), or the embedded model's name
    config: Qwen35Config
    config_hash: str
    tensor_files: dict[str, Path]  # tensor name -> the safetensors file holding it

    @property
    def skipped_tensors(self) -> int:
        return sum(1 for name in self.tensor_files if name.startswith(SKIPPED_PREFIXES))


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    model: Qwen35


def resolve(model: str | None) -> tuple[Path, str]:
    """The local directory for MODEL (the embedded model, a directory, or a hub id) and how a
    manifest records it: the embedded model's name, the directory's absolute path, or the hub
    id with the revision downloaded (id@commit)."""
    if model in (None, "", EMBEDDED_NAME):
        return EMBEDDED_MODEL, EMBEDDED_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        return path, str(path.resolve())
    if path.exists():
        raise QwenMobileError(f"{model}: not a directory (pass a checkpoint directory or a hub id)")
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise QwenMobileError(f"{model}: no such directory")
    snapshot = _download(model)
    return snapshot, f"{model}@{snapshot.name}"  # the hub's cache names each snapshot directory by its commit


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
    except Exception as error:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = first_line(error)
        raise QwenMobileError(
            f"{repo_id}: could not download from the Hugging Face hub ({reason}); "
            "download it elsewhere and pass its local directory"
        ) from None


def open_checkpoint(model: str | None) -> Checkpoint:
    path, source = resolve(model)
    config, config_hash = read_config(path / "config.json")
    return Checkpoint(path, source, config, config_hash, _tensor_files(path))


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) and _plain_file_name(file) for file in weight_map.values()
        ):
            raise QwenMobileError(f"{index}: weight_map must map tensor names to file names in {path}")
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise QwenMobileError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return {name: single for name in _read_names(single)}


def _read_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise QwenMobileError(f"{file}: not a readable safetensors file ({error})") from None


def _decoder_name(name: str) -> str | None:
    """Checkpoint tensor name -> our parameter name, or None for parts we skip."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    if name == "lm_head.weight":
        return name
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def load(model: str | None = None, dtype: torch.dtype = torch.float32, matrices_at_rest: bool = False) -> LoadedModel:
    """Read the checkpoint MODEL names (see resolve) into a Qwen35 in `dtype` (see load_checkpoint)."""
    return load_checkpoint(open_checkpoint(model), dtype, matrices_at_rest)


def load_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                    matrices_at_rest: bool = False) -> LoadedModel:
    """Read an opened checkpoint's decoder weights into a Qwen35 in `dtype`.

    matrices_at_rest: every Linear and Embedding weight (all but a few MB of the model) stays in
    the checkpoint's own dtype (bf16 or fp16: half of float32) instead of `dtype`; the model then
    computes only inside memory.widened, which widens each as it is used, exactly. For callers
    that only compute eagerly with it or quantize it (the gate's references, `verify`, a plan)."""
    config = checkpoint.config
    with torch.device("meta"):
        qwen = Qwen35(config)
    kept_as_stored = set(planned_modules(qwen)) if matrices_at_rest else set()
    expected = {name: tuple(p.shape) for name, p in qwen.named_parameters(remove_duplicate=False)}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")

    weights: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint.tensor_files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if not file.is_file():
            raise QwenMobileError(f"{file}: listed in model.safetensors.index.json but missing")
        try:
            for name in names:
                ours = _decoder_name(name)
                if ours is None or (ours == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                if ours not in expected:
                    raise QwenMobileError(f"{file}: unexpected tensor {name} for this config")
                tensor = _read_tensor(file, name)
                if tensor.dtype not in LOADABLE_DTYPES:
                    raise QwenMobileError(
                        f"{file}: tensor {name} is {tensor.dtype}; qwen-mobile loads bf16, fp16 or fp32 weights"
                    )
                if tuple(tensor.shape) != expected[ours]:
                    raise QwenMobileError(
                        f"{file}: tensor {name} has shape {list(tensor.shape)}, config.json implies "
                        f"{list(expected[ours])}"
                    )
                weights[ours] = tensor if ours in kept_as_stored else tensor.to(dtype)
        except SafetensorError as error:
            raise QwenMobileError(f"{file}: not a readable safetensors file ({error})") from None

    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise QwenMobileError(f"{checkpoint.path}: the checkpoint lacks tensor {missing[0]}{more}")
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    qwen.load_state_dict(weights, strict=True, assign=True)
    if config.tie_word_embeddings:
        qwen.lm_head.weight = qwen.embed_tokens.weight  # assign=True replaced the shared Parameter
    return LoadedModel(checkpoint, qwen.eval())


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    # An opening of its own per tensor: the pages of a file read through safetensors' mapping count
    # as this process's resident memory until the mapping closes, so reading a whole file through
    # one opening would add the file (1.4 GiB at 0.8B) to the load's peak on top of the fp32 model.
    with safe_open(file, framework="pt") as handle:
        return handle.get_tensor(name)


def stop_token_ids(checkpoint: Checkpoint) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's when present (it lists the chat
    turn end as well as <|endoftext|>), else config.json's."""
    path = checkpoint.path / "generation_config.json"
    if path.is_file():
        eos = read_json(path).get("eos_token_id")
        if eos is not None:
            ids = tuple(eos) if isinstance(eos, list) else (eos,)
            vocab = checkpoint.config.vocab_size
            if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
                raise QwenMobileError(f"{path}: eos_token_id must be token ids below vocab_size {vocab}, got {eos!r}"[:300])
            return ids
    return checkpoint.config.eos_token_ids


def _plain_file_name(name: str) -> bool:
    """A shard named by an index must sit in the checkpoint directory itself."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
