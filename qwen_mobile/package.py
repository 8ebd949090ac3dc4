"""`qwen-mobile package`: is this bundle one the demo app runs, and how does it get onto the phone.

Checks the bundle as `verify` does before its gate (schema, self-digest, every file's size and
digest), then against the app's support table (apps.json): manifest format, backend, scheme,
whether the gate ran and passed, a chat format the app can render, and the memory the bundle
needs against the phone RAM tiers an app can use a share of.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qwen_mobile.bundle import read_manifest
from qwen_mobile.errors import QwenMobileError

APPS = Path(__file__).resolve().parent / "apps.json"


def app_table() -> dict:
    return json.loads(APPS.read_text())


def runtime_bytes(bundle: Path, manifest: dict) -> int:
    """What running the bundle holds in memory, at least: the artifact (mapped whole) and its
    state at full context (KV caches and the recurrent and conv state, as the manifest lays it out)."""
    artifact = sum(entry["bytes"] for name, entry in manifest["files"].items()
                   if name == manifest["artifact"] or name.startswith(manifest["artifact"] + "/"))
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
             "bool": 1}
    state = sum(math.prod(d for d in entry["shape"] if isinstance(d, int)) * sizes[entry["dtype"]]
                for entry in manifest["state"])
    return artifact + state


def check_for_app(bundle: Path, app: str) -> dict:
    """{"ok": bool, "checks": [(name, passed, detail)], "commands": [...], "fits_ram_gib": smallest tier or None}."""
    table = app_table()
    if app not in ("android", "ios"):
        raise QwenMobileError(f"--app {app!r}: choose android or ios")
    spec = table[app]
    bundle = Path(bundle)
    manifest, _ = read_manifest(bundle)  # schema, digests: a bundle that fails these is refused outright
    backend, scheme = manifest["backend"], manifest["quant"]["scheme"]
    parity = manifest["parity"]
    needed = runtime_bytes(bundle, manifest)
    fraction = table["memory_fraction"]
    fits = next((ram for ram in table["phone_ram_gib"] if needed <= ram * 2**30 * fraction), None)
    checks = [
        ("manifest format", manifest["format_version"] in spec["format_versions"],
         f"format {manifest['format_version']}; the app reads {spec['format_versions']}"),
        ("backend", backend in spec["backends"], f"{backend}; the app runs {', '.join(spec['backends'])}"),
        ("scheme", scheme in spec["backends"].get(backend, []),
         f"{scheme}; the app's {backend} engine runs {', '.join(spec['backends'].get(backend, [])) or 'nothing'}"),
        ("files", True, f"{len(manifest['files'])} files match their sizes and SHA-256"),
        ("gate", bool(parity.get("passed")),
         "never run (--no-gate): run `qwen-mobile verify` first" if parity.get("skipped")
         else f"passed through {', '.join(parity['runtimes'])}" if parity.get("passed") else "failed"),
        ("chat format", manifest["chat_format"] is not None,
         "fixed strings the app renders" if manifest["chat_format"] else "null: the app loads it but cannot chat"),
        ("memory", fits is not None,
         f"about {needed / 2**30:.2f} GiB (artifact + state at {manifest['max_context']} tokens): "
         + (f"phones with {fits} GB RAM or more" if fits else f"more than {fraction:.0%} of any tier up to "
            f"{table['phone_ram_gib'][-1]} GB")),
    ]
    commands = [line.format(bundle=bundle, name=bundle.name) for line in spec["copy"].get(backend, [])]
    return {"app": spec["app"], "ok": all(passed for _, passed, _ in checks), "checks": checks,
            "commands": commands, "runtime_bytes": needed, "fits_ram_gib": fits}
