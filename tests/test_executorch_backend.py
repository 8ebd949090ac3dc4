"""The ExecuTorch backend end to end: lower, write, run the written .pte through the runtime, gate, publish.

One export (the slow part, about a minute on two cores) is shared by the module; the
tests that need a failing or refused export reuse its program instead of lowering again.
"""

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch

from qwen_mobile.backends.executorch import BACKEND, lower, rewrites, runtime, swaps
from qwen_mobile import parity
from qwen_mobile.bundle import TOKENIZER_FILES, gate_bundle, validate_manifest
from qwen_mobile.checkpoint import load, stop_token_ids
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
from qwen_mobile.generate import eager_step, generate_tokens, load_tokenizer
from qwen_mobile.ops.gated_delta_rule import recurrent_gated_delta_rule

PROMPT = "ROMEO:\nWhat light"


@pytest.fixture(scope="module")
def source() -> None:
    """The embedded model (MODEL omitted, as on the command line)."""
    return None


@pytest.fixture(scope="module")
def loaded(source):
    return load(source)


@pytest.fixture(scope="module")
def exported(embedded_bundle) -> Path:
    """A bundle written by the real export path, with the default quant scheme (fp32)."""
    return embedded_bundle("executorch", "fp32")


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / "manifest.json").read_text())


def lengths(manifest: dict) -> tuple[int, int]:
    return manifest["max_context"], manifest["max_seq_len"]


def test_the_native_adapter_matches_our_op_contract():
    """Layouts, grouping (3 value heads per key head) and the exp of the log decay, checked in eager."""
    generator = torch.Generator().manual_seed(0)
    for length in (1, 37):
        q, k = (torch.nn.functional.normalize(torch.randn(1, length, 2, 16, generator=generator), dim=-1) for _ in "qk")
        v = torch.randn(1, length, 6, 8, generator=generator)
        g = -torch.rand(1, length, 6, generator=generator)
        beta = torch.rand(1, length, 6, generator=generator)
        state = torch.randn(1, 6, 16, 8, generator=generator)
        expected_out, expected_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
        out, final = swaps.native_gated_delta_rule(q, k, v, g, beta, state)
        torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(final, expected_state, atol=1e-5, rtol=1e-4)


