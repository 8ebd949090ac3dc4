"""The TFLite backend end to end: convert, write, run the written .tflite through the LiteRT
interpreter (XNNPACK on and off), gate, publish; and what the flatbuffer holds.

One export (the slow part, about two minutes on two shared cores) is shared by the module;
the tests that need a failing or refused export reuse its flatbuffer instead of converting again.
"""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_mobile.backends.tflite import BACKEND, lower, npu_report, quantize, runtime, swaps
from qwen_mobile.bundle import gate_bundle, sha256, validate_manifest
from qwen_mobile.checkpoint import load, stop_token_ids
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
from qwen_mobile.models.qwen3_5 import GatedDeltaNet
from qwen_mobile.quant.plan import make_plan, release_planned_weights, resolve_scheme

PROMPT = "ROMEO:\nWhat light"


@pytest.fixture(scope="module")
def loaded():
    return load(None)


@pytest.fixture(scope="module")
def exported(embedded_bundle) -> Path:
    """A bundle written by the real export path (embedded model, default quant scheme fp32)."""
    return embedded_bundle("tflite", "fp32")


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / "manifest.json").read_text())


@pytest.fixture(scope="module")
def remeasured(exported, manifest) -> dict:
    """The gate run again on the file as written (what `verify` does after the file checks)."""
    return gate_bundle(exported, manifest, BACKEND)


DEFAULTS = BACKEND.load().default_lengths


