"""Bundles: the manifest every backend's bundle carries, and the core flows on a written bundle
(`verify`, and opening it for `run` and `bench`).

A bundle directory holds the artifact, the checkpoint's tokenizer.json and
tokenizer_config.json, whatever else the backend writes (TFLite: npu_report.json) and
manifest.json (schemas/manifest.schema.json): what the artifact expects and how it was
checked, enough for an app to drive it without reading qwen-mobile's code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qwen_mobile import progress
from qwen_mobile.checkpoint import Checkpoint
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.jsonfiles import read_json
from qwen_mobile.quant.plan import QuantPlan
from qwen_mobile.registry import Backend, BackendSpec, Lengths, Runner, discover

MANIFEST = "manifest.json"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"
CHAT_FORMAT_SCHEMA = SCHEMA.with_name("chat_format.schema.json")
FORMAT_VERSION = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def read_tokenizer_config(checkpoint_dir: Path) -> dict:
    """The checkpoint's tokenizer_config.json, after checking that both tokenizer files exist."""
    for name in TOKENIZER_FILES:
        if not (checkpoint_dir / name).is_file():
            raise QwenMobileError(f"{checkpoint_dir / name}: not found (a bundle ships the checkpoint's tokenizer)")
    return read_json(checkpoint_dir / "tokenizer_config.json")


