"""The XNNPACK partitioner, taught to delegate weight-only int8 linears.

Written by hand because executorch 1.5.1 lacks it: its LinearConfig delegates a
linear with a dequantized weight only when the activation is quantized too (static
or dynamic). A weight-only linear (dequantized int8 weight, float activation) falls
through to the decomposed permute + mm, where the weight's per-channel scales are
lost: a one-linear program was off by 3.4e3 on outputs of about 1.7. XNNPACK itself
has the kernel (fully connected with float input and channelwise int8 filter), and
ExecuTorch's linear serializer already emits it when the activation carries no
quantization parameters, so the only missing piece is letting the partitioner claim
the pattern: dequantize(weight) -> linear with a float input and a float output.

XNNPACK has no float-input kernel for group-wise int4 weights (its blockwise int4
gemm takes dynamically quantized int8 activations: 8da4w), so int4 weight-only stays
unclaimed; quantize.check_encodable refuses it before lowering.
"""

from __future__ import annotations


def weight_only_linear_config():
    from executorch.backends.xnnpack.operators.node_visitor import get_input_node
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant

    class WeightOnlyLinearConfig(LinearConfig):
        def _is_weight_only(self, node) -> bool:
            return is_dequant(get_input_node(node, self.weight_idx)) and not is_dequant(
                get_input_node(node, self.act_idx)
            )

        # LinearConfig classes a dequantized weight as STATIC_QUANT and then asks for a
        # dequantized activation and a quantize after the output; weight-only has neither.
        def _get_act_deps(self, node, ep, precision):
            if precision == ConfigPrecisionType.STATIC_QUANT and self._is_weight_only(node):
                return True, []
            return super()._get_act_deps(node, ep, precision)

        def _get_output_deps(self, node, ep, precision):
            if precision == ConfigPrecisionType.STATIC_QUANT and self._is_weight_only(node):
                return True, []
            return super()._get_output_deps(node, ep, precision)

    return LinearConfig, WeightOnlyLinearConfig


def xnnpack_partitioner():
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    stock, weight_only = weight_only_linear_config()
    return XnnpackPartitioner(configs=[weight_only if config is stock else config for config in ALL_PARTITIONER_CONFIGS])
