"""The ExecuTorch backend behind the core's interface (qwen_mobile.registry.Backend)."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_mobile.models.qwen3_5 import StateTensor
from qwen_mobile.registry import Backend, ExportTarget, Lengths, Runner

from . import lower, quantize, runtime, weights


class ExecuTorchBackend(Backend):
    runtimes = ("executorch",)
    # 128: the longest chunk one call takes; ExecuTorch's LLM runner splits longer prompts into
    # chunks of get_max_seq_len, and activations are memory-planned for this upper bound
    default_lengths = Lengths(max_context=2048, max_chunk=128)
    # Qwen3.5's tokenizer has no BOS token; ExecuTorch's own Qwen3.5 config gives the runner <|im_start|>
    bos_token = "<|im_start|>"
    tools = ("executorch", "torchao")
    # the planned linears and embedding are lowered as torchao tensors built from the plan's integers (quantize.py)
    lowering_reads_planned_weights = False

    def check(self, plan, lengths: Lengths) -> None:
        quantize.check_encodable(plan)

    def lower(self, target: ExportTarget, directory: Path) -> dict:
        model, lengths = target.model, target.lengths
        metadata = lower.runner_metadata(
            model, lengths.max_context, lengths.max_chunk, target.special_tokens["bos"], target.special_tokens["eos"]
        )
        portable_operators = lower.lower(model, target.plan, lengths.max_context, lengths.max_chunk, metadata,
                                         directory / self.spec.artifact)
        return {
            "methods": {"forward": forward_signature(model.config.vocab_size, lengths.max_chunk),
                        **constant_methods(metadata)},
            "portable_operators": sorted(portable_operators),
        }

    def stored_state(self, tensor: StateTensor, plan) -> list[dict]:
        (entry,) = super().stored_state(tensor, plan)
        return [{**entry, "shape": list(lower.stored_shape(tensor))}]

    def open(self, bundle: Path, manifest: dict, runtime_name: str | None = None) -> Runner:
        """The program's forward method, loaded afresh (its state buffers start zeroed), one call
        per prefill chunk or decode token."""
        method = runtime.load_forward(Path(bundle) / manifest["artifact"])

        def step(tokens: list[int], start: int) -> torch.Tensor:
            return runtime.step(method, torch.tensor([tokens], dtype=torch.long), start)[0]

        return Runner(step, max_context=manifest["max_context"], max_chunk=manifest["max_seq_len"])

    def missing_weights(self, bundle: Path, manifest: dict, plan) -> list[str]:
        return weights.missing_weights(Path(bundle) / manifest["artifact"], plan)

    def thread_counts(self) -> dict:
        return {"executorch": runtime.thread_count()}


def forward_signature(vocab_size: int, max_seq_len: int) -> dict:
    return {
        "inputs": [
            {"name": "tokens", "dtype": "int64", "shape": [1, "seq_len"]},
            {"name": "input_pos", "dtype": "int64", "shape": [1]},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, vocab_size]}],
        "dynamic_dims": {"seq_len": {"min": 1, "max": max_seq_len}},
        "notes": "logits of the last fed position; state is held in the program, and input_pos 0 starts a new "
        "sequence",
    }


def constant_methods(metadata: dict) -> dict:
    return {name: {"inputs": [], "outputs": [{"value": value}]} for name, value in metadata.items()}
