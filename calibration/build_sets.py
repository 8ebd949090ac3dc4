"""Builds the shipped calibration sets (general, chat, code, multilingual, default .jsonl here)
from their sources, deterministically: `python calibration/build_sets.py` rewrites them.

Sources (README.md gives provenance and licenses):
- tinyshakespeare.txt, its TRAINING split only (qwen_mobile.corpus.split_corpus); a passage
  sharing any line of SUBSTANTIAL_LINE or more characters with the held-out split is skipped;
- sources/english.txt, sources/chat.txt, sources/multilingual.txt: written for this project;
- sources/lunyu.json: the Analects (public domain);
- the Python standard library's own sources of the interpreter that runs this (PSF License).

Every set is interleaved across its sources, so the first N samples of a set keep its mix.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from itertools import zip_longest
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"
SUBSTANTIAL_LINE = 20  # characters, after stripping: what the disjointness test compares
WRITTEN = "written for qwen-mobile (Apache-2.0)"

# pure-Python standard library modules with plenty of ordinary, well-commented code
CODE_MODULES = (
    "heapq.py", "bisect.py", "textwrap.py", "fractions.py", "statistics.py", "shlex.py", "fnmatch.py",
    "glob.py", "calendar.py", "difflib.py", "csv.py", "configparser.py", "argparse.py", "string.py",
    "colorsys.py", "graphlib.py", "queue.py", "sched.py", "base64.py", "html/__init__.py", "json/encoder.py",
    "json/decoder.py", "email/utils.py", "urllib/parse.py", "collections/__init__.py", "functools.py",
    "dataclasses.py", "pprint.py", "tokenize.py", "random.py", "datetime.py", "ipaddress.py", "gettext.py",
    "posixpath.py", "zipfile.py", "tarfile.py", "logging/__init__.py", "enum.py", "contextlib.py", "copy.py",
)


def interleave(*groups: list) -> list:
    return [item for row in zip_longest(*groups) for item in row if item is not None]


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over `items`, in order."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def shakespeare_passages(count: int) -> list[dict]:
    sys.path.insert(0, str(HERE.parent))
    from qwen_mobile.corpus import split_corpus

    train, held_out = split_corpus((HERE / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    held_lines = {line.strip() for line in held_out.splitlines() if len(line.strip()) >= SUBSTANTIAL_LINE}
    speeches, offset = [], 0
    for speech in train.split("\n\n"):
        speeches.append((offset, speech.strip("\n")))
        offset += len(speech) + 2
    passages, current, start = [], [], 0
    for offset, speech in speeches:
        if not current:
            start = offset
        current.append(speech)
        if sum(len(s) for s in current) >= 700:
            passages.append((start, "\n\n".join(current)))
            current = []
    clean = [
        (start, text) for start, text in passages
        if len(text) <= 2000 and not any(line.strip() in held_lines for line in text.splitlines())
    ]
    return [
        {"text": text, "source": f"tinyshakespeare.txt training split, characters {start}-{start + len(text)}"}
        for start, text in spread(clean, count)
    ]


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def general() -> list[dict]:
    verse = shakespeare_passages(128)
    prose = [{"text": p, "source": f"sources/english.txt, {WRITTEN}"} for p in paragraphs(SOURCES / "english.txt")]
    out = []
    for i in range(0, len(verse), 4):  # four passages of verse, then one of prose
        out += verse[i : i + 4] + prose[i // 4 : i // 4 + 1]
    return out + prose[len(verse) // 4 :]


def chat() -> list[dict]:
    conversations = []
    for block in (SOURCES / "chat.txt").read_text(encoding="utf-8").split("===\n"):
        messages = []
        for line in block.splitlines():
            role, sep, content = line.partition(": ")
            if sep and role in ("system", "user", "assistant"):
                messages.append({"role": role, "content": content})
            elif messages:
                messages[-1]["content"] += "\n" + line
        for message in messages:
            message["content"] = message["content"].strip()
        if messages:
            conversations.append({"messages": messages, "source": f"sources/chat.txt, {WRITTEN}"})
    return conversations


def code(count: int = 144) -> list[dict]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    chunks = []
    for module in CODE_MODULES:
        source = (lib / module).read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.parse(source).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "\n".join(lines[first - 1 : node.end_lineno])
            if 300 <= len(text) <= 2500:
                where = f"CPython {version} Lib/{module} lines {first}-{node.end_lineno}"
                chunks.append({"text": text, "source": f"{where} (PSF License Version 2)"})
    return spread(chunks, count)


def multilingual() -> list[dict]:
    chinese = []
    for chapter in json.loads((SOURCES / "lunyu.json").read_text(encoding="utf-8")):
        current, first = [], 0
        for i, paragraph in enumerate(chapter["paragraphs"]):
            if not current:
                first = i
            current.append(paragraph)
            if sum(len(p) for p in current) >= 120:
                where = f"sources/lunyu.json, {chapter['chapter']} paragraphs {first + 1}-{i + 1} (public domain)"
                chinese.append({"text": "\n".join(current), "source": where})
                current = []
    written: dict[str, list[dict]] = {}
    for block in paragraphs(SOURCES / "multilingual.txt"):
        tag, _, text = block.partition("\n")
        language = tag.strip("[]")
        written.setdefault(language, []).append(
            {"text": text.strip(), "source": f"sources/multilingual.txt ({language}), {WRITTEN}"}
        )
    return interleave(spread(chinese, 64), *written.values())


def write(name: str, samples: list[dict]) -> None:
    path = HERE / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    print(f"{path.name}: {len(samples)} samples")


def main() -> None:
    sets = {"general": general(), "chat": chat(), "code": code(), "multilingual": multilingual()}
    sets["default"] = interleave(*(samples[:32] for samples in sets.values()))
    for name, samples in sets.items():
        write(name, samples)


if __name__ == "__main__":
    main()