def interpreter(path: Path, xnnpack: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    return Interpreter(model_path=str(path), **options)


def test_the_bundle_holds_every_file_and_describes_both_signatures(exported, manifest, loaded):
    assert sorted(p.name for p in exported.iterdir()) == [
        "manifest.json", "model.tflite", "npu_report.json", "tokenizer.json", "tokenizer_config.json"
    ]
    checkpoint, config = loaded.checkpoint, loaded.checkpoint.config
    assert manifest["backend"] == "tflite" and manifest["artifact"] == "model.tflite"
    assert manifest["quant"] == {"scheme": "fp32", "compute_dtype": "float32"}
    assert manifest["source"]["config_hash"] == checkpoint.config_hash
    assert manifest["max_context"] == DEFAULTS.max_context and manifest["max_seq_len"] == DEFAULTS.max_chunk
    assert manifest["special_tokens"]["eos"] == list(stop_token_ids(checkpoint))
    validate_manifest(manifest, exported / "manifest.json")

    prefill, decode = (manifest["methods"][name] for name in ("prefill", "decode"))
    inputs = {t["name"]: t for t in prefill["inputs"]}
    assert inputs["tokens"] == {"name": "tokens", "dtype": "int32", "shape": [1, manifest["max_seq_len"]]}
    assert inputs["length"]["dtype"] == "int32" and inputs["input_pos"]["dtype"] == "int32"
    assert {t["name"]: t for t in decode["inputs"]}["tokens"]["shape"] == [1, 1]
    for method in (prefill, decode):
        outputs = {t["name"]: t for t in method["outputs"]}
        assert outputs["logits"] == {"name": "logits", "dtype": "float32", "shape": [1, config.vocab_size]}
        method_inputs = {t["name"]: t for t in method["inputs"]}
        # every state output feeds an input of the same dtype and shape, and every state input is fed
        for output, feeds in manifest["state_feeds"].items():
            assert {k: v for k, v in outputs[output].items() if k != "name"} == {
                k: v for k, v in method_inputs[feeds].items() if k != "name"
            }
        assert set(method_inputs) - {"tokens", "input_pos", "length"} == set(manifest["state_feeds"].values())
    state = {entry["name"]: entry for entry in manifest["state"]}
    assert set(state) == set(manifest["state_feeds"].values())  # the manifest names each input it lists
    for entry in manifest["state"]:  # as the signatures take them
        assert entry["shape"] == {t["name"]: t for t in decode["inputs"]}[entry["name"]]["shape"]
    # stored layouts (swaps.stored_shape): batch dropped, values and recurrent state transposed
    assert state["layer0_recurrent_state"]["dtype"] == "float32"
    assert state["layer0_recurrent_state"]["shape"] == [
        config.linear_num_value_heads, config.linear_value_head_dim, config.linear_key_head_dim]
    assert state["layer3_key_cache"]["shape"] == [config.num_key_value_heads, manifest["max_context"], config.head_dim]
    assert state["layer3_value_cache"]["shape"] == [config.num_key_value_heads, config.head_dim, manifest["max_context"]]
    # every cache may be bound in place, nothing else
    caches = sorted(e["name"] for e in manifest["state"] if e["kind"] in ("key_cache", "value_cache"))
    assert sorted(manifest["state_in_place"]) == caches and caches


def test_the_gate_passes_with_xnnpack_on_and_off_over_64_tokens_of_prefill_then_decode(manifest, remeasured):
    parity = remeasured
    assert parity["passed"] and set(parity["runtimes"]) == {"xnnpack", "builtin_kernels"}
    for result in parity["runtimes"].values():
        assert result["passed"] and result["tolerance"] == 1e-3
        assert result["ratio_to_std"] <= 1e-3
        assert result["tokens_fed"] >= 64 and len(result["prefill_chunks"]) >= 2 and result["decode_steps"] >= 16
        assert result["prefill_chunks"] != [manifest["max_seq_len"]] * len(result["prefill_chunks"])  # tails masked


def test_the_flatbuffer_holds_builtin_ops_only(exported):
    """Read the operator codes straight from the file: no CUSTOM op (Flex ops are custom ops named Flex...)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf((exported / "model.tflite").read_bytes(), 0)
    custom = schema.BuiltinOperator.CUSTOM
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    assert codes and custom not in codes
    assert not any(code.customCode for code in model.operatorCodes)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    assert not any(names[c].startswith("STABLEHLO_") for c in codes)  # no kernel for those in the interpreter
    assert {"FULLY_CONNECTED", "BATCH_MATMUL", "CUMSUM"} <= {names[c] for c in codes}
    assert sorted(sg.name.decode() for sg in model.subgraphs) == ["decode", "prefill"]


def test_the_model_is_driven_from_the_manifest_alone(exported, manifest, loaded):
    """Only the interpreter, the manifest's names and its state_feeds: prefill a short chunk, decode three tokens."""
    signatures = interpreter(exported / manifest["artifact"])
    prefill, decode = signatures.get_signature_runner("prefill"), signatures.get_signature_runner("decode")
    spec = {t["name"]: t for t in manifest["methods"]["prefill"]["inputs"]}
    state = {name: np.zeros(spec[name]["shape"], dtype=spec[name]["dtype"]) for name in manifest["state_feeds"].values()}
    tokens = torch.randint(0, manifest["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(1))
    chunk = np.zeros(spec["tokens"]["shape"], dtype=np.int32)
    chunk[0, :20] = tokens[0, :20].numpy()
    outputs = [prefill(tokens=chunk, input_pos=np.array([0], np.int32), length=np.array([20], np.int32), **state)]
    for position in range(20, 23):
        state = {name: outputs[-1][output] for output, name in manifest["state_feeds"].items()}
        token = tokens[:, position : position + 1].numpy().astype(np.int32)
        outputs.append(decode(tokens=token, input_pos=np.array([position], np.int32), **state))

    model, eager_state, expected = loaded.model, loaded.model.init_state(manifest["max_context"]), []
    with torch.no_grad():
        for start, end in ((0, 20), (20, 21), (21, 22), (22, 23)):
            logits, eager_state = model(tokens[:, start:end], torch.tensor([start]), eager_state)
            expected.append(logits[0])
    for got, want in zip(outputs, expected):
        assert np.abs(got["logits"][0] - want.numpy()).max() <= 1e-3 * want.std().item()


def test_padding_changes_neither_the_logits_nor_the_state(exported, manifest):
    for xnnpack in (True, False):
        prefill = interpreter(exported / "model.tflite", xnnpack).get_signature_runner("prefill")
        spec = prefill.get_input_details()
        state = {name: np.random.default_rng(0).standard_normal(spec[name]["shape"]).astype(np.float32) * 0.1
                 for name in manifest["state_feeds"].values()}
        results = []
        for fill in (0, 7, 4000):
            chunk = np.full(spec["tokens"]["shape"], fill, dtype=np.int32)
            chunk[0, :9] = np.arange(100, 109)
            results.append(prefill(tokens=chunk, input_pos=np.array([5], np.int32), length=np.array([9], np.int32), **state))
        for other in results[1:]:
            for name, value in results[0].items():
                np.testing.assert_array_equal(other[name], value, err_msg=name)


def test_the_caches_written_in_place_and_a_chunk_at_the_end_of_the_context_match_the_eager_model(
        exported, manifest, loaded):
    """The runtime binds each cache as its own output (state_in_place) and swaps the other state;
    both runtimes match eager across a prefill chunk whose slot window would run past the end of
    the context (written as a window that fits: only its real rows change), then decode to the last
    slot. Binding every state in swapped buffers instead gives the same logits bit for bit."""
    model, max_context, chunk = loaded.model, manifest["max_context"], manifest["max_seq_len"]
    tokens = torch.randint(0, manifest["vocab_size"], (1, max_context), generator=torch.Generator().manual_seed(3))
    spans = [(0, 32)] + [(p, p + chunk) for p in range(32, max_context - 40, chunk)]
    start = spans[-1][1]
    spans += [(start, max_context - 12), (max_context - 12, max_context - 4)]  # this chunk's window is clamped
    spans += [(p, p + 1) for p in range(max_context - 4, max_context)]
    assert spans[-3][0] + chunk > max_context and spans[-1][1] == max_context
    state, expected = model.init_state(max_context), []
    with torch.no_grad():
        for a, b in spans:
            logits, state = model(tokens[:, a:b], torch.tensor([a]), state)
            expected.append(logits[0].numpy())
    ids = tokens[0].tolist()
    for xnnpack in (True, False):
        results = []
        for in_place in (manifest["state_in_place"], ()):
            engine = runtime.TFLiteModel(exported / "model.tflite", manifest["state_feeds"], max_context,
                                         xnnpack=xnnpack, in_place=in_place)
            assert engine.in_place == list(in_place)
            results.append([engine.step(ids[a:b], a) for a, b in spans])
        for got, want in zip(results[0], expected):
            assert np.abs(got - want).max() <= 1e-3 * want.std()
        for first, second in zip(*results):
            np.testing.assert_array_equal(first, second)


def test_only_a_slice_write_that_nothing_else_reads_around_is_bound_in_place(tmp_path):
    """lower.in_place_state reads the file: a cache output made by DYNAMIC_UPDATE_SLICE of its input
    qualifies; one whose input another op reads after the write does not."""
    import contextlib
    import io

    import litert_torch

    class Cache(torch.nn.Module):
        def __init__(self, read_after: bool):
            super().__init__()
            self.read_after = read_after

        def forward(self, cache, new, pos):
            written = swaps.write_rows(cache, new, pos, None, axis=1)
            outputs = {"cache_out": written, "other_out": new * 2}
            if self.read_after:
                outputs["other_out"] = cache.sum(1, keepdim=True) + new
            return outputs

    sample = {"cache": torch.zeros(2, 16, 8), "new": torch.ones(2, 1, 8), "pos": torch.tensor([3], dtype=torch.int32)}
    feeds = {"cache_out": "cache", "other_out": "new"}
    found = []
    for read_after in (False, True):
        with contextlib.redirect_stdout(io.StringIO()):
            flatbuffer = litert_torch.convert(Cache(read_after).eval(), (), sample_kwargs=sample).model_content()
        found.append(lower.in_place_state(bytes(flatbuffer), feeds))
    assert found == [["cache"], []]


def test_packed_weights_are_kept_in_a_file_named_by_the_artifacts_digest(exported, manifest, weight_cache):
    """XNNPACK's weight cache: one file per artifact, under $QWEN_MOBILE_CACHE, named by the file's
    SHA-256 (never inside the bundle, whose files the manifest's digests cover); a later load maps it."""
    path = runtime.weight_cache_path(exported / "model.tflite")
    assert path.parent == weight_cache / "xnnpack" and path.name.startswith(sha256(exported / "model.tflite"))
    first = runtime.TFLiteModel(exported / "model.tflite", manifest["state_feeds"], manifest["max_context"])
    assert first.weight_cache == path and path.stat().st_size > 0
    assert not list(path.parent.glob("*.partial"))
    again = runtime.TFLiteModel(exported / "model.tflite", manifest["state_feeds"], manifest["max_context"])
    modified = path.stat().st_mtime_ns
    np.testing.assert_array_equal(first.step([5, 6, 7], 0), again.step([5, 6, 7], 0))
    assert path.stat().st_mtime_ns == modified
    assert sorted(p.name for p in exported.iterdir()) == sorted(["manifest.json", *manifest["files"]])


def test_conversion_leaves_the_eager_model_as_it_was(exported, loaded):
    model = loaded.model
    assert all(type(m.conv1d) is torch.nn.Conv1d for m in model.modules() if isinstance(m, GatedDeltaNet))
    assert isinstance(torch.ops.qwen_mobile.gated_delta_rule, torch._ops.OpOverloadPacket)


def test_the_npu_report_lists_every_op_with_static_shapes_against_the_support_table(exported):
    from ai_edge_litert import schema_py_generated as schema

    report = json.loads((exported / "npu_report.json").read_text())
    assert report["builtin_only"] and report["all_shapes_static"] and report["flex_ops"] == []
    model = schema.ModelT.InitFromPackedBuf((exported / "model.tflite").read_bytes(), 0)
    assert len(report["operators"]) == sum(len(sg.operators) for sg in model.subgraphs)
    for op in report["operators"]:
        assert op["signature"] in ("prefill", "decode") and op["outputs"]
        tensors = op["inputs"] + op["outputs"]
        if op["op"] == "RESHAPE" and op["outputs"][0]["shape"] == []:  # to a scalar (a slice start): an empty shape
            assert op["inputs"][1]["shape"] == [0] and op["inputs"][1]["static"]
            tensors = [op["inputs"][0], *op["outputs"]]
        assert all(t["static"] and all(d > 0 for d in t["shape"]) or t["shape"] == [] for t in tensors)
        assert set(op) >= {"qualcomm", "mediatek"}
    table = npu_report.support_table()
    builtins = {name for name in vars(schema.BuiltinOperator) if not name.startswith("_")}
    tensor_types = {name for name in vars(schema.TensorType) if not name.startswith("_")}
    for target in table.values():
        assert target["source"].startswith("https://github.com/google-ai-edge/LiteRT/blob/")
        assert set(target["ops"]) <= builtins and set(target["dtypes"]) <= tensor_types
    for name, summary in report["targets"].items():
        unsupported = {op["op"] for op in report["operators"] if not op[name]["supported"]}
        assert set(summary["unsupported_by_op"]) == unsupported
        assert summary["supported"] + sum(summary["unsupported_by_op"].values()) == len(report["operators"])


def test_the_depthwise_conv_split_by_channels_computes_the_whole_conv():
    """TFLite's builtin depthwise conv stalls on Qwen3.5-0.8B's 6,144 channels, so the conv is
    lowered in blocks (swaps.MAX_DEPTHWISE_CHANNELS); blocks of 4 over 10 channels here."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(10, 10, 4, groups=10, bias=False)
    x = torch.randn(1, 10, 7)
    split = swaps.ChannelSplitConv1d(conv, max_channels=4)
    assert split.weight is conv.weight
    torch.testing.assert_close(split(x), conv(x), rtol=0, atol=0)


def test_a_flatbuffer_with_a_custom_op_is_refused():
    report = {"builtin_only": False, "custom_ops": ["CUSTOM:FlexCumsum"], "all_shapes_static": True}
    with pytest.raises(QwenMobileError, match="non-builtin ops CUSTOM:FlexCumsum"):
        npu_report.require_builtin_only(report, Path("model.tflite"))


def weight_offset(data: bytes, weight: torch.Tensor) -> int:
    """Where a float32 weight's bytes sit in the flatbuffer."""
    offset = data.find(weight.detach().float().contiguous().numpy().tobytes()[:256])
    assert offset > 0, "the weight is not stored as float32 in the file"
    return offset


def test_a_corrupted_or_truncated_artifact_fails_the_gate(exported, manifest, loaded, tmp_path):
    """The gate alone (no file digests, which refuse both before it runs)."""
    corrupted = tmp_path / "corrupted"
    shutil.copytree(exported, corrupted)
    data = bytearray((corrupted / "model.tflite").read_bytes())
    start = weight_offset(bytes(data), loaded.model.layers[0].mlp.down_proj.weight) + 1024
    data[start : start + 4096] = bytes(b ^ 0xFF for b in data[start : start + 4096])
    (corrupted / "model.tflite").write_bytes(bytes(data))
    assert gate_bundle(corrupted, manifest, BACKEND)["passed"] is False

    (corrupted / "model.tflite").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(QwenMobileError, match="cannot load"):
        gate_bundle(corrupted, manifest, BACKEND)


def test_a_failing_gate_leaves_no_bundle(exported, tmp_path, monkeypatch):
    """The gate itself is untouched: the eager reference it compares against is shifted."""
    written = (exported / "model.tflite").read_bytes()
    monkeypatch.setattr(lower, "convert", lambda *args: written)  # the real conversion already ran in `exported`
    import qwen_mobile.parity as parity

    reference = parity.reference_logits
    monkeypatch.setattr(parity, "reference_logits", lambda *args: reference(*args) + 1.0)
    with pytest.raises(QwenMobileError, match="disagrees with the eager model"):
        export_bundle(None, "tflite", None, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_quant_schemes_it_cannot_encode_are_refused_by_name(loaded, tmp_path):
    with pytest.raises(QwenMobileError, match="--quant 'fp16' is not supported by the tflite backend; it supports"):
        export_bundle(None, "tflite", "fp16", tmp_path / "a")
    plan = make_plan(loaded.model, resolve_scheme("8da4w"))
    name = "layers.0.linear_attn.in_proj_qkv.weight"
    scale = plan.weights[name].scale.clone()
    scale[0, 0] = 2.0**-20 * (1 + 2.0**-7)  # bf16-exact, not fp16-exact
    plan.weights[name] = replace(plan.weights[name], scale=scale)
    with pytest.raises(QwenMobileError, match=f"^{name}: a scale is not exact in fp16"):
        BACKEND.load().check(plan, DEFAULTS)  # what a library caller passing its own plan meets
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme", ["int4", "8da4w"])
def test_a_4bit_export_carries_the_plans_integers_and_passes_the_gate_through_both_runtimes(loaded, tmp_path, scheme):
    """The quantized path end to end from the CLI: planned weights converted as signature inputs,
    then made constants of the plan's integers and scales (read back from the written file); the
    app-facing signatures take no weight. 8da4w: every planned linear a blockwise INT4
    FULLY_CONNECTED (XNNPACK's qd8 x qb4w kernel), the lookup on the same integers."""
    import subprocess
    import sys

    out = tmp_path / "bundle"
    result = subprocess.run([sys.executable, "-m", "qwen_mobile", "export", "--backend", "tflite", "--quant", scheme,
                             "--max-context", "96", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == f"{out}\n"  # the converter's own progress (C++ and Python) stays off stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_context"] == 96 and manifest["parity"]["passed"]
    assert set(manifest["parity"]["runtimes"]) == {"xnnpack", "builtin_kernels"}
    remeasured = gate_bundle(out, manifest, BACKEND)
    assert remeasured["passed"] and all(r["passed"] for r in remeasured["runtimes"].values())
    for method in manifest["methods"].values():
        assert not [entry["name"] for entry in method["inputs"] if entry["name"].startswith("weight__")]
    plan = make_plan(loaded.model, resolve_scheme(scheme))
    written = (out / "model.tflite").read_bytes()
    stored = quantize.read_weights(written)
    shared = {"lm_head.weight"} if loaded.model.config.tie_word_embeddings else set()
    assert set(stored) == set(plan.weights) - shared
    for name, entry in stored.items():
        weight = plan.weights[name]
        np.testing.assert_array_equal(entry["qdata"].reshape(weight.qdata.shape), weight.qdata)
        np.testing.assert_array_equal(entry["scale"].reshape(weight.scale.shape), weight.scale)
    # the gate looked every planned weight up in the file; one integer off in the plan is named
    assert manifest["parity"]["weights"] == {"checked": len(plan.weights), "differ": []}
    mutated = "layers.1.mlp.down_proj.weight"
    qdata = plan.weights[mutated].qdata.clone()
    qdata[0, 0] = -qdata[0, 0] if qdata[0, 0] != 0 else 1
    plan.weights[mutated] = replace(plan.weights[mutated], qdata=qdata)
    assert BACKEND.load().missing_weights(out, manifest, plan) == [mutated]
    if scheme == "8da4w":
        linears = {"embed_tokens.weight" if name in shared else name for name, w in plan.weights.items() if w.activations}
        for signature in ("prefill", "decode"):
            taken = [f for f in quantize.fully_connected_filters(written) if f["signature"] == signature]
            blockwise = [f for f in taken if f["quantization"] == "blockwise"]
            assert sorted(f["filter"] for f in blockwise) == sorted(f"{name}.qdata" for name in linears)
            assert all(f["type"] == "INT4" and f["produced_by"] is None for f in blockwise)
            assert [f["type"] for f in taken if f not in blockwise] == ["FLOAT32"] * len(plan.kept_float)
        assert [(f["table"], f["quantization"]) for f in quantize.embedding_lookups(written)] == [
            ("embed_tokens.weight.qdata", "blockwise")] * 2


def test_an_8da8w_conversion_feeds_every_planned_linear_its_int8_filter_directly(loaded):
    """TFLite's hybrid FULLY_CONNECTED for every linear the plan quantizes: the plan's int8 integers and
    scales as the filter, no DEQUANTIZE in front, each input row quantized with its own scale and zero
    point; the tied lm_head takes the embedding's integers. The linears the plan keeps float stay float.
    Converted from a model whose planned weights are released, as a single-plan export lowers it
    (lowering_reads_planned_weights False): every integer in the file can only be the plan's."""
    plan = make_plan(loaded.model, resolve_scheme("8da8w"))
    released = copy.deepcopy(loaded.model)
    release_planned_weights(released, plan)
    flatbuffer = lower.convert(released, 96, DEFAULTS.max_chunk, plan)
    tied = loaded.model.config.tie_word_embeddings
    linears = {"embed_tokens.weight" if tied and name == "lm_head.weight" else name
               for name, weight in plan.weights.items() if weight.activations}
    filters = quantize.fully_connected_filters(flatbuffer)
    for signature in ("prefill", "decode"):
        taken = [f for f in filters if f["signature"] == signature]
        hybrid = [f for f in taken if f["type"] == "INT8"]
        assert sorted(f["filter"] for f in hybrid) == sorted(f"{name}.qdata" for name in linears)
        assert all(f["produced_by"] is None and f["asymmetric_quantize_inputs"] for f in hybrid)
        assert all(f["version"] == quantize.HYBRID_FULLY_CONNECTED_VERSION for f in hybrid)
        kept_float = [(f["type"], f["produced_by"]) for f in taken if f not in hybrid]  # in_proj_a and in_proj_b
        assert kept_float == [("FLOAT32", None)] * len(plan.kept_float)
    stored = quantize.read_weights(flatbuffer)
    assert set(stored) == linears | {"embed_tokens.weight"}
    for name, entry in stored.items():
        weight = plan.weights[name]
        np.testing.assert_array_equal(entry["qdata"], weight.qdata.numpy())
        np.testing.assert_array_equal(entry["scale"], weight.scale.reshape(-1).numpy())
        np.testing.assert_array_equal(entry["zero_point"], weight.zero_point.reshape(-1).numpy())


def test_run_command_streams_what_the_eager_model_generates(exported):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    through_runtime = CliRunner().invoke(app, ["run", str(exported), "-p", PROMPT, "-n", "20"])
    eager = CliRunner().invoke(app, ["generate", "-p", PROMPT, "-n", "20"])
    assert through_runtime.exit_code == 0, through_runtime.output
    assert through_runtime.stdout == eager.stdout and through_runtime.stdout.strip()


def test_the_runtime_refuses_what_the_signatures_cannot_take(exported, manifest):
    model = runtime.TFLiteModel(exported / "model.tflite", manifest["state_feeds"], manifest["max_context"])
    with pytest.raises(QwenMobileError, match="do not fit"):
        model.step(list(range(manifest["max_seq_len"] + 1)), 0)
    with pytest.raises(QwenMobileError, match="do not fit"):
        model.step([1], manifest["max_context"])
