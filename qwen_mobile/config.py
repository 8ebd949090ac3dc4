"""The Qwen3.5 text-decoder configuration, read from a Hugging Face config.json.

Both layouts are accepted: `qwen3_5` (Qwen3_5ForConditionalGeneration, the text
decoder's fields under `text_config`) and `qwen3_5_text` (Qwen3_5ForCausalLM, flat).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.jsonfiles import read_json

MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
# bounds on every size a config.json gives (the 9B's largest is its 248,320 vocabulary): a size
# past them is a one-line error, never an overflow inside torch
MAX_SIZE = 1 << 24
MAX_LAYERS = 1024
LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"


@dataclass(frozen=True)
class Qwen35Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    # Gated DeltaNet linear attention
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    # whole-checkpoint facts, not decoder shape
    model_type: str
    skipped: tuple[str, ...]  # checkpoint parts this toolkit does not export (vision tower, MTP head)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal depthwise conv: q, k and v are convolved together."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen35Config":
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise QwenMobileError(
                f"{source}: model_type is {model_type!r}; qwen-mobile reads {' or '.join(MODEL_TYPES)}"
            )
        skipped = []
        text = raw
        if model_type == "qwen3_5":
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise QwenMobileError(f"{source}: text_config is missing (model_type 'qwen3_5' nests the decoder there)")
            if "vision_config" in raw:
                skipped.append("vision tower")
        if text.get("mtp_num_hidden_layers", 0):
            skipped.append("multi-token-prediction (MTP) head")
        fields = _Fields(text, source, prefix="text_config." if text is not raw else "")

        layer_count = fields.positive_int("num_hidden_layers", maximum=MAX_LAYERS)
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = fields.positive_int("full_attention_interval", default=4, maximum=MAX_LAYERS)
            layer_types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layer_count)]
        if (
            not isinstance(layer_types, list)
            or len(layer_types) != layer_count
            or any(t not in (LINEAR_ATTENTION, FULL_ATTENTION) for t in layer_types)
        ):
            raise QwenMobileError(
                f"{source}: {fields.prefix}layer_types must list {layer_count} entries, each "
                f"'{LINEAR_ATTENTION}' or '{FULL_ATTENTION}'"
            )
        for name, expected in (("hidden_act", "silu"), ("attention_bias", False), ("attn_output_gate", True)):
            if text.get(name, expected) != expected:
                raise QwenMobileError(
                    f"{source}: {fields.prefix}{name} is {_short(text[name])}; Qwen3.5 has {expected!r}"
                )

        # rope settings live in rope_parameters (transformers 5) or at the top level (older files)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise QwenMobileError(f"{source}: {fields.prefix}rope_parameters must be an object, got {_short(rope)}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise QwenMobileError(
                f"{source}: {fields.prefix}rope_parameters.rope_type {_short(rope_type)} is not supported"
            )
        rope_fields = _Fields({**text, **rope}, source, fields.prefix)

        eos = raw.get("eos_token_id", text.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        vocab_size = fields.positive_int("vocab_size")
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in eos_ids):
            raise QwenMobileError(
                f"{source}: eos_token_id must be token ids below vocab_size {vocab_size}, got {_short(eos)}"
            )

        config = cls(
            vocab_size=vocab_size,
            hidden_size=fields.positive_int("hidden_size"),
            intermediate_size=fields.positive_int("intermediate_size"),
            layer_types=tuple(layer_types),
            num_attention_heads=fields.positive_int("num_attention_heads"),
            num_key_value_heads=fields.positive_int("num_key_value_heads"),
            head_dim=fields.positive_int("head_dim"),
            rope_theta=rope_fields.positive_float("rope_theta"),
            partial_rotary_factor=rope_fields.positive_float("partial_rotary_factor", default=0.25, maximum=1.0),
            max_position_embeddings=fields.positive_int("max_position_embeddings"),
            linear_num_key_heads=fields.positive_int("linear_num_key_heads"),
            linear_num_value_heads=fields.positive_int("linear_num_value_heads"),
            linear_key_head_dim=fields.positive_int("linear_key_head_dim"),
            linear_value_head_dim=fields.positive_int("linear_value_head_dim"),
            linear_conv_kernel_dim=fields.positive_int("linear_conv_kernel_dim", default=4, maximum=64),
            rms_norm_eps=fields.positive_float("rms_norm_eps", default=1e-6, maximum=1.0),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            eos_token_ids=eos_ids,
            model_type=model_type,
            skipped=tuple(skipped),
        )
        config._check_divisibility(source, fields.prefix)
        return config

    def _check_divisibility(self, source: str, prefix: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenMobileError(
                f"{source}: {prefix}num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise QwenMobileError(
                f"{source}: {prefix}linear_num_value_heads ({self.linear_num_value_heads}) is not a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise QwenMobileError(
                f"{source}: {prefix}partial_rotary_factor {self.partial_rotary_factor} gives an invalid rotary "
                f"dimension for head_dim {self.head_dim}"
            )


class _Fields:
    """Typed reads from one config dict, with errors that name the field."""

    def __init__(self, values: dict, source: str, prefix: str):
        self.values, self.source, self.prefix = values, source, prefix

    def _get(self, name, default):
        if name in self.values and self.values[name] is not None:
            return self.values[name]
        if default is None:
            raise QwenMobileError(f"{self.source}: {self.prefix}{name} is missing")
        return default

    def positive_int(self, name: str, default: int | None = None, maximum: int = MAX_SIZE) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
            raise QwenMobileError(
                f"{self.source}: {self.prefix}{name} must be an integer from 1 to {maximum:,}, got {_short(value)}"
            )
        return value

    def positive_float(self, name: str, default: float | None = None, maximum: float = math.inf) -> float:
        value = self._get(name, default)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not 0 < value <= maximum):
            raise QwenMobileError(
                f"{self.source}: {self.prefix}{name} must be a finite number above 0 and at most {maximum:g}, "
                f"got {_short(value)}"
            )
        return float(value)


def _short(value) -> str:
    """A value for a one-line message: long or nested values cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_config(path: Path) -> tuple[Qwen35Config, str]:
    """The config and a short hash of the file's bytes (the manifest's source identity)."""
    if not path.is_file():
        raise QwenMobileError(f"{path}: not found (a Qwen3.5 checkpoint directory has a config.json)")
    raw = read_json(path)
    return Qwen35Config.from_dict(raw, source=str(path)), hashlib.sha256(path.read_bytes()).hexdigest()[:16]
