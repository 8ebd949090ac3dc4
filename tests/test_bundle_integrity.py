"""Bundles as they travel: a mutation suite of wrong bundles, each refused with a one-line error
naming the file or field, for a bundle of every backend.

read_manifest is what `verify`, `run` and `bench` call before anything loads; a few cases go
through the CLI to show the one-line error and exit 2 as a user meets them.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen_mobile.bundle import MANIFEST, manifest_digest, open_runner, read_manifest, verify_bundle
from qwen_mobile.cli import app
from qwen_mobile.errors import QwenMobileError

BACKENDS = {"executorch": "fp32", "coreml": "fp32", "tflite": "fp32"}
cli = CliRunner()


@pytest.fixture(scope="module", params=list(BACKENDS))
def bundle(request, embedded_bundle) -> Path:
    return embedded_bundle(request.param, BACKENDS[request.param])


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def write_manifest(bundle: Path, manifest: dict, redigest: bool = True) -> None:
    """Write an edited manifest; redigest: as a careful editor would, so that the check behind the digest is what refuses it."""
    if redigest:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def refused(bundle: Path, *fragments: str) -> str:
    with pytest.raises(QwenMobileError) as caught:
        read_manifest(bundle)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_untouched_bundle_is_accepted(bundle):
    manifest, spec = read_manifest(bundle)
    assert spec.name == manifest["backend"] and sorted(manifest["files"]) == sorted(
        p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def test_one_flipped_bit_in_any_file_is_refused_naming_the_file(bundle, tmp_path):
    names = json.loads((bundle / MANIFEST).read_text())["files"]
    for index, name in enumerate(sorted(names)):
        copied = copy_of(bundle, tmp_path / str(index))
        data = bytearray((copied / name).read_bytes())
        data[len(data) // 2] ^= 0x01  # the lowest bit of one byte: a gate alone would not see it in a weight
        (copied / name).write_bytes(bytes(data))
        refused(copied, name, "SHA-256 differs")


def test_a_truncated_extra_or_missing_file_is_refused(bundle, tmp_path):
    manifest = json.loads((bundle / MANIFEST).read_text())
    artifact_file = next(name for name in sorted(manifest["files"]) if name.startswith(manifest["artifact"]))
    truncated = copy_of(bundle, tmp_path / "truncated")
    (truncated / artifact_file).write_bytes((truncated / artifact_file).read_bytes()[:100])
    refused(truncated, artifact_file, "100 bytes")
    extra = copy_of(bundle, tmp_path / "extra")
    (extra / "notes.txt").write_text("added after export")
    refused(extra, "notes.txt", "not listed")
    missing = copy_of(bundle, tmp_path / "missing")
    (missing / "tokenizer.json").unlink()
    refused(missing, "tokenizer.json", "missing")


def test_a_link_inside_the_bundle_is_refused(bundle, tmp_path):
    linked = copy_of(bundle, tmp_path)
    (linked / "tokenizer.json").unlink()
    (linked / "tokenizer.json").symlink_to("/etc/hostname")
    refused(linked, "tokenizer.json", "plain files")


def test_any_edit_of_the_manifest_is_refused_by_its_digest(bundle, tmp_path):
    manifest = json.loads((bundle / MANIFEST).read_text())
    for field in manifest:
        if field == "manifest_sha256":
            continue
        edited = copy.deepcopy(manifest)
        value = edited[field]
        edited[field] = value + 1 if isinstance(value, int) else None if value is not None else "edited"
        copied = copy_of(bundle, tmp_path / field)
        write_manifest(copied, edited, redigest=False)
        refused(copied, "manifest.json", "differ from its manifest_sha256")


# (path into the manifest, value, fragments of the one-line error); the digest is recomputed, so
# the schema or the checks behind it must refuse each
BAD_FIELDS = [
    (["artifact"], "../../etc/passwd", ["field artifact"]),
    (["artifact"], "-1", ["field artifact"]),
    (["artifact"], "model.bin", ["field artifact", "backend writes"]),
    (["files", "../outside"], {"bytes": 1, "sha256": "0" * 64}, ["field files"]),
    (["files", "/etc/passwd"], {"bytes": 1, "sha256": "0" * 64}, ["field files"]),
    (["format_version"], 3, ["field format_version"]),
    (["backend"], "onnx", ["field backend", "not installed"]),
    (["backend"], "../x", ["field backend"]),
    (["quant", "compute_dtype"], "\U0001f4a5", ["field quant/compute_dtype"]),
    (["quant", "scheme"], "int3", ["field quant/scheme"]),
    (["vocab_size"], 10**30, ["field vocab_size"]),
    (["vocab_size"], 1e30, ["field vocab_size"]),
    (["vocab_size"], 2, ["special_tokens/eos", "outside the vocabulary"]),
    (["max_context"], 0, ["field max_context"]),
    (["max_seq_len"], 10**6, ["field max_seq_len", "exceeds max_context"]),
    (["special_tokens", "eos"], [-1], ["field special_tokens/eos"]),
    (["special_tokens", "bos"], "1", ["field special_tokens/bos"]),
    (["source", "config_hash"], "not a hash", ["field source/config_hash"]),
    (["state", 0, "name"], "../../x", ["field state/0/name"]),
    (["parity"], {"passed": True}, ["field parity"]),
    (["chat_template"], 12, ["field chat_template"]),
    (["tools", "torch"], {"nested": True}, ["field tools/torch"]),
]


@pytest.mark.parametrize("path,value,fragments", BAD_FIELDS, ids=lambda item: str(item)[:40])
def test_a_bad_field_is_refused_naming_it(bundle, tmp_path, path, value, fragments):
    manifest = json.loads((bundle / MANIFEST).read_text())
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    copied = copy_of(bundle, tmp_path)
    write_manifest(copied, manifest)
    refused(copied, *fragments)


def test_a_manifest_nested_thousands_deep_is_refused(bundle, tmp_path):
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["methods"] = "DEEP"
    copied = copy_of(bundle, tmp_path)
    (copied / MANIFEST).write_text(json.dumps(manifest).replace('"DEEP"', "[" * 3000 + "]" * 3000))
    refused(copied, "nested deeper")


def test_run_and_bench_refuse_a_corrupted_bundle_too(bundle, tmp_path):
    copied = copy_of(bundle, tmp_path)
    data = bytearray((copied / "tokenizer.json").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copied / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(QwenMobileError, match="tokenizer.json"):
        open_runner(copied)
    result = cli.invoke(app, ["bench", str(copied)])
    assert result.exit_code == 2 and "tokenizer.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_changed_vocabulary_id_in_the_tokenizer_is_refused_before_it_can_encode(embedded_bundle, tmp_path):
    """The probe: "ROMEO": 816 -> 817 in tokenizer.json used to pass verify, and run then encoded ROMEO as another token."""
    copied = copy_of(embedded_bundle("executorch", "fp32"), tmp_path)
    text = (copied / "tokenizer.json").read_text()
    assert '"ROMEO": 816' in text or '"ROMEO":816' in text
    (copied / "tokenizer.json").write_text(text.replace('"ROMEO": 816', '"ROMEO": 817').replace('"ROMEO":816', '"ROMEO":817'))
    result = cli.invoke(app, ["run", str(copied), "-p", "ROMEO:"])
    assert result.exit_code == 2 and "tokenizer.json: its SHA-256 differs" in result.stderr
    verified = cli.invoke(app, ["verify", str(copied)])
    assert verified.exit_code == 2 and len(verified.stderr.strip().splitlines()) == 1


def test_verify_reads_no_source_the_manifest_names_unless_passed(embedded_bundle, tmp_path, monkeypatch):
    """A manifest cannot make verify read a path or fetch a hub repository: it asks for --source."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("verify tried to download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    copied = copy_of(embedded_bundle("executorch", "fp32"), tmp_path)
    for source in ("Qwen/Qwen3.5-0.8B", "relative/dir", "/etc"):
        manifest = json.loads((copied / MANIFEST).read_text())
        manifest["source"]["checkpoint"] = source
        write_manifest(copied, manifest)
        with pytest.raises(QwenMobileError, match="pass that checkpoint with --source"):
            verify_bundle(copied)
    # a --source that is not the checkpoint the bundle came from is refused by its config hash
    other = tmp_path / "other"
    shutil.copytree(Path(__file__).resolve().parent.parent / "qwen_mobile" / "assets" / "qwen3.5-tiny", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(QwenMobileError, match="field source/config_hash"):
        verify_bundle(copied, source=str(other))
