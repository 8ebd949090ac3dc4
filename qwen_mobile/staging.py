"""Atomic output directories: build beside the target, rename into place at the end.

An interrupted or failed write leaves no directory at the target path, so nothing
half-written can be mistaken for a finished checkpoint or bundle. A staging directory is
hidden and named after its target and the process building it
(`.NAME.partial-PID-XXXX`); one whose process is gone (a killed export) is removed by the
next write to the same target, which says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qwen_mobile import progress
from qwen_mobile.errors import QwenMobileError


def check_target(target: Path) -> Path:
    """A target that can be created: it does not exist, and its nearest existing ancestor is a
    writable directory. Checked before any slow work, so a bad --out fails in a second."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        raise QwenMobileError(f"{target}: already exists (choose another --out or remove it)")
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QwenMobileError(f"{target}: cannot be created, {ancestor} is not a directory")
    try:  # permissions alone do not say (root, read-only mounts, /proc): create and remove a directory there
        os.rmdir(tempfile.mkdtemp(prefix=".qwen-mobile-probe-", dir=ancestor))
    except OSError as error:
        raise QwenMobileError(f"{target}: cannot be created in {ancestor} ({error.strerror})") from None
    return target


def _prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def _owner_alive(staging: Path, prefix: str) -> bool:
    pid = staging.name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the staging directories of `target` whose building process is gone; return them."""
    prefix = _prefix(target)
    parent = target.absolute().parent
    stale = [p for p in parent.glob(prefix + "*") if p.is_dir() and not _owner_alive(p, prefix)] if parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    target = check_target(target)
    for stale in remove_stale(target):
        progress.notice(f"removed {stale}, left by an export that did not finish")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_prefix(target)}{os.getpid()}-", dir=target.parent))
    except OSError as error:
        raise QwenMobileError(f"{target}: cannot be created ({error.strerror})") from None
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield staging
        if target.exists():
            raise QwenMobileError(f"{target}: appeared while this was being written; the result was not published")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
