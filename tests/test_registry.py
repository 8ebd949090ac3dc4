"""The backend registry: backends are found by folder, and the core never imports their runtimes."""

import json
import subprocess
import sys
import textwrap

import pytest

import qwen_mobile.backends
from qwen_mobile.bundle import open_runner, verify_bundle
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
from qwen_mobile.generate import generate_tokens
from qwen_mobile.registry import discover, get_backend

HEAVY_RUNTIMES = ("executorch", "coremltools", "litert_torch", "ai_edge_litert")


@pytest.fixture
def fake_backend(tmp_path, monkeypatch):
    """A backend folder dropped beside the real ones, touching no core file."""
    package = tmp_path / "fakert"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from qwen_mobile.registry import BackendSpec

        BACKEND = BackendSpec(
            name="fakert", summary="a test runtime", artifact="model.fake",
            quant_schemes=("fp32", "int8"), exporter="qwen_mobile.backends.fakert.lower:export",
            verifier="qwen_mobile.backends.fakert.lower:verify", runner="qwen_mobile.backends.fakert.lower:run",
        )
    """))
    (package / "lower.py").write_text(textwrap.dedent("""
        import json

        import torch

        from qwen_mobile.registry import Runner

        def export(loaded, plan, out):
            out.mkdir()
            (out / "model.fake").write_text(f"{loaded.checkpoint.source} {plan.scheme.name}")
            manifest = {
                "format_version": 1, "backend": "fakert", "artifact": "model.fake", "quant": plan.to_manifest(),
                "source": {"checkpoint": loaded.checkpoint.source, "config_hash": loaded.checkpoint.config_hash},
                "vocab_size": 9, "max_context": 8, "special_tokens": {"eos": [0]}, "chat_template": None,
                "methods": {"forward": {"inputs": [], "outputs": []}}, "state": {},
                "parity": {"passed": True, "tolerance": 0.0}, "tools": {},
            }
            (out / "manifest.json").write_text(json.dumps(manifest))
            return out

        def verify(bundle, manifest):
            return {"passed": (bundle / "model.fake").read_text().endswith(manifest["quant"]["scheme"])}

        def run(bundle, manifest):
            return Runner(lambda tokens, start: torch.nn.functional.one_hot(torch.tensor(start + len(tokens)), 9).float(),
                          max_context=8, max_chunk=4)
    """))
    monkeypatch.setattr(qwen_mobile.backends, "__path__", [*qwen_mobile.backends.__path__, str(tmp_path)])
    yield "fakert"
    for name in [m for m in sys.modules if m.startswith("qwen_mobile.backends.fakert")]:
        del sys.modules[name]


def test_a_new_backend_folder_is_found_and_exports(fake_backend, tmp_path):
    assert fake_backend in discover()
    bundle = export_bundle(None, fake_backend, None, tmp_path / "bundle")
    assert (bundle / "model.fake").read_text() == "qwen3.5-tiny fp32"


def test_bundles_are_verified_and_run_by_the_backend_that_wrote_them(fake_backend, tmp_path):
    bundle = export_bundle(None, fake_backend, "int8", tmp_path / "bundle")
    assert verify_bundle(bundle) == {"passed": True}
    (bundle / "model.fake").write_text("tampered")
    assert verify_bundle(bundle) == {"passed": False}
    runner, _ = open_runner(bundle)
    tokens = list(generate_tokens(runner.step, [0, 1, 2, 3, 4], max_new_tokens=2, max_context=runner.max_context,
                                  max_chunk=runner.max_chunk))
    assert tokens == [5, 6]  # the fake logits point at the next position: every step was fed in order


def test_a_bundle_without_its_artifact_is_refused(fake_backend, tmp_path):
    bundle = export_bundle(None, fake_backend, None, tmp_path / "bundle")
    (bundle / "model.fake").unlink()
    with pytest.raises(QwenMobileError, match="model.fake: missing"):
        verify_bundle(bundle)


def test_a_manifest_off_the_schema_is_a_one_line_error_naming_the_field(fake_backend, tmp_path):
    bundle = export_bundle(None, fake_backend, None, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["special_tokens"]["eos"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QwenMobileError, match="manifest.json: field special_tokens: 'eos' is a required property"):
        verify_bundle(bundle)


def test_quant_scheme_outside_the_backend_is_rejected(fake_backend):
    with pytest.raises(QwenMobileError, match="--quant 'int4'.*fp32, int8"):
        get_backend(fake_backend, "int4")


def test_unknown_backend_lists_what_is_available(fake_backend):
    with pytest.raises(QwenMobileError, match="--backend 'onnx' is unknown; available: .*fakert"):
        get_backend("onnx", None)


def test_core_and_cli_import_no_backend_runtime():
    code = (
        "import sys, qwen_mobile.cli, qwen_mobile.checkpoint, qwen_mobile.registry as r; r.discover(); "
        f"print([m for m in {HEAVY_RUNTIMES!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
