"""Qwen35 -> one .tflite flatbuffer with two signatures, `prefill` and `decode`, sharing weights.

Shapes are static everywhere, which NPU compilers require:

- `prefill(tokens int32[1, C], input_pos int32[1], length int32[1], <state>)`: a chunk
  of C tokens of which the first `length` are real. Padding never reaches the state
  (the core model's `length`, qwen_mobile/models/qwen3_5.py). The logits are the last
  real token's.
- `decode(tokens int32[1, 1], input_pos int32[1], <state>)`: one token (the core is given
  length 1, so both signatures write KV slots by the same static one-hot form).

State (per linear-attention layer a conv state and an fp32 recurrent state, per
full-attention layer a key and a value cache of max_context slots) is an explicit input
and output of both signatures, in the layouts of swaps.stored_shape: the output
`<name>_out` feeds the input `<name>` on the next call (see `state_feeds`). Each cache is
written only by a DYNAMIC_UPDATE_SLICE of the call's rows, and read by nothing else before
that write (`in_place_state` checks it in the written file), so a runtime may bind one
buffer as both a cache's input and its output: the cache then stays where it is. The other
state is rewritten whole by every call and goes to a second buffer. litert-torch 0.10's
default converter drops buffer mutations (a mutated buffer becomes a constant), and its V2
converter, which keeps resource variables, needs a TensorFlow nightly, so state cannot
live in the model itself.

Everything lowers to TFLite builtin ops: the recurrent-state op through swaps.decompositions
(one chunk of the core's matmul-only chunked form for prefill, a one-read one-write step
for decode), KV writes as DYNAMIC_UPDATE_SLICE, the last real token through GATHER. The
changes to the core model are swaps.MODULE_SWAPS.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_mobile.config import Qwen35Config
from qwen_mobile.models.qwen3_5 import Qwen35, state_from_tensors, state_tensors, state_to_tensors
from qwen_mobile.quant.plan import QuantPlan, placeholder
from qwen_mobile.swaps import swapped

from . import quantize
from .swaps import MODULE_SWAPS, decompositions, stored_shape

PREFILL, DECODE = "prefill", "decode"
SIGNATURES = (PREFILL, DECODE)
OUTPUT_SUFFIX = "_out"


def state_specs(config: Qwen35Config, max_context: int) -> list[tuple[str, torch.Tensor]]:
    """(input name, zero tensor in its stored layout) for every state tensor, in signature order."""
    return [(t.name, torch.zeros(stored_shape(t), dtype=t.dtype)) for t in state_tensors(config, max_context)]


def state_feeds(config: Qwen35Config, max_context: int) -> dict[str, str]:
    """Output name -> the input name it feeds on the next call (prefill and decode alike)."""
    return {t.name + OUTPUT_SUFFIX: t.name for t in state_tensors(config, max_context)}


def weight_inputs(model: nn.Module, plan: QuantPlan | None) -> dict[str, str]:
    """Signature input name -> parameter name, for every planned weight (a tied lm_head is the
    embedding's parameter, so it is one input). See convert for why weights are inputs."""
    if plan is None:
        return {}
    parameters = dict(model.named_parameters())  # tied parameters appear once
    return {quantize.input_name(name): name for name in plan.weights if name in parameters}


def call_with_weights(model: nn.Module, inputs: dict[str, str], given: dict[str, torch.Tensor], *args, **kwargs):
    """model(*args, **kwargs) with each weight in `inputs` taken from the signature input `given` of that name."""
    weights = {inputs[key]: tensor for key, tensor in given.items()}
    return torch.func.functional_call(model, weights, args, kwargs)


class SignatureModule(nn.Module):
    """One signature: tokens, input_pos (and length for prefill), the state and the planned
    weights in; logits and state out."""

    def __init__(self, model: Qwen35, max_context: int, chunk: int | None, weights: dict[str, str]):
        super().__init__()
        self.model = model
        self.chunk = chunk  # None: the decode signature (one token)
        self.names = [name for name, _ in state_specs(model.config, max_context)]
        self.weights = weights

    def sample_inputs(self, max_context: int) -> dict[str, torch.Tensor]:
        length = self.chunk or 1
        inputs = {"tokens": torch.zeros(1, length, dtype=torch.int32), "input_pos": torch.zeros(1, dtype=torch.int32)}
        if self.chunk is not None:
            inputs["length"] = torch.full((1,), length, dtype=torch.int32)
        inputs.update(state_specs(self.model.config, max_context))
        parameters = dict(self.model.named_parameters())
        inputs.update({key: placeholder(parameters[name].shape) for key, name in self.weights.items()})
        return inputs

    def forward(self, tokens, input_pos, length=None, **named):
        state = state_from_tensors(self.model.config, {name: named[name] for name in self.names})
        weights = {key: named[key] for key in self.weights}
        if length is None:  # decode: the one token is real
            length = torch.ones(1, dtype=torch.int32)
        logits, new_state = call_with_weights(self.model, self.weights, weights, tokens, input_pos, state, length)
        outputs = {"logits": logits}
        for name, tensor in state_to_tensors(new_state).items():
            outputs[name + OUTPUT_SUFFIX] = tensor
        return outputs


def without_unread_attributes(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop every parameter and buffer no node reads: the planned weights, which come in as
    signature inputs. The converter re-exports the module and copies each attribute it lifts
    into a constant, read or not (litert-torch's inline_consts)."""
    read = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if name not in read:
            owner, _, attribute = name.rpartition(".")
            delattr(module.get_submodule(owner), attribute)
    return module


def fold_constants(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Evaluate every computation that depends on no input and no weight (torch.eye in the
    chunk inverse, aranges, causal masks) and keep its result as a constant.

    The converter lowers such factory ops to STABLEHLO_IOTA and leaves it unfolded, and the
    LiteRT interpreter has no kernel for it. Weights and inputs are never folded."""
    graph = module.graph
    values: dict[torch.fx.Node, object] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        inputs = [*node.args, *node.kwargs.values()]
        flat = []
        torch.fx.node.map_arg(inputs, flat.append)
        if all(n in values for n in flat):
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
            with torch.no_grad():
                values[node] = node.target(*args, **kwargs)
    folded = 0
    for node, value in values.items():
        if not isinstance(value, torch.Tensor) or all(user in values for user in node.users):
            continue
        name = f"_folded_constant_{folded}"
        folded += 1
        module.register_buffer(name, value.clone(), persistent=False)
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        node.replace_all_uses_with(constant)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def convert(model: Qwen35, max_context: int, chunk: int, plan: QuantPlan | None = None) -> bytes:
    """Both signatures through litert-torch, each exported here with the module swaps and the
    recurrent-state op decomposed into builtin ops (static shapes: the chunk loop unrolls),
    and handed to the converter already traced.

    With a quantization plan, every planned weight is converted as a signature input rather
    than a constant, and quantize.encode then makes each such input a constant holding the
    plan's integers. As constants, the converter would carry every weight in float32 through
    its passes and into the flatbuffer (at the 0.8B shape: over 15 GiB resident and past
    flatbuffers' 2 GB limit); as inputs it never sees their values."""
    import litert_torch

    if plan is not None and plan.weights:
        quantize.check_encodable(plan)
    weights = weight_inputs(model, plan)
    converter = litert_torch.Converter()
    for name, signature_chunk in ((PREFILL, chunk), (DECODE, None)):
        signature = SignatureModule(model, max_context, signature_chunk, weights).eval()
        inputs = signature.sample_inputs(max_context)
        with torch.no_grad(), swapped(model, MODULE_SWAPS):
            exported = torch.export.export(signature, (), inputs, strict=False)
        exported = exported.run_decompositions(decompositions(chunk))
        converter.signature(name, without_unread_attributes(fold_constants(exported.module())), sample_kwargs=inputs)
    with torch.no_grad():
        edge = converter.convert(strict_export=False)
    flatbuffer = bytes(edge.model_content())
    return quantize.encode(flatbuffer, plan) if weights else flatbuffer


def in_place_state(flatbuffer: bytes, feeds: dict[str, str]) -> list[str]:
    """The state inputs whose output a runtime may write into the input's own buffer, in every
    signature: the output is a DYNAMIC_UPDATE_SLICE of the input, and every other op reading
    the input is one that slice depends on (it runs before the slice overwrites anything)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    update_slice = schema.BuiltinOperator.DYNAMIC_UPDATE_SLICE
    safe = set(feeds.values())
    for signature in model.signatureDefs:
        subgraph = model.subgraphs[signature.subgraphIndex]
        inputs = {entry.name.decode(): entry.tensorIndex for entry in signature.inputs}
        outputs = {entry.name.decode(): entry.tensorIndex for entry in signature.outputs}
        producers = {int(t): op for op in subgraph.operators for t in op.outputs}
        for output, name in feeds.items():
            op = producers.get(outputs.get(output, -1))
            code = None if op is None else model.operatorCodes[op.opcodeIndex]
            if op is None or max(code.builtinCode, code.deprecatedBuiltinCode) != update_slice \
                    or int(op.inputs[0]) != inputs.get(name):
                safe.discard(name)
                continue
            ancestors, stack = set(), [int(t) for t in op.inputs[1:]]
            while stack:  # every tensor the slice's update and start depend on
                tensor = stack.pop()
                producer = producers.get(tensor)
                if tensor in ancestors or producer is None:
                    continue
                ancestors.add(tensor)
                stack.extend(int(t) for t in producer.inputs if t >= 0)
            readers = [other for other in subgraph.operators if other is not op and inputs[name] in other.inputs]
            if not all(any(int(t) in ancestors for t in reader.outputs) for reader in readers):
                safe.discard(name)
    return [name for name in feeds.values() if name in safe]
