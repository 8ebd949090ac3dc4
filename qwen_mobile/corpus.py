"""The calibration corpus and its fixed train / held-out split.

Training (scripts/train_tiny.py) and every later evaluation import
``split_corpus`` so that they all see exactly the same held-out text.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# calibration/ at the top of the repository, installed as qwen_mobile.calibration
CORPUS_PATH = Path(str(files("qwen_mobile.calibration") / "tinyshakespeare.txt"))
TRAIN_FRACTION = 0.9


def load_corpus(path: str | Path = CORPUS_PATH) -> str:
    return Path(path).read_text(encoding="utf-8")


def split_corpus(text: str) -> tuple[str, str]:
    """Split ``text`` into (train, held-out).

    The training split is the first 90% of the characters, extended up to and
    including the next newline so that no line is cut in half; the held-out
    split is everything after it.
    """
    cut = int(len(text) * TRAIN_FRACTION)
    newline = text.find("\n", cut)
    cut = len(text) if newline == -1 else newline + 1
    return text[:cut], text[cut:]
