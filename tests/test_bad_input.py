"""Bad input of every kind ends in one line naming the file, field or flag, and exit 2; never a
traceback or a hang. Fuzzed: config.json and manifest.json (types, huge numbers, deep nesting,
missing and extra keys, path strings, broken bytes). Probed: the cases users and adversaries
hit (see the issue "Bundles you can trust").

QWEN_MOBILE_SLOW=1 runs ten times the examples.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qwen_mobile.bundle import MANIFEST, lengths_of, manifest_digest, open_runner, read_manifest
from qwen_mobile.checkpoint import EMBEDDED_MODEL, load_checkpoint, open_checkpoint
from qwen_mobile.cli import app
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.info import describe
from qwen_mobile.quant.plan import scheme_from_manifest
from qwen_mobile.staging import staged_directory

SLOW = os.environ.get("QWEN_MOBILE_SLOW") == "1"
CONFIG_EXAMPLES = 3000 if SLOW else 300
MANIFEST_EXAMPLES = {"executorch": 1000, "tflite": 250, "coreml": 250} if SLOW else {"executorch": 100, "tflite": 25, "coreml": 25}
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
cli = CliRunner()

# -------------------------------------------------------------------------------- strategies

HOSTILE = [10**30, 2**63, -(2**63), -1, 0, 1e30, 1e-30, -0.0, float("inf"), float("nan"), True, False, None, "",
           "../../etc/passwd", "/etc/passwd", "\U0001f4a5", "a" * 5000, [], {}, [[[[[[]]]]]], {"": {"": None}}]
leaves = st.one_of(st.sampled_from(HOSTILE), st.integers(), st.floats(), st.text(max_size=20), st.booleans(), st.none())
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)


def paths_of(document, prefix=()):
    """Every path into a JSON document (keys and list indexes)."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document[:6]):
            yield from paths_of(value, (*prefix, index))


@st.composite
def mutated(draw, base: dict):
    """A copy of `base` with one to three edits: a value replaced, a key removed or added, or a
    whole subtree nested thousands deep."""
    document = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths_of(document))[1:] or [()]))
        if not path:
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "remove", "add", "deep"]))
        if action == "remove":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(values)
        elif action == "deep":
            parent[path[-1]] = "DEEP"
        else:
            parent[path[-1]] = draw(values)
    return document


def dumps(document) -> str:
    """JSON text, with a "DEEP" placeholder expanded to 3,000 levels of nesting (json.dumps itself
    would recurse that deep)."""
    return json.dumps(document).replace('"DEEP"', "[" * 3000 + "]" * 3000)


def raises_only_one_line_errors(call) -> None:
    try:
        call()
    except QwenMobileError as error:
        assert "\n" not in str(error), str(error)


# -------------------------------------------------------------------------------- config.json


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """The embedded checkpoint with its config.json ours to rewrite (the other files linked)."""
    directory = tmp_path_factory.mktemp("fuzzed-checkpoint")
    for path in EMBEDDED_MODEL.iterdir():
        if path.name != "config.json":
            (directory / path.name).symlink_to(path)
    return directory


BASE_CONFIG = json.loads((EMBEDDED_MODEL / "config.json").read_text())


@settings(FUZZ, max_examples=CONFIG_EXAMPLES)
@given(config=mutated(BASE_CONFIG))
def test_a_mutated_config_loads_or_fails_in_one_line(checkpoint_dir, config):
    (checkpoint_dir / "config.json").write_text(dumps(config))

    def load():
        checkpoint = open_checkpoint(str(checkpoint_dir))
        describe(checkpoint)
        load_checkpoint(checkpoint)

    raises_only_one_line_errors(load)