def test_the_bundle_holds_every_file_and_describes_the_program(exported, manifest, loaded):
    assert sorted(p.name for p in exported.iterdir()) == ["manifest.json", "model.pte", *TOKENIZER_FILES]
    checkpoint = loaded.checkpoint
    for name in TOKENIZER_FILES:
        assert (exported / name).read_bytes() == (checkpoint.path / name).read_bytes()
    assert sorted(manifest["files"]) == ["model.pte", *TOKENIZER_FILES]
    assert manifest["files"]["model.pte"]["bytes"] == (exported / "model.pte").stat().st_size
    assert manifest["format_version"] == 2 and manifest["backend"] == "executorch"
    assert manifest["artifact"] == "model.pte" and manifest["quant"] == {"scheme": "fp32", "compute_dtype": "float32"}
    assert manifest["source"]["config_hash"] == checkpoint.config_hash
    assert manifest["max_context"] == min(2048, checkpoint.config.max_position_embeddings)
    assert manifest["special_tokens"] == {"bos": 1, "eos": list(stop_token_ids(checkpoint))}  # <|im_start|> is 1
    assert manifest["chat_template"] == json.loads((checkpoint.path / "tokenizer_config.json").read_text())["chat_template"]
    methods = manifest["methods"]
    assert methods["forward"]["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, checkpoint.config.vocab_size]}]
    assert methods["get_vocab_size"]["outputs"] == [{"value": checkpoint.config.vocab_size}]
    assert methods["get_eos_ids"]["outputs"] == [{"value": list(stop_token_ids(checkpoint))}]
    state = {entry["name"]: entry for entry in manifest["state"]}
    assert state["layer0_recurrent_state"]["dtype"] == "float32"
    config = checkpoint.config  # KV caches in llama::update_cache's layout [1, context, kv_heads, head_dim]
    assert state["layer3_key_cache"]["shape"] == [1, manifest["max_context"], config.num_key_value_heads, config.head_dim]
    validate_manifest(manifest, exported / "manifest.json")  # the documented schema


def test_the_runtime_matches_eager_within_the_gate(exported, manifest):
    result = gate_bundle(exported, manifest, BACKEND)  # measured again, on the file as written
    assert result["tokens_fed"] >= 64 and len(result["prefill_chunks"]) >= 2 and result["decode_steps"] >= 16
    assert result["max_abs_diff"] <= parity.FLOAT_GATE.tolerance * result["reference_std"]
    assert result["top1_agreement"] >= 0.95
    assert result["passed"] and list(result["runtimes"]) == ["executorch"]


def test_the_written_program_calls_the_native_kernels_and_not_ours(exported):
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary((exported / "model.pte").read_bytes()).program.execution_plan[0]
    operators = {op.name for op in plan.operators}
    assert {"llama::gated_delta_rule", "llama::update_cache", "llama::custom_sdpa"} <= operators
    assert not any(name.startswith("qwen_mobile::") for name in operators)
    assert {delegate.id for delegate in plan.delegates} == {"XnnpackBackend"}


def program_calls(pte: Path) -> collections.Counter:
    """How many times one forward call runs each operator (by name) and XNNPACK ("delegate")."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(pte.read_bytes()).program.execution_plan[0]
    calls = collections.Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            kind = type(instruction.instr_args).__name__
            if kind == "KernelCall":
                calls[plan.operators[instruction.instr_args.op_index].name] += 1
            elif kind == "DelegateCall":
                calls["delegate"] += 1
    return calls


def test_views_and_repeated_heads_run_inside_xnnpack(exported):
    """rewrites.py and lower.repeat_heads on the embedded model (8 layers): without them the
    fp32 program runs 52 views, 12 expand_copy and 1 cat outside XNNPACK in 72 delegate calls."""
    calls = program_calls(exported / "model.pte")
    assert calls["executorch_prim::et_view"] <= 2  # only custom_sdpa's output, which no delegate produces
    # the one unsqueeze left is the rotary frequencies', computed from the positions
    assert calls["aten::expand_copy"] == calls["aten::unsqueeze_copy"] - 1 == calls["aten::cat"] == 0
    assert calls["delegate"] <= 54


def test_the_new_conv_and_recurrent_states_are_written_in_place(exported):
    """inplace_state.py: no copy_ of a new state into its buffer is left (12 on this model
    without it); the gate's second pass from position 0 shows the state still resets."""
    assert program_calls(exported / "model.pte")["aten::copy_"] == 0


def test_a_state_is_written_in_place_only_where_nothing_reads_the_old_one_later():
    """Three buffers, portable kernels only: `a` is read before the kernel that computes its
    new value (written in place), `b` is read after it and `c` by the kernel itself (both keep
    their copy). Three calls match the eager module, state carried across calls."""
    from executorch.exir import ExecutorchBackendConfig, to_edge
    from executorch.runtime import Runtime

    from qwen_mobile.backends.executorch.inplace_state import in_place_memory_planning

    class Stateful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in "abc":
                self.register_buffer(name, torch.zeros(4))  # the runtime zero-fills mutable buffers

        def forward(self, x):
            before = self.a + 1
            new_a, new_b = x * 2, x * 3
            after = self.b + 1
            new_c = self.c + x
            for buffer, new in ((self.a, new_a), (self.b, new_b), (self.c, new_c)):
                buffer.copy_(new)
            return before * after + new_c

    program = torch.export.export(Stateful(), (torch.ones(4),), strict=False)
    config = ExecutorchBackendConfig(memory_planning_pass=in_place_memory_planning())
    executorch_program = to_edge(program).to_executorch(config)
    copies = [n for n in executorch_program.exported_program().graph.nodes if n.target == torch.ops.aten.copy_.default]
    assert sorted(copy.args[0].name for copy in copies) == ["b_b", "b_c"]
    loaded = Runtime.get().load_program(executorch_program.buffer)
    method, eager = loaded.load_method("forward"), Stateful()
    for step in range(3):
        x = torch.randn(4)
        assert torch.equal(method.execute([x])[0], eager(x)), step


def test_the_rewrites_delegate_what_xnnpack_left_out_and_keep_every_value():
    """A view naming the dynamic length, and a tensor concatenated with itself (as q and k are
    repeated to value heads): XNNPACK leaves both out as written and takes both rewritten,
    and the program returns the eager values exactly at every length."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from qwen_mobile.backends.executorch.partition import xnnpack_partitioner

    class Heads(torch.nn.Module):
        def forward(self, x):
            heads = x.view(1, x.shape[1], 4, 8) * 2  # * 2 is exact: the comparison below can be too
            return torch.cat([heads, heads], dim=2) * 2

    def lower_with(table):
        length = torch.export.Dim("length", min=1, max=64)
        program = torch.export.export(Heads(), (torch.randn(1, 3, 32),), dynamic_shapes=({1: length},), strict=False)
        edge = to_edge_transform_and_lower(program.run_decompositions(table), partitioner=[xnnpack_partitioner()])
        nodes = edge.exported_program().graph.nodes
        left = {n.target.__name__ for n in nodes if n.op == "call_function"} - {"executorch_call_delegate", "getitem"}
        loaded = Runtime.get().load_program(edge.to_executorch().buffer)
        return left, loaded, loaded.load_method("forward")  # the method runs on the program's memory

    assert {"aten.view_copy.default", "aten.cat.default"} <= lower_with({})[0]
    left, _program, method = lower_with(rewrites.REWRITES)
    assert not {name for name in left if "view" in name or "cat" in name}, left
    for length in (1, 5, 64):
        x = torch.randn(1, length, 32)
        assert torch.equal(method.execute([x])[0], Heads()(x))


def test_input_pos_0_starts_a_new_sequence_on_the_same_method(exported, manifest, loaded):
    prefill, decode = parity.feeding_plan(*lengths(manifest))
    plan = prefill + decode
    vocab = loaded.checkpoint.config.vocab_size
    first_tokens = parity.sample_tokens(vocab, plan[-1][1])
    other_tokens = (first_tokens * 7 + 3) % vocab
    runner = BACKEND.load().open(exported, manifest)
    first = parity.run_pass(runner, first_tokens, plan)
    parity.run_pass(runner, other_tokens, plan)
    again = parity.run_pass(runner, first_tokens, plan)
    assert torch.equal(again, first)


def test_the_program_answers_the_runners_metadata_methods(exported, manifest):
    from executorch.runtime import Runtime

    runtime.register_llama_kernels()
    program = Runtime.get().load_program(exported / "model.pte")
    constants = {name: method["outputs"][0]["value"] for name, method in manifest["methods"].items() if name != "forward"}
    assert program.method_names == {"forward", *constants}
    answers = {name: list(program.load_method(name).execute([])) for name in constants}
    assert answers == {name: value if isinstance(value, list) else [value] for name, value in constants.items()}
    assert answers["get_bos_id"] == [1] and answers["get_max_seq_len"] == [manifest["max_seq_len"]]


def test_executorchs_own_llm_runner_drives_the_bundle(exported, manifest, loaded):
    """The constant methods are enough for ExecuTorch's TextLLMRunner; its greedy text is eager's."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    tokenizer = load_tokenizer(loaded.checkpoint.path)
    runtime.register_llama_kernels()
    runner = TextLLMRunner(str(exported / "model.pte"), str(exported / "tokenizer.json"))
    pieces = []
    config = GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0)
    runner.generate(PROMPT, config, token_callback=pieces.append)

    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = generate_tokens(
        eager_step(loaded.model, manifest["max_context"]), prompt_ids, max_new_tokens=12, max_context=manifest["max_context"],
        stop_ids=stop_token_ids(loaded.checkpoint), temperature=0.0, top_p=1.0, seed=0,
    )
    assert "".join(pieces) == tokenizer.decode(list(expected))


