"""Qwen35 -> an ExecuTorch program: stateful wrapper, torch.export, kernel swap, XNNPACK lowering.

The program has one method, `forward(tokens int64[1, T], input_pos int64[1]) ->
logits float32[1, vocab]`, with T dynamic in 1..max_seq_len, so the same method
serves prefill chunks and single-token decode. Conv, recurrent and KV state live in
mutable buffers inside the program: the app never sees them, and a call at
input_pos 0 starts a new sequence (the core model zeroes the recurrent state there).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from qwen_mobile.models.qwen3_5 import KVState, Qwen35, StateTensor, state_from_tensors, state_tensors, state_to_tensors
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.swaps import swapped

from .inplace_state import in_place_memory_planning
from .partition import xnnpack_partitioner
from .quantize import planned_weights
from .swaps import MODULE_SWAPS, OP_SWAPS


def stored_shape(tensor: StateTensor) -> tuple[int, ...]:
    """A state buffer's shape in the program: KV caches are [1, max_context, kv_heads, head_dim], the
    layout of ExecuTorch's llama::update_cache and llama::custom_sdpa (swaps.NativeCacheAttention)."""
    if tensor.field in KVState._fields:
        batch, heads, slots, dim = tensor.shape
        return (batch, slots, heads, dim)
    return tensor.shape


class StatefulQwen35(nn.Module):
    """Qwen35 with its state in registered buffers, named as the core names state tensors,
    updated in place on every call.

    `buffer.copy_(new)` is what torch.export turns into a mutated buffer, which
    ExecuTorch keeps in the program across calls. The runtime zero-fills them when it
    loads the program (ExecuTorch's own LLM exports rely on this too), which is the
    state Qwen35.init_state gives the eager model.
    """

    def __init__(self, model: Qwen35, max_context: int):
        super().__init__()
        self.model = model
        for tensor in state_tensors(model.config, max_context):
            self.register_buffer(tensor.name, torch.zeros(stored_shape(tensor), dtype=tensor.dtype))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        buffers = dict(self.named_buffers())
        logits, new_state = self.model(tokens, input_pos, state_from_tensors(self.model.config, buffers))
        for name, new in state_to_tensors(new_state).items():
            if new is not buffers[name]:  # KV caches were updated in place by NativeCacheAttention
                buffers[name].copy_(new)
        return logits


def export_program(model: Qwen35, max_context: int, max_seq_len: int) -> torch.export.ExportedProgram:
    wrapper = StatefulQwen35(model, max_context).eval()
    example = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    length = torch.export.Dim("seq_len", min=1, max=max_seq_len)
    with torch.no_grad(), swapped(model, MODULE_SWAPS):
        return torch.export.export(wrapper, example, dynamic_shapes=({1: length}, None), strict=False)


