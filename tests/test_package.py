"""`qwen-mobile package`: a bundle checked against what each demo app runs, and the commands that put it on the phone."""

import json
import shutil

from typer.testing import CliRunner

from qwen_mobile.bundle import MANIFEST, manifest_digest
from qwen_mobile.cli import app
from qwen_mobile.package import check_for_app

cli = CliRunner()


def failed(report) -> list[str]:
    return [name for name, passed, _ in report["checks"] if not passed]


def test_an_executorch_bundle_is_ready_for_android_with_the_push_commands(embedded_bundle):
    bundle = embedded_bundle("executorch", "fp32")
    result = cli.invoke(app, ["package", str(bundle), "--app", "android"])
    assert result.exit_code == 0, result.output
    commands = result.stdout.strip().splitlines()
    assert commands[0] == f"adb push {bundle} /data/local/tmp/bundle"
    assert "run-as dev.qwenmobile.app cp -r /data/local/tmp/bundle files/bundles/" in commands[2]
    assert "ok  memory" in result.stderr and "phones with 4 GB" in result.stderr


def test_a_core_ml_bundle_is_for_ios_not_android(embedded_bundle):
    bundle = embedded_bundle("coreml", "fp32")
    assert failed(check_for_app(bundle, "android")) == ["backend", "scheme"]
    ios = check_for_app(bundle, "ios")
    assert ios["ok"] and any("Documents/bundles/bundle" in line for line in ios["commands"])


def test_an_unverified_bundle_and_a_bundle_too_large_for_any_phone_are_refused(embedded_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(embedded_bundle("executorch", "fp32"), bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["parity"] = {"skipped": True, "passed": False}
    for entry in manifest["state"]:  # KV caches of a million slots: 64 GiB each
        if entry["kind"] == "key_cache":
            entry["shape"] = [1, 1 << 20, 64, 256]
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    report = check_for_app(bundle, "android")
    assert failed(report) == ["gate", "memory"] and report["fits_ram_gib"] is None
    result = cli.invoke(app, ["package", str(bundle), "--app", "android", "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False


def test_an_unknown_app_is_a_one_line_error(embedded_bundle):
    result = cli.invoke(app, ["package", str(embedded_bundle("executorch", "fp32")), "--app", "windows"])
    assert result.exit_code == 2 and "--app 'windows'" in result.stderr
