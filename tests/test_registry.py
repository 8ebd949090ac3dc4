"""The backend registry: backends are found by folder, and the core never imports their runtimes."""

import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qwen_mobile.backends
import qwen_mobile.cli
from qwen_mobile.bundle import manifest_digest, verify_bundle
from qwen_mobile.cli import app
from qwen_mobile.errors import LoweringFailed, QwenMobileError
from qwen_mobile.export import export_bundle, lowered
from qwen_mobile.registry import discover, get_backend

HEAVY_RUNTIMES = ("executorch", "coremltools", "litert_torch", "ai_edge_litert")


TOY_BACKEND = Path(__file__).resolve().parent / "toy_backend"
cli = CliRunner()


@pytest.fixture
def toy_backend(tmp_path, monkeypatch):
    """tests/toy_backend copied to a temporary folder as backends/toyrt, found beside the real
    backends: no file outside the folder changes."""
    shutil.copytree(TOY_BACKEND, tmp_path / "plugins" / "toyrt")
    monkeypatch.setattr(qwen_mobile.backends, "__path__", [*qwen_mobile.backends.__path__, str(tmp_path / "plugins")])
    yield "toyrt"
    for name in [m for m in sys.modules if m.startswith("qwen_mobile.backends.toyrt")]:
        del sys.modules[name]
    importlib.reload(qwen_mobile.cli)  # its --help lists the backends installed when it was imported


def test_a_fourth_backend_exports_verifies_and_runs_through_the_cli(toy_backend, tmp_path):
    assert toy_backend in discover()
    help_text = cli.invoke(importlib.reload(qwen_mobile.cli).app, ["export", "--help"], env={"COLUMNS": "300"}).stdout
    assert "toyrt (fp32, int8)" in help_text
    bundle = tmp_path / "bundle"
    exported = cli.invoke(app, ["export", "--backend", "toyrt", "--quant", "int8", "--out", str(bundle)])
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.strip() == str(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.pt", "tokenizer.json", "tokenizer_config.json"]
    assert manifest["max_context"] == 256 and manifest["max_seq_len"] == 16  # the backend's default lengths
    assert manifest["parity"]["reference"] == "eager model with the same quantization plan"

    verified = cli.invoke(app, ["verify", str(bundle), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["runtimes"]["eager"]["passed"] is True
    ran = cli.invoke(app, ["run", str(bundle), "-p", "ROMEO:", "-n", "8"])
    assert ran.exit_code == 0, ran.output
    assert ran.stdout.strip()


def test_a_bundle_written_without_its_gate_says_so_and_verify_runs_the_gate(toy_backend, tmp_path):
    bundle = export_bundle(None, toy_backend, None, tmp_path / "bundle", gate=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["skipped"] is True and manifest["parity"]["passed"] is False
    assert verify_bundle(bundle)["passed"] is True
    ran = cli.invoke(app, ["run", str(bundle), "-p", "ROMEO:", "-n", "4"])
    assert ran.exit_code == 0 and "never verified" in ran.stderr


def test_a_new_backend_folder_ships_in_the_wheel_with_no_other_edit(tmp_path):
    """Packages are found, not listed: a copy of the repository with the toy backend dropped under
    backends/ builds a wheel that holds it."""
    repo = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        if name.startswith(("qwen_mobile/", "backends/", "calibration/")) or "/" not in name:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, source / name)
    shutil.copytree(TOY_BACKEND, source / "backends" / "toyrt")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"qwen_mobile/backends/toyrt/__init__.py", "qwen_mobile/backends/toyrt/backend.py"} <= set(names)
    assert "qwen_mobile/calibration/tinyshakespeare.txt" in names and "backends/toyrt/__init__.py" not in names


def test_a_converter_failure_is_one_line_naming_the_backend_and_leaves_nothing(toy_backend, tmp_path, monkeypatch):
    toy = importlib.import_module("qwen_mobile.backends.toyrt.backend")

    def crash(self, target, directory):
        (directory / "model.pt").write_bytes(b"half")
        raise RuntimeError("converter: unsupported op aten::foo\n  deep converter frames")

    monkeypatch.setattr(toy.ToyBackend, "lower", crash)
    bundle = tmp_path / "bundle"
    failed = cli.invoke(app, ["export", "--backend", "toyrt", "--out", str(bundle)])
    assert failed.exit_code == 1  # valid input: not a usage error
    assert failed.stderr.strip().splitlines()[-1] == (
        "error: toyrt could not lower this model (RuntimeError: converter: unsupported op aten::foo); nothing was "
        "written. QWEN_MOBILE_TRACEBACK=1 shows where it failed")
    assert "Traceback" not in failed.output and "deep converter frames" not in failed.output
    assert not bundle.exists() and list(tmp_path.iterdir()) == [tmp_path / "plugins"]


def test_a_converter_failure_with_no_message_names_its_type_once(tmp_path):
    class Silent:
        spec = type("Spec", (), {"name": "toyrt"})

        def lower(self, target, directory):
            raise AssertionError

    with pytest.raises(LoweringFailed, match=r"^toyrt could not lower this model \(AssertionError\); nothing was"):
        lowered(Silent(), None, tmp_path)


def test_a_bundle_without_its_artifact_is_refused(toy_backend, tmp_path):
    bundle = export_bundle(None, toy_backend, None, tmp_path / "bundle")
    (bundle / "model.pt").unlink()
    with pytest.raises(QwenMobileError, match="model.pt: listed in manifest.json but missing"):
        verify_bundle(bundle)


def test_a_manifest_off_the_schema_is_a_one_line_error_naming_the_field(toy_backend, tmp_path):
    bundle = export_bundle(None, toy_backend, None, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["special_tokens"]["eos"]
    manifest["manifest_sha256"] = manifest_digest(manifest)  # as an editor who knows the digest would
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QwenMobileError, match="manifest.json: field special_tokens: 'eos' is a required property"):
        verify_bundle(bundle)


def test_quant_scheme_outside_the_backend_is_rejected(toy_backend):
    with pytest.raises(QwenMobileError, match="--quant 'int4'.*fp32, int8"):
        get_backend(toy_backend, "int4")


def test_unknown_backend_lists_what_is_available(toy_backend):
    with pytest.raises(QwenMobileError, match="--backend 'onnx' is unknown; available: .*toyrt"):
        get_backend("onnx", None)


def test_core_and_cli_import_no_backend_runtime():
    code = (
        "import sys, qwen_mobile.cli, qwen_mobile.checkpoint, qwen_mobile.registry as r; r.discover(); "
        f"print([m for m in {HEAVY_RUNTIMES!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
