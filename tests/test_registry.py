"""The backend registry: backends are found by folder, and the core never imports their runtimes."""

import subprocess
import sys
import textwrap

import pytest

import qwen_mobile.backends
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import export_bundle
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
        )
    """))
    (package / "lower.py").write_text(textwrap.dedent("""
        def export(loaded, quant, out):
            out.mkdir()
            (out / "model.fake").write_text(f"{loaded.checkpoint.source} {quant}")
            return out
    """))
    monkeypatch.setattr(qwen_mobile.backends, "__path__", [*qwen_mobile.backends.__path__, str(tmp_path)])
    yield "fakert"
    for name in [m for m in sys.modules if m.startswith("qwen_mobile.backends.fakert")]:
        del sys.modules[name]


def test_a_new_backend_folder_is_found_and_exports(fake_backend, tmp_path):
    assert fake_backend in discover()
    bundle = export_bundle(None, fake_backend, None, tmp_path / "bundle")
    assert (bundle / "model.fake").read_text() == "qwen3.5-tiny fp32"


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
