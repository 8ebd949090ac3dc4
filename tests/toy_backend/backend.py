"""The toy backend: lower writes the plan's weights (dequantized) and the config; open runs them
in the core's eager model."""

import dataclasses

import torch

from qwen_mobile.config import Qwen35Config
from qwen_mobile.generate import eager_step
from qwen_mobile.models.qwen3_5 import Qwen35
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.registry import Backend, Lengths, Runner


class ToyBackend(Backend):
    runtimes = ("eager",)
    default_lengths = Lengths(max_context=256, max_chunk=16)

    def lower(self, target, directory):
        with dequantized(target.model, target.plan):
            weights = {name: tensor.clone() for name, tensor in target.model.state_dict().items()}
        config = dataclasses.asdict(target.model.config)
        torch.save({"config": config, "weights": weights}, directory / self.spec.artifact)
        return {"methods": {"step": {"inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "seq_len"]}],
                                     "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, config["vocab_size"]]}]}}}

    def open(self, bundle, manifest, runtime=None):
        saved = torch.load(bundle / manifest["artifact"], weights_only=True)
        config = Qwen35Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
        model = Qwen35(config)
        model.load_state_dict(saved["weights"])
        return Runner(eager_step(model.eval(), manifest["max_context"]), manifest["max_context"], manifest["max_seq_len"])