def gate_fails_on(exported: Path, manifest: dict, program: bytes, where: Path) -> bool:
    """The gate alone (no file digests) on a copy of the bundle holding `program`."""
    shutil.copytree(exported, where)
    (where / "model.pte").write_bytes(program)
    try:
        return not gate_bundle(where, manifest, BACKEND)["passed"]
    except QwenMobileError:
        return True


def test_the_gate_itself_refuses_a_corrupted_or_truncated_program(exported, manifest, tmp_path):
    data = (exported / "model.pte").read_bytes()
    middle = len(data) // 2
    flipped = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 4096]) + data[middle + 4096 :]
    assert gate_fails_on(exported, manifest, flipped, tmp_path / "flipped")
    assert gate_fails_on(exported, manifest, data[:middle], tmp_path / "truncated")
    with pytest.raises(QwenMobileError, match="cannot load"):
        runtime.load_forward(tmp_path / "truncated" / "model.pte")


def test_an_existing_directory_is_refused(source, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(QwenMobileError, match="already exists"):
        export_bundle(source, "executorch", "fp32", tmp_path / "taken")


def test_a_failing_gate_leaves_no_bundle(exported, source, tmp_path, monkeypatch):
    """The gate itself is untouched: the eager reference it compares against is shifted."""
    def lowered_already(*args):  # the real lowering ran in `exported`: its program, written where asked
        args[-1].write_bytes((exported / "model.pte").read_bytes())
        return set()

    monkeypatch.setattr(lower, "lower", lowered_already)
    reference = parity.reference_logits
    monkeypatch.setattr(parity, "reference_logits", lambda *args: reference(*args) + 1.0)
    with pytest.raises(QwenMobileError, match="disagrees with the eager model"):
        export_bundle(source, "executorch", None, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_int4_weight_only_is_refused_with_what_is_supported():
    """XNNPACK has no kernel for float activations with group-wise int4 weights (see partition.py)."""
    with pytest.raises(QwenMobileError, match="--quant 'int4' is not supported by the executorch backend; "
                       "it supports fp32, int8, 8da4w"):
        export_bundle(None, "executorch", "int4", Path("unused"))


def test_verify_command_passes_the_bundle_and_refuses_a_corrupted_copy_by_name(exported, tmp_path):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    passed = CliRunner().invoke(app, ["verify", str(exported), "--json"])
    assert passed.exit_code == 0, passed.output
    assert json.loads(passed.stdout)["passed"] is True

    corrupted = tmp_path / "corrupted"
    shutil.copytree(exported, corrupted)
    data = bytearray((corrupted / "model.pte").read_bytes())
    data[len(data) // 2] ^= 0x01  # one low-order bit: the gate alone would not see it
    (corrupted / "model.pte").write_bytes(bytes(data))
    failed = CliRunner().invoke(app, ["verify", str(corrupted), "--json"])
    assert failed.exit_code == 2 and "model.pte: its SHA-256 differs" in failed.stderr


def test_run_command_streams_what_the_eager_model_generates(exported):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    through_runtime = CliRunner().invoke(app, ["run", str(exported), "-p", PROMPT, "-n", "20"])
    eager = CliRunner().invoke(app, ["generate", "-p", PROMPT, "-n", "20"])
    assert through_runtime.exit_code == 0, through_runtime.output
    assert through_runtime.stdout == eager.stdout and through_runtime.stdout.strip()


def test_the_module_swaps_are_undone_after_tracing(loaded):
    from qwen_mobile.models.qwen3_5 import CacheAttention, GatedAttention
    from qwen_mobile.swaps import swapped

    layers = [m for m in loaded.model.modules() if isinstance(m, GatedAttention)]
    originals = [layer.cache_attention for layer in layers]
    with swapped(loaded.model, swaps.MODULE_SWAPS):
        assert all(isinstance(layer.cache_attention, swaps.NativeCacheAttention) for layer in layers)
    assert [layer.cache_attention for layer in layers] == originals
    assert all(type(layer.cache_attention) is CacheAttention for layer in layers)