@settings(FUZZ, max_examples=CONFIG_EXAMPLES // 3)
@given(data=st.binary(max_size=200), cut=st.integers(0, 2000))
def test_broken_config_bytes_fail_in_one_line(checkpoint_dir, data, cut):
    text = (EMBEDDED_MODEL / "config.json").read_bytes()
    (checkpoint_dir / "config.json").write_bytes(text[:cut] + data)
    raises_only_one_line_errors(lambda: load_checkpoint(open_checkpoint(str(checkpoint_dir))))


# -------------------------------------------------------------------------------- manifest.json


def manifest_fuzz(backend: str, quant: str):
    @settings(FUZZ, max_examples=MANIFEST_EXAMPLES[backend])
    @given(data=st.data())
    def test(embedded_bundle, tmp_path_factory, data):
        source = embedded_bundle(backend, quant)
        bundle = tmp_path_factory.getbasetemp() / f"fuzzed-{backend}"
        if not bundle.exists():
            shutil.copytree(source, bundle)
        base = json.loads((source / MANIFEST).read_text())
        manifest = data.draw(mutated(base))
        if data.draw(st.booleans()) and isinstance(manifest, dict):
            try:  # as an editor who knows the digest would: then the checks behind it must hold
                manifest["manifest_sha256"] = manifest_digest(manifest)
            except ValueError:
                pass
        (bundle / MANIFEST).write_text(dumps(manifest))

        def use():
            accepted, _ = read_manifest(bundle)
            lengths_of(accepted)
            scheme_from_manifest(accepted["quant"])
            runner, _ = open_runner(bundle)
            runner.step([1, 2, 3][: runner.max_chunk], 0)

        raises_only_one_line_errors(use)

    return test


test_a_mutated_executorch_manifest_is_used_or_refused_in_one_line = manifest_fuzz("executorch", "fp32")
test_a_mutated_tflite_manifest_is_used_or_refused_in_one_line = manifest_fuzz("tflite", "fp32")
test_a_mutated_coreml_manifest_is_used_or_refused_in_one_line = manifest_fuzz("coreml", "fp32")


# -------------------------------------------------------------------------------- probes


def one_line(result, *fragments):
    stderr = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize("out,fragment", [("/proc/qwen-mobile-bundle", "/proc"), ("{file}/bundle", "not a directory")])
def test_an_output_path_that_cannot_be_created_fails_before_any_slow_work(tmp_path, out, fragment):
    (tmp_path / "file").write_text("a regular file")
    started = time.perf_counter()
    result = cli.invoke(app, ["export", "--out", out.format(file=tmp_path / "file")])
    one_line(result, fragment)
    assert "loading the checkpoint" not in result.stderr and time.perf_counter() - started < 20


def test_a_huge_vocab_size_in_config_is_a_one_line_error(checkpoint_dir):
    (checkpoint_dir / "config.json").write_text(json.dumps({**BASE_CONFIG, "vocab_size": 10**30}))
    one_line(cli.invoke(app, ["info", str(checkpoint_dir)]), "config.json", "vocab_size")
    (checkpoint_dir / "config.json").write_text(json.dumps({**BASE_CONFIG, "vocab_size": 1e30}))
    one_line(cli.invoke(app, ["info", str(checkpoint_dir)]), "config.json", "vocab_size")


def test_a_manifest_with_a_tiny_context_is_verified_without_a_traceback(embedded_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(embedded_bundle("executorch", "fp32"), bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.update(max_context=4, max_seq_len=4)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    result = cli.invoke(app, ["verify", str(bundle), "--json"])
    assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
    assert json.loads(result.stdout)["positions_checked"] == 1  # one 4-token prefill call is all that fits


def test_a_bad_manifest_field_is_blamed_on_the_field_not_a_flag(embedded_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(embedded_bundle("executorch", "fp32"), bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["quant"]["scheme"] = "int9"
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    result = cli.invoke(app, ["verify", str(bundle)])
    one_line(result, "field quant/scheme")
    assert "--quant" not in result.stderr


def test_run_names_what_sets_the_context_not_a_flag_it_lacks(embedded_bundle):
    result = cli.invoke(app, ["run", str(embedded_bundle("executorch", "fp32")), "-p", "word " * 3000])
    one_line(result, "--prompt", "max_context")
    assert "raise --max-context" not in result.stderr


def test_help_shows_every_default_and_choice():
    text = cli.invoke(app, ["export", "--help"], env={"COLUMNS": "400"}).stdout
    for shown in ("default: the embedded qwen3.5-tiny", "[default: executorch]", "executorch (fp32, int8, 8da4w)",
                  "coreml (fp16, fp32, int8, int4)", "tflite (", "[default: ./MODEL-BACKEND-QUANT]",
                  "[default: 32]", "[default: executorch 2048", "8da4w:", "--no-gate"):
        assert shown in text, shown


def test_export_of_the_current_directory_names_its_output_after_it(tmp_path, monkeypatch):
    from qwen_mobile.export import default_out

    shutil.copytree(EMBEDDED_MODEL, tmp_path / "my-checkpoint")
    monkeypatch.chdir(tmp_path / "my-checkpoint")
    assert default_out(open_checkpoint("."), "executorch", "fp32") == Path("my-checkpoint-executorch-fp32")


def test_a_killed_export_leaves_nothing_that_looks_like_a_bundle_and_the_next_one_cleans_up(tmp_path):
    """A process killed inside its staging directory (SIGKILL: no cleanup runs) leaves only a hidden
    .NAME.partial-PID-* directory, never NAME; the next write to NAME removes it and says so."""
    target = tmp_path / "bundle"
    code = ("import sys, time; from pathlib import Path; from qwen_mobile.staging import staged_directory\n"
            "with staged_directory(Path(sys.argv[1])) as staging:\n"
            "    (staging / 'model.pte').write_bytes(b'x' * 1000); print('staged', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "staged"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not target.exists()
    (stale,) = tmp_path.glob(".bundle.partial-*")
    from qwen_mobile import progress

    heard = []
    with progress.reporting(lambda step, seconds: None, heard.append), staged_directory(target) as staging:
        (staging / "done").write_text("")
    assert not stale.exists() and target.is_dir() and any(str(stale) in notice for notice in heard)


def test_sigterm_during_an_export_removes_its_staging_directory(tmp_path):
    target = tmp_path / "bundle"
    child = subprocess.Popen([sys.executable, "-m", "qwen_mobile", "export", "--out", str(target)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".bundle.partial-*")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".bundle.partial-*")), "the export never staged"
    child.send_signal(signal.SIGTERM)
    # Python runs the handler when the main thread is next between bytecodes: on a loaded machine a
    # long native call (lowering) can hold it for a minute. An export that ignored the signal would
    # finish and leave the bundle, which the assertions below refuse.
    child.wait(timeout=300)
    assert child.returncode != 0 and not target.exists()
    assert list(tmp_path.iterdir()) == []
