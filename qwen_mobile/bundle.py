"""Bundles as written: read the manifest, hand the artifact to the backend that made it."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.registry import BackendSpec, Runner, discover

MANIFEST = "manifest.json"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"


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
    if not artifact.is_file():
        raise QwenMobileError(f"{artifact}: missing from the bundle")
    return manifest, specs[backend]


def verify_bundle(bundle: Path) -> dict:
    """Re-run the parity gate on the artifact as written; the result says whether it passed."""
    manifest, spec = read_manifest(bundle)
    return spec.load_verifier()(Path(bundle), manifest)


def open_runner(bundle: Path) -> tuple[Runner, dict]:
    manifest, spec = read_manifest(bundle)
    return spec.load_runner()(Path(bundle), manifest), manifest