def rewrite_for_executorch(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Swap our op for the native kernel by tracing the adapter in its place, and rewrite
    the operators XNNPACK would leave out into forms it delegates (swaps.OP_SWAPS).

    Decompositions rather than hand-written graph rewrites: export re-traces the
    adapter and the rewrites with each node's real (symbolic) shapes, so the transposes,
    repeats and exp get correct metadata under the dynamic T for free, and nothing
    outside the table is touched.
    """
    return program.run_decompositions(OP_SWAPS)


def operator_names(program: torch.export.ExportedProgram) -> set[str]:
    """The operators (namespace::name) the graph calls, leaving out Python builtins and delegate calls."""
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    names = {target.name() for target in targets if hasattr(target, "name")}  # aten, edge and custom op overloads
    return {name for name in names if "::" in name}


def lower_to_edge(program: torch.export.ExportedProgram, constant_methods: dict):
    """XNNPACK takes what it can (linears, matmuls, elementwise); the rest, including
    llama::gated_delta_rule and the cache updates, runs on ExecuTorch's portable and
    custom kernels."""
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()], constant_methods=constant_methods)


def to_executorch(edge):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    config = ExecutorchBackendConfig(
        extract_delegate_segments=True,
        # inputs are the caller's tensors; planning them in the arena would copy every call.
        # The new conv and recurrent states are written straight into their buffers.
        memory_planning_pass=in_place_memory_planning(alloc_graph_input=False),
        # sizes activations from the Dim bounds, so one plan covers T = 1..max_seq_len
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        # writes state updates straight into their buffers instead of through copies:
        # 128 decode calls on qwen3.5-tiny took 57 ms with it, 73 ms without (same run)
        run_reinplace_pass=True,
        # dequantize_affine + embedding -> quantized_decomposed::embedding_{byte,4bit}
        do_quant_fusion_and_const_prop=True,
    )
    with warnings.catch_warnings():
        # "buffers that are mutated have a meaningless initial state": known, see StatefulQwen35
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        return edge.to_executorch(config)


def runner_metadata(model: Qwen35, max_context: int, max_seq_len: int, bos_id: int, eos_ids: list[int]) -> dict:
    """The constant methods ExecuTorch's LLM runner reads to drive the program.

    use_kv_cache + enable_dynamic_shape tell it to call forward(tokens [1, T], input_pos [1])
    with T up to get_max_seq_len; use_sdpa_with_kv_cache is False because attention
    here is llama::update_cache + llama::custom_sdpa, not the fused llama::sdpa_with_kv_cache.
    """
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_context,
        "get_vocab_size": model.config.vocab_size,
        "get_n_layers": model.config.num_hidden_layers,
        "get_bos_id": bos_id,
        "get_eos_ids": list(eos_ids),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }


# blobs this large or larger wait on disk until the program is written (named_data_on_disk)
SPILLED_BLOB_BYTES = 1 << 20


@contextlib.contextmanager
def named_data_on_disk(directory: Path):
    """Inside the block, every blob of SPILLED_BLOB_BYTES or more that a backend hands ExecuTorch's
    NamedDataStore (XNNPACK's: each weight's packed integers and its scales) is written to a file
    in `directory` at once and held as ExecuTorch's own FileBackedData, which the store and the
    program's serialization take in place of bytes. Otherwise every packed weight is held in
    memory from its partition's preprocess until the file is written: 0.40 GiB at 0.8B, 4.7 at
    9B, where the lowering ran out of memory. XNNPACK's node visitor has no option for it, so
    the store's entry point is wrapped here for the lowering's duration (ExecuTorch is pinned)."""
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore

    add_named_data = NamedDataStore.add_named_data
    numbers = itertools.count()

    def add_spilled(self, key, data, *args, **kwargs):
        if isinstance(data, bytes) and len(data) >= SPILLED_BLOB_BYTES:
            path = directory / f"{next(numbers)}.blob"
            path.write_bytes(data)
            data = FileBackedData(str(path))
        return add_named_data(self, key, data, *args, **kwargs)

    with mock.patch.object(NamedDataStore, "add_named_data", add_spilled):
        yield


def copy_sharing_weights(edge_program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A deep copy of a partition's program whose parameters and constants are the original's
    tensors: ExecuTorch copies each partition's program before its backend's preprocess, in case
    the backend changes the graph, and a plain deepcopy copies every delegated weight with it
    (8.8 GB at 9B, all partitions copied before the first preprocess: measured with memray).
    XNNPACK's preprocess reads the weights and packs copies of its own; it changes no tensor in
    place, and the gate (weights looked up, then the program run) would see it if it did."""
    shared = [*edge_program.state_dict.values(), *edge_program.constants.values()]
    return copy.deepcopy(edge_program, {id(tensor): tensor for tensor in shared if isinstance(tensor, torch.Tensor)})


@contextlib.contextmanager
def xnnpack_preprocess_sharing_weights():
    """Inside the block ExecuTorch hands XNNPACK's preprocess copy_sharing_weights's copies. The hook
    (BackendDetails.copy_exported_program_for_preprocess) is ExecuTorch's, for a backend to
    override; XNNPACK's backend is final, so it is set on the class for the block's duration."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    sharing = classmethod(lambda cls, edge_program, compile_specs: copy_sharing_weights(edge_program))
    with mock.patch.object(XnnpackBackend, "copy_exported_program_for_preprocess", sharing):
        yield


def lower(model: Qwen35, plan: QuantPlan, max_context: int, max_seq_len: int, metadata: dict,
          artifact: Path) -> set[str]:
    """Write the program to `artifact` and return the kernels the runtime must provide besides
    XNNPACK (llama:: is in ExecuTorch's LLM custom ops library). Written from ExecuTorch's
    serialized pieces (write_to_file), never joined into one bytes object first: that copy is the
    whole program (2.6 GiB at 4B) beside the pieces; the packed weights among those pieces wait
    in files beside the artifact (named_data_on_disk), removed once it is written."""
    with planned_weights(model, plan):
        program = rewrite_for_executorch(export_program(model, max_context, max_seq_len))
    with tempfile.TemporaryDirectory(prefix=".blobs-", dir=artifact.parent) as blobs:
        with named_data_on_disk(Path(blobs)), xnnpack_preprocess_sharing_weights():
            executorch_program = to_executorch(lower_to_edge(program, metadata))
        with artifact.open("wb") as file:
            executorch_program.write_to_file(file)
    return operator_names(executorch_program.exported_program())
