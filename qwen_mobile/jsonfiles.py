"""JSON documents users hand us (config.json, generation_config.json, tokenizer_config.json,
safetensors indexes, manifests): read with a one-line error naming the file for anything
that is not what it should be, so no malformed input reaches the code as a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from qwen_mobile.errors import QwenMobileError

MAX_BYTES = 64 * 2**20  # a manifest or config is a few KB; a tokenizer_config with a long template, well under this
MAX_NESTING = 32


def read_json(path: Path, expect: type = dict, max_bytes: int = MAX_BYTES):
    """The document at `path`, which must be a JSON `expect` (object by default), at most
    `max_bytes` long and nested at most MAX_NESTING deep."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise QwenMobileError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a {path.name} may have")
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QwenMobileError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise QwenMobileError(f"{path}: nested deeper than {MAX_NESTING} levels") from None
    except OSError as error:
        raise QwenMobileError(f"{path}: cannot be read ({error.strerror})") from None
    if nesting(document) > MAX_NESTING:
        raise QwenMobileError(f"{path}: nested deeper than {MAX_NESTING} levels")
    if not isinstance(document, expect):
        raise QwenMobileError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}")
    return document


def nesting(document) -> int:
    """How deep lists and objects nest (iteratively: the depth is what is being checked)."""
    deepest, pending = 0, [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return deepest
