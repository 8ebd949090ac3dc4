"""Bundles as written: read the manifest, hand the artifact to the backend that made it."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qwen_mobile import progress
from qwen_mobile.checkpoint import Checkpoint
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.registry import BackendSpec, Runner, discover

MANIFEST = "manifest.json"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def read_tokenizer_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's tokenizer_config.json, after checking that both tokenizer files exist."""
    for name in TOKENIZER_FILES:
        if not (checkpoint_dir / name).is_file():
            raise QwenMobileError(f"{checkpoint_dir / name}: not found (a bundle ships the checkpoint's tokenizer)")
    path = checkpoint_dir / "tokenizer_config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise QwenMobileError(f"{path}: not valid JSON ({error})") from None


def copy_tokenizer(checkpoint_dir: Path, staging: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(checkpoint_dir / name, staging / name)


def manifest_head(
    spec: BackendSpec, checkpoint: Checkpoint, plan: QuantPlan, max_context: int, bos: int | None, eos: list[int]
) -> dict:
    """The fields every backend's manifest starts with; the backend adds methods, state,
    parity and tools (see schemas/manifest.schema.json)."""
    config = checkpoint.config
    return {
        "format_version": FORMAT_VERSION,
        "backend": spec.name,
        "artifact": spec.artifact,
        "quant": plan.to_manifest(),
        "source": {"checkpoint": checkpoint.source, "config_hash": checkpoint.config_hash},
        "vocab_size": config.vocab_size,
        "max_context": max_context,
        "special_tokens": {"bos": bos, "eos": list(eos)},
        "chat_template": read_tokenizer_config(checkpoint.path).get("chat_template"),
    }


def write_manifest(manifest: dict, staging: Path, out: Path) -> None:
    """Validate against the schema (errors name the published path), then write into the staging directory."""
    validate_manifest(manifest, Path(out) / MANIFEST)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def tool_versions(*packages: str) -> dict:
    """Installed versions of the packages that made an artifact (None: not installed)."""
    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {package: installed(package) for package in ("torch", *packages, "qwen-mobile")}


def validate_manifest(manifest: dict, where: Path) -> None:
    """Every manifest written or read must match the documented schema."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).iter_errors(manifest), key=str)
    if errors:
        field = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise QwenMobileError(f"{where}: field {field}: {errors[0].message} (see {SCHEMA.name})")


def read_manifest(bundle: Path) -> tuple[dict, BackendSpec]:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise QwenMobileError(f"{path}: not found (is {bundle} a qwen-mobile bundle?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QwenMobileError(f"{path}: not valid JSON ({error})") from None
    validate_manifest(manifest, path)
    specs = discover()
    backend = manifest["backend"]
    if backend not in specs:
        raise QwenMobileError(f"{path}: backend {backend!r} is not installed; {', '.join(specs) or 'none is'}")
    artifact = Path(bundle) / specs[backend].artifact
    if not artifact.exists():  # a file, or a directory such as Core ML's .mlpackage
        raise QwenMobileError(f"{artifact}: missing from the bundle")
    return manifest, specs[backend]


def load_source(bundle: Path, manifest: dict):
    """For a backend's verifier: the bundle's source checkpoint, loaded, and its quantization
    plan rebuilt from the manifest (plans are deterministic), after checking that the source
    still has the config the bundle was exported from."""
    from qwen_mobile.checkpoint import load
    from qwen_mobile.quant.plan import make_plan, scheme_from_manifest

    source = manifest.get("source", {})
    with progress.step("loading the source checkpoint"):
        loaded = load(source.get("checkpoint"))
    if loaded.checkpoint.config_hash != source.get("config_hash"):
        raise QwenMobileError(
            f"{Path(bundle) / MANIFEST}: source {source.get('checkpoint')!r} no longer has the config it was "
            "exported from (config_hash differs)"
        )
    with progress.step("rebuilding the quantization plan"):
        return loaded, make_plan(loaded.model, scheme_from_manifest(manifest["quant"]))


def verify_bundle(bundle: Path) -> dict:
    """Re-run the parity gate on the artifact as written; the result says whether it passed."""
    manifest, spec = read_manifest(bundle)
    return spec.load_verifier()(Path(bundle), manifest)


def open_runner(bundle: Path) -> tuple[Runner, dict]:
    manifest, spec = read_manifest(bundle)
    return spec.load_runner()(Path(bundle), manifest), manifest
