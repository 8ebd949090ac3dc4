"""Atomic output directories: build beside the target, rename into place at the end.

An interrupted or failed write leaves no directory at the target path, so nothing
half-written can be mistaken for a finished checkpoint or bundle.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qwen_mobile.errors import QwenMobileError


@contextlib.contextmanager
def staged_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    target = Path(target)
    if target.exists() and not overwrite:
        raise QwenMobileError(f"{target}: already exists (choose another --out or remove it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