def copy_tokenizer(checkpoint_dir: Path, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(checkpoint_dir / name, directory / name)


def tool_versions(*packages: str) -> dict:
    """Installed versions of the packages that made an artifact (None: not installed)."""
    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {package: installed(package) for package in ("torch", *packages, "qwen-mobile")}


def state_section(backend: Backend, config, max_context: int, plan: QuantPlan) -> list[dict]:
    """Every state tensor as the artifact stores it, in layer order (the manifest's `state`)."""
    from qwen_mobile.models.qwen3_5 import STATE_TENSOR_NAMES, state_tensors

    return [
        {"layer": tensor.layer, "layer_type": tensor.layer_type, "kind": STATE_TENSOR_NAMES[tensor.field], **stored}
        for tensor in state_tensors(config, max_context)
        for stored in backend.stored_state(tensor, plan)
    ]


def build_manifest(
    spec: BackendSpec,
    backend: Backend,
    checkpoint: Checkpoint,
    plan: QuantPlan,
    lengths: Lengths,
    special_tokens: dict,
    conversation: dict,
    backend_fields: dict,
) -> dict:
    """The manifest of a freshly lowered artifact, before its gate (the core adds `parity`, and
    `files` and `manifest_sha256` as it writes it). `conversation`: chat_template, chat_format
    and generation (export.conversation_fields)."""
    reserved = {"format_version", "backend", "artifact", "files", "manifest_sha256", "quant", "source", "vocab_size",
                "max_context", "max_seq_len", "special_tokens", "chat_template", "chat_format", "generation", "state",
                "parity", "tools"}
    clash = sorted(reserved & set(backend_fields))
    if clash:
        raise ValueError(f"the {spec.name} backend's manifest fields override the core's: {clash}")
    return {
        "format_version": FORMAT_VERSION,
        "backend": spec.name,
        "artifact": spec.artifact,
        "quant": plan.to_manifest(),
        "source": {"checkpoint": checkpoint.source, "config_hash": checkpoint.config_hash},
        "vocab_size": checkpoint.config.vocab_size,
        "max_context": lengths.max_context,
        "max_seq_len": lengths.max_chunk,
        "special_tokens": special_tokens,
        **conversation,
        "state": state_section(backend, checkpoint.config, lengths.max_context, plan),
        **backend_fields,
        "tools": tool_versions(*backend.tools),
    }


def write_manifest(manifest: dict, directory: Path, published: Path) -> None:
    """Record every file's size and digest and the manifest's own digest, validate against the
    schema (errors name the published path), then write the manifest into `directory`, last."""
    manifest["files"] = file_digests(directory)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    validate_manifest(manifest, Path(published) / MANIFEST)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest without this field, serialized canonically (keys sorted, no spaces,
    ASCII, Python's shortest float repr): any edit of any field shows. Apps check the files'
    digests; `verify` and `package` check this one too."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(bundle: Path) -> dict[str, Path]:
    """Every file under the bundle but the manifest, by its /-separated relative path. A link
    (which could point anywhere) or anything but a file or directory is refused by name."""
    files = {}
    for path in sorted(Path(bundle).rglob("*")):
        relative = path.relative_to(bundle).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise QwenMobileError(f"{path}: a bundle holds plain files and directories only")
        if path.is_file() and relative != MANIFEST:
            files[relative] = path
    return files


def file_digests(bundle: Path) -> dict:
    return {name: {"bytes": path.stat().st_size, "sha256": sha256(path)} for name, path in bundle_files(bundle).items()}


def check_files(bundle: Path, manifest: dict) -> None:
    """The bundle holds exactly the files its manifest lists, each with the recorded size and
    SHA-256; the first that differs is named. Sizes are compared first, so a truncated or
    grown file costs no hashing (hashing a 0.8B bundle's 600 MB takes about a second)."""
    bundle = Path(bundle)
    listed, present = manifest["files"], bundle_files(bundle)
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise QwenMobileError(f"{bundle / unlisted[0]}: not listed in {MANIFEST} (the bundle was changed after export)")
    artifact = manifest["artifact"]
    if not any(name == artifact or name.startswith(artifact + "/") for name in listed):
        raise QwenMobileError(f"{bundle / MANIFEST}: field files: does not list the artifact {artifact!r}")
    for name, expected in listed.items():
        if name not in present:
            raise QwenMobileError(f"{bundle / name}: listed in {MANIFEST} but missing")
        if present[name].stat().st_size != expected["bytes"]:
            raise QwenMobileError(
                f"{bundle / name}: {present[name].stat().st_size} bytes, the manifest records {expected['bytes']}"
            )
    for name, expected in listed.items():
        if sha256(present[name]) != expected["sha256"]:
            raise QwenMobileError(f"{bundle / name}: its SHA-256 differs from the manifest's (corrupted or modified)")


def validate_manifest(manifest: dict, where: Path) -> None:
    """Every manifest written or read must match the documented schema (manifest.schema.json, which
    refers to chat_format.schema.json for the app-facing conversation fields)."""
    import jsonschema
    from referencing import Registry, Resource

    schemas = [json.loads(path.read_text()) for path in (SCHEMA, CHAT_FORMAT_SCHEMA)]
    registry = Registry().with_resources((schema["$id"], Resource.from_contents(schema)) for schema in schemas)
    validator = jsonschema.Draft202012Validator(schemas[0], registry=registry)
    errors = sorted(validator.iter_errors(manifest), key=str)
    if errors:
        field = "/".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        raise QwenMobileError(f"{where}: field {field}: {errors[0].message} (see {SCHEMA.name})")


def read_manifest(bundle: Path) -> tuple[dict, BackendSpec]:
    """The bundle's manifest, checked: its schema, its self-digest, what the schema cannot say
    (the backend's own artifact and schemes, ids within the vocabulary, lengths within the
    context), then every file's size and digest. Any failure is one line naming the field or file."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not path.is_file():
        raise QwenMobileError(f"{path}: not found (is {bundle} a qwen-mobile bundle?)")
    manifest = read_json(path)
    recorded = manifest.get("manifest_sha256")
    try:
        digest = manifest_digest(manifest)
    except ValueError:  # NaN or Infinity, which JSON itself does not have
        raise QwenMobileError(f"{path}: holds a number JSON does not have (NaN or Infinity)") from None
    if digest != recorded:
        raise QwenMobileError(f"{path}: its contents differ from its manifest_sha256 (edited or corrupted)")
    validate_manifest(manifest, path)
    specs = discover()
    backend = manifest["backend"]
    if backend not in specs:
        raise QwenMobileError(f"{path}: field backend: {backend!r} is not installed ({', '.join(specs) or 'none is'})")
    spec = specs[backend]
    if manifest["artifact"] != spec.artifact:
        raise QwenMobileError(f"{path}: field artifact: {manifest['artifact']!r}, but the {backend} backend writes "
                              f"{spec.artifact!r}")
    if manifest["quant"]["scheme"] not in spec.quant_schemes:
        raise QwenMobileError(f"{path}: field quant/scheme: {manifest['quant']['scheme']!r} is not one the {backend} "
                              f"backend writes ({', '.join(spec.quant_schemes)})")
    tokens = manifest["special_tokens"]
    for field, ids in (("eos", tokens["eos"]), ("bos", [] if tokens["bos"] is None else [tokens["bos"]])):
        if any(token >= manifest["vocab_size"] for token in ids):
            raise QwenMobileError(f"{path}: field special_tokens/{field}: {ids} lies outside the vocabulary "
                                  f"({manifest['vocab_size']})")
    if manifest["max_seq_len"] > manifest["max_context"]:
        raise QwenMobileError(f"{path}: field max_seq_len: {manifest['max_seq_len']} exceeds max_context "
                              f"{manifest['max_context']}")
    check_files(bundle, manifest)
    return manifest, spec


def lengths_of(manifest: dict) -> Lengths:
    return Lengths(max_context=manifest["max_context"], max_chunk=manifest["max_seq_len"])


def load_source(bundle: Path, manifest: dict, source: str | None = None, matrices_at_rest: bool = False):
    """For `verify`: the checkpoint the bundle was exported from, loaded (source_model), and its
    quantization plan rebuilt from the manifest (source_plan)."""
    loaded = source_model(bundle, manifest, source, matrices_at_rest)
    return loaded, source_plan(bundle, manifest, loaded)


def source_model(bundle: Path, manifest: dict, source: str | None = None, matrices_at_rest: bool = False):
    """The checkpoint the bundle was exported from, loaded.

    Nothing outside the bundle is read or fetched on the manifest's say-so: the checkpoint is
    the one the user passes (`--source`), checked against the manifest's config_hash; only the
    embedded model, which ships with qwen-mobile, is found without it. matrices_at_rest: see
    checkpoint.load_checkpoint."""
    from qwen_mobile.checkpoint import EMBEDDED_NAME, load
    from qwen_mobile.quant.plan import scheme_from_manifest

    path = Path(bundle) / MANIFEST
    recorded = manifest["source"]
    if source is None and recorded["checkpoint"] != EMBEDDED_NAME:
        raise QwenMobileError(
            f"{path}: exported from {recorded['checkpoint']!r}; pass that checkpoint with --source to verify against "
            "it (verify reads nothing outside the bundle on the manifest's say-so)"
        )
    scheme_from_manifest(manifest["quant"], str(path))  # a bad field fails before the checkpoint loads
    with progress.step("loading the source checkpoint"):
        loaded = load(source if source is not None else EMBEDDED_NAME, matrices_at_rest=matrices_at_rest)
    if loaded.checkpoint.config_hash != recorded["config_hash"]:
        raise QwenMobileError(
            f"{path}: field source/config_hash: {recorded['config_hash']}, but {loaded.checkpoint.source} has "
            f"{loaded.checkpoint.config_hash} (not the checkpoint this bundle was exported from)"
        )
    return loaded


def source_plan(bundle: Path, manifest: dict, loaded, release_float: bool = False):
    """The bundle's quantization plan: its PLAN_FILE when it carries one (a calibrated plan, read,
    never refitted), else rebuilt from the manifest's scheme (plans are deterministic).
    release_float: the model's planned float weights are released (quant.plan.make_plan's
    release_float), for a caller that has made its float reference already."""
    from qwen_mobile.quant.plan import PLAN_FILE, load_plan, make_plan, release_planned_weights, scheme_from_manifest

    if PLAN_FILE in manifest["files"]:
        plan = load_plan(Path(bundle) / PLAN_FILE)
        if plan.to_manifest() != manifest["quant"]:
            raise QwenMobileError(f"{Path(bundle) / PLAN_FILE}: is not the plan the manifest's field quant describes")
        if release_float:
            release_planned_weights(loaded.model, plan)
        return plan
    scheme = scheme_from_manifest(manifest["quant"], str(Path(bundle) / MANIFEST))
    with progress.step("rebuilding the quantization plan"):
        return make_plan(loaded.model, scheme, release_float=release_float)


def verify_bundle(bundle: Path, source: str | None = None) -> dict:
    """`qwen-mobile verify`: the bundle's files against its manifest, then the parity gate again
    on the artifact as written, through each of its runtimes; the result says whether it passed."""
    manifest, spec = read_manifest(bundle)
    return gate_bundle(Path(bundle), manifest, spec, source)


def gate_bundle(bundle: Path, manifest: dict, spec: BackendSpec, source: str | None = None) -> dict:
    """The parity gate on the artifact in `bundle` against its source checkpoint (see load_source),
    without the file checks (verify_bundle does those first)."""
    from qwen_mobile.memory import return_freed_memory
    from qwen_mobile.parity import float_reference, gate_artifact, references

    loaded = source_model(bundle, manifest, source, matrices_at_rest=True)
    lengths = lengths_of(manifest)
    # the model serves these references only: its float weights go as the plan is made, after the
    # float reference, as in an export (export.export_bundle), and never sit under the artifact's runtime
    float_logits = float_reference(loaded.model, lengths, tokenizer_dir=bundle)
    plan = source_plan(bundle, manifest, loaded, release_float=True)
    refs = references(loaded.model, lengths, plan, tokenizer_dir=bundle, keep_float=False, float_logits=float_logits)
    return_freed_memory()
    return gate_artifact(spec.load(), bundle, manifest, refs, plan)


def open_runner(bundle: Path) -> tuple[Runner, dict]:
    """The bundle's artifact loaded into its backend's first runtime, for `run` and `bench`."""
    manifest, spec = read_manifest(bundle)
    return spec.load().open(Path(bundle), manifest), manifest
