"""Every change the TFLite lowering makes to the core model, in one place (applied with
qwen_mobile.swaps.swapped while each signature is exported).

- The Gated DeltaNet's depthwise conv becomes ChannelSplitConv1d: at most 4,096 channels
  per DEPTHWISE_CONV_2D.

The recurrent-state op is not swapped: lower.convert decomposes it with the core's own
builtin-op decomposition (qwen_mobile.ops.gated_delta_rule.decompositions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_mobile.swaps import ModuleSwap

# TFLite's builtin DEPTHWISE_CONV_2D (the CPU path without XNNPACK, and what NPU delegates fall
# back to) stalls above 4,832 channels, the size of its per-row accumulator: with ai-edge-litert
# 2.3.0 one call over 6,144 channels (Qwen3.5-0.8B's conv) ran for minutes where 4,096 took 0.4 ms.
MAX_DEPTHWISE_CHANNELS = 4096


class ChannelSplitConv1d(nn.Module):
    """A depthwise nn.Conv1d (no bias, no padding) as one depthwise conv per block of at most
    max_channels channels. Holds the original's weight under the same name."""

    def __init__(self, original: nn.Conv1d, max_channels: int = MAX_DEPTHWISE_CHANNELS):
        super().__init__()
        self.weight = original.weight
        self.max_channels = max_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] <= self.max_channels:
            return F.conv1d(x, self.weight, groups=x.shape[1])
        blocks = zip(x.split(self.max_channels, dim=1), self.weight.split(self.max_channels, dim=0))
        return torch.cat([F.conv1d(part, kernel, groups=kernel.shape[0]) for part, kernel in blocks], dim=1)


MODULE_SWAPS = (
    ModuleSwap(nn.Conv1d, ChannelSplitConv1d,
               f"DEPTHWISE_CONV_2D stalls in TFLite's builtin kernel above ~4,832 channels; split at "
               f"{MAX_DEPTHWISE_CHANNELS}"),
)
