"""The Core ML backend end to end: convert, save the mlpackage, run it through the emulator,
gate, publish; verify and run on the bundle as written.

One fp32 export (about a minute and a half on two cores) is shared by the module.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen_mobile.backends.coreml import BACKEND, emulator, lower, runtime
from qwen_mobile.bundle import gate_bundle, validate_manifest
from qwen_mobile.checkpoint import load, stop_token_ids
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
from qwen_mobile.quant.plan import QuantPlan, resolve_scheme

pytest.importorskip("coremltools")

PROMPT = "ROMEO:\nWhat light"


@pytest.fixture(scope="module")
def loaded():
    return load(None)


@pytest.fixture(scope="module")
def exported(embedded_bundle) -> Path:
    """A bundle written by the real export path (embedded model, fp32)."""
    return embedded_bundle("coreml", "fp32")


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / "manifest.json").read_text())


@pytest.fixture(scope="module")
def remeasured(exported, manifest) -> dict:
    """The gate run again on the package as written (what `verify` does after the file checks)."""
    return gate_bundle(exported, manifest, BACKEND)


@pytest.fixture(scope="module")
def spec(exported):
    from coremltools.proto import Model_pb2

    model = Model_pb2.Model()
    model.ParseFromString((exported / "model.mlpackage" / emulator.SPEC).read_bytes())
    return model


def test_the_bundle_holds_every_file_and_describes_the_program(exported, manifest, loaded):
    assert sorted(p.name for p in exported.iterdir()) == ["manifest.json", "model.mlpackage", "tokenizer.json",
                                                          "tokenizer_config.json"]
    package = exported / "model.mlpackage"
    assert (package / emulator.SPEC).is_file() and (package / emulator.WEIGHTS_DIR / "weight.bin").is_file()
    checkpoint, config = loaded.checkpoint, loaded.checkpoint.config
    assert manifest["backend"] == "coreml" and manifest["artifact"] == "model.mlpackage"
    assert manifest["quant"] == {"scheme": "fp32", "compute_dtype": "float32"}
    assert manifest["special_tokens"]["eos"] == list(stop_token_ids(checkpoint))
    defaults = BACKEND.load().default_lengths
    assert manifest["max_context"] == defaults.max_context and manifest["max_seq_len"] == defaults.max_chunk
    methods = manifest["methods"]
    assert set(methods) == {"prefill", "decode"}
    assert [i["name"] for i in methods["prefill"]["inputs"]] == ["tokens", "input_pos", "length"]
    assert methods["decode"]["inputs"][0]["shape"] == [1, 1]
    assert methods["decode"]["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, config.vocab_size]}]
    # fp32 compute: every state kept at fp32 precision as an fp16 hi/lo pair (Core ML states are fp16)
    layer0 = {entry["name"]: entry for entry in manifest["state"] if entry["layer"] == 0}
    assert set(layer0) == {"layer0_conv_state_hi", "layer0_conv_state_lo", "layer0_recurrent_state_hi",
                           "layer0_recurrent_state_lo"}
    assert layer0["layer0_recurrent_state_hi"]["shape"] == [1, config.linear_num_value_heads, config.linear_key_head_dim,
                                                            config.linear_value_head_dim]
    assert {entry["dtype"] for entry in manifest["state"]} == {"float16"}
    assert manifest["precision"]["fp32_precision_states"] == ["conv_state", "key_cache", "recurrent_state", "value_cache"]
    assert {"read_state", "write_state", "matmul", "cumsum"} <= set(manifest["operations"]["prefill"])
    assert list(manifest["parity"]["runtimes"]) == ["emulator"]
    validate_manifest(manifest, exported / "manifest.json")


def test_one_program_two_functions_with_states_and_no_state_round_trips(spec, manifest):
    program = spec.mlProgram
    assert set(program.functions) == {"prefill", "decode"}
    assert spec.description.defaultFunctionName == "decode"
    for name, function in program.functions.items():
        assert function.opset == "CoreML8"  # iOS 18
        states = [i.name for i in function.inputs if i.type.HasField("stateType")]
        inputs = [i.name for i in function.inputs if not i.type.HasField("stateType")]
        assert states == manifest["methods"][name]["states"]
        assert inputs == [i["name"] for i in manifest["methods"][name]["inputs"]]
        block = function.block_specializations[function.opset]
        assert list(block.outputs) == ["logits"]  # no state goes out
        for state in function.inputs:
            if state.type.HasField("stateType"):
                assert state.type.stateType.wrappedType.tensorType.dataType == 10  # fp16
        for op in block.operations:  # static shapes only
            for output in op.outputs:
                if output.type.HasField("tensorType"):
                    assert all(d.HasField("constant") for d in output.type.tensorType.dimensions), op.type


def test_weights_are_shared_by_the_two_functions(exported, loaded):
    package = emulator.Package(exported / "model.mlpackage")
    offsets = {}
    for name, function in package.functions.items():
        offsets[name] = {op.attributes["val"].blobFileValue.offset for op in function.operations
                         if op.type == "const" and op.attributes["val"].HasField("blobFileValue")}
    assert offsets["prefill"] & offsets["decode"]
    weights = (exported / "model.mlpackage" / emulator.WEIGHTS_DIR / "weight.bin").stat().st_size
    parameters = sum(p.numel() for p in loaded.model.parameters())
    assert weights < 1.3 * 4 * parameters  # one fp32 copy, not two


def test_the_emulated_program_matches_eager_within_the_fp32_gate(remeasured):
    parity = remeasured
    assert parity["passed"] and list(parity["runtimes"]) == ["emulator"]
    assert parity["tokens_fed"] >= 64 and parity["decode_steps"] >= 16
    assert parity["prefill_chunks"] == [32, 8, 17, 7]  # ragged tails, masked inside the fixed chunk
    assert parity["ratio_to_std"] <= 1e-3 and parity["reset_max_abs_diff"] <= parity["reset_allowed"]


def test_padded_tokens_do_not_touch_the_state(exported, loaded):
    """Prefill 8 real tokens padded with two different fillers: identical states and logits."""
    sessions = [runtime.EmulatorSession(exported / "model.mlpackage") for _ in range(2)]
    tokens = list(range(100, 108))
    for session, filler in zip(sessions, (0, 4000)):
        padded = np.full((1, 32), filler, dtype=np.int32)
        padded[0, :8] = tokens
        session.call("prefill", {"tokens": padded, "input_pos": np.array([0], np.int32),
                                 "length": np.array([8], np.int32)})
    for name in sessions[0].state:
        assert np.array_equal(sessions[0].state[name], sessions[1].state[name]), name


def test_a_corrupted_or_truncated_package_fails(exported, loaded, manifest, tmp_path, monkeypatch):
    """Flipped weight bytes fail the gate (shortened to a 7-token prefill and 3 decode steps;
    the verify command test below runs it in full); a truncated program does not load."""
    import qwen_mobile.parity as parity

    monkeypatch.setattr(parity, "PREFILL_CHUNKS", (7,))
    monkeypatch.setattr(parity, "DECODE_STEPS", 3)
    flipped = tmp_path / "flipped"
    shutil.copytree(exported, flipped)
    blob = flipped / "model.mlpackage" / emulator.WEIGHTS_DIR / "weight.bin"
    data = bytearray(blob.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    blob.write_bytes(bytes(data))
    try:
        failed = not gate_bundle(flipped, manifest, BACKEND)["passed"]  # the gate alone, no digests
    except QwenMobileError:
        failed = True
    assert failed

    truncated = tmp_path / "truncated.mlpackage"
    shutil.copytree(exported / "model.mlpackage", truncated)
    spec = truncated / emulator.SPEC
    spec.write_bytes(spec.read_bytes()[: spec.stat().st_size // 2])
    with pytest.raises(QwenMobileError, match="model.mlmodel"):
        runtime.open_session(truncated)


def test_verify_command_passes_the_bundle_and_fails_a_corrupted_copy(exported, tmp_path):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    passed = CliRunner().invoke(app, ["verify", str(exported), "--json"])
    assert passed.exit_code == 0, passed.output
    assert json.loads(passed.stdout)["passed"] is True

    corrupted = tmp_path / "corrupted"
    shutil.copytree(exported, corrupted)
    spec = corrupted / "model.mlpackage" / emulator.SPEC
    spec.write_bytes(spec.read_bytes()[:1000])
    failed = CliRunner().invoke(app, ["verify", str(corrupted), "--json"])
    assert failed.exit_code == 2 and "model.mlmodel: 1000 bytes, the manifest records" in failed.stderr


def test_run_command_streams_what_the_eager_model_generates(exported):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    through_emulator = CliRunner().invoke(app, ["run", str(exported), "-p", PROMPT, "-n", "12"])
    eager = CliRunner().invoke(app, ["generate", "-p", PROMPT, "-n", "12"])
    assert through_emulator.exit_code == 0, through_emulator.output
    assert through_emulator.stdout == eager.stdout and through_emulator.stdout.strip()


def test_a_failing_gate_leaves_no_bundle(exported, tmp_path, monkeypatch):
    """The gate is untouched (shortened to a 7-token prefill and 3 decode steps); its eager
    reference is shifted."""
    import qwen_mobile.parity as parity

    def copy_package(model, plan, out, *args, **kwargs):
        shutil.copytree(exported / "model.mlpackage", out)
        return lower.Lowered(encoded={"prefill": {}, "decode": {}})

    monkeypatch.setattr(lower, "lower", copy_package)  # the real conversion already ran in `exported`
    monkeypatch.setattr(parity, "PREFILL_CHUNKS", (7,))
    monkeypatch.setattr(parity, "DECODE_STEPS", 3)
    reference = parity.reference_logits
    monkeypatch.setattr(parity, "reference_logits", lambda *args: reference(*args) + 1.0)
    with pytest.raises(QwenMobileError, match="disagrees with the eager model"):
        export_bundle(None, "coreml", "fp32", tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_schemes_it_cannot_encode_are_refused_by_name():
    with pytest.raises(QwenMobileError,
                       match="--quant '8da4w' is not supported by the coreml backend; it supports fp16, fp32, int8, int4"):
        export_bundle(None, "coreml", "8da4w", Path("unused"))


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs only on Apple systems")
def test_core_ml_itself_agrees_on_macos(remeasured):
    assert list(remeasured["runtimes"]) == ["coreml"] and remeasured["passed"]


def test_the_conversion_draws_no_progress_bars(loaded, capfd):
    # the CLI prints its own steps; coremltools' tqdm bars (one per pass pipeline and frontend) would
    # fill the terminal between them
    plan = QuantPlan(resolve_scheme("fp32"), {})
    lower.convert_function(loaded.model, 64, None, "float32", lower.split_kinds("float32", "float32"), plan, {})
    err = capfd.readouterr().err
    assert "Running MIL" not in err and "Converting PyTorch Frontend" not in err, err[-300:]


def test_the_functions_share_exactly_the_constants_coremltools_own_pass_would_pair():
    """exact_shared_weights pairs equal constants by a digest of their bytes (coremltools' pass compares
    candidates with np.allclose in float64: 5.9 GiB at 0.8B). Same pairs, and the pass is given back."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    weight = np.arange(800, dtype=np.float32).reshape(4, 200)
    nudged = weight.copy()
    nudged[3, 199] = np.nextafter(nudged[3, 199], np.float32(np.inf))  # equal in the first 100 values, then not

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 200))])
    def program(x):
        x = mb.add(x=x, y=mb.const(val=weight, name="first"))
        x = mb.add(x=x, y=mb.const(val=weight.copy(), name="same_value"))
        return mb.add(x=x, y=mb.const(val=nudged, name="one_ulp_apart"))

    deduplication = type(PASS_REGISTRY["common::const_deduplication"])
    original = deduplication.__dict__["find_constants"]
    block = program.functions["main"]

    def pairs():
        return {first.name: sorted(var.name for var in later)
                for first, later in deduplication.find_constants([block]).items()}

    theirs = pairs()
    with lower.exact_shared_weights():
        ours = pairs()
    assert ours == theirs == {"first": ["same_value"], "one_ulp_apart": []}
    assert deduplication.__dict__["find_constants"] is original


def test_opening_the_backend_prints_nothing_of_coremltools_import_notes():
    import subprocess

    code = ("from qwen_mobile.registry import get_backend; get_backend('coreml', None)[0].load(); "
            "import coremltools")
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "coremltools" not in finished.stderr, finished.stderr  # torchao's own import notes may remain
