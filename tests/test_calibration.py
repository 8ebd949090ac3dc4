"""Calibration sets: the JSONL format, its one-line errors, the shipped sets and their distance
from the held-out text every quality figure is measured on."""

import json

import pytest

from qwen_mobile.checkpoint import EMBEDDED_MODEL
from qwen_mobile.corpus import load_corpus, split_corpus
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.generate import load_tokenizer
from qwen_mobile.quant.calibrate import (
    SET_NAMES,
    calibration_dir,
    load_calibration,
    read_samples,
    sample_text,
    shipped_sets,
)

SUBSTANTIAL_LINE = 20  # characters, stripped: as calibration/build_sets.py filters


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_MODEL)


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"text": "Good morrow."})


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"text": "unterminated}', "not valid JSON"),
        ('["a list"]', 'expected an object with "text" or "messages"'),
        ('{"txt": "typo"}', 'expected exactly one of "text" or "messages", found 0'),
        ('{"text": "a", "messages": []}', "found 2"),
        ('{"text": "a", "lang": "en"}', "unknown key 'lang'"),
        ('{"text": 3}', "text must be a string, not int"),
        ('{"text": "   "}', "text is empty"),
        ('{"messages": []}', "messages must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "messages[0] must be an object with role and content only"),
        ('{"messages": [{"role": "robot", "content": "beep"}]}', "messages[0].role 'robot' is unknown"),
        ('{"messages": [{"role": "user", "content": ""}]}', "messages[0].content is empty"),
        ('{"messages": [{"role": "user", "content": ["x"]}]}', "messages[0].content must be a string"),
        ('{"text": "a", "source": 7}', "source must be a string"),
    ],
)
def test_a_malformed_line_is_a_one_line_error_naming_file_and_line(tmp_path, tokenizer, bad, message):
    path = write_lines(tmp_path / "set.jsonl", GOOD, "", bad)  # the blank line 2 is skipped, line 3 is bad
    with pytest.raises(QwenMobileError) as error:
        load_calibration(path, tokenizer)
    text = str(error.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_an_empty_file_and_an_unknown_name_are_errors(tmp_path, tokenizer):
    with pytest.raises(QwenMobileError, match="no samples"):
        load_calibration(write_lines(tmp_path / "empty.jsonl", ""), tokenizer)
    with pytest.raises(QwenMobileError) as error:
        load_calibration("poetry", tokenizer)
    assert all(name in str(error.value) for name in SET_NAMES)


def test_text_and_conversations_tokenize_as_the_phone_sees_them(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hail, sir."}]
    path = write_lines(tmp_path / "mix.jsonl", GOOD, json.dumps({"messages": messages, "source": "mine"}))
    text_ids, chat_ids = load_calibration(path, tokenizer)
    assert text_ids == tokenizer.encode("Good morrow.", add_special_tokens=False)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert chat_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in chat_ids
    assert load_calibration(path, tokenizer, max_samples=1, max_tokens=2) == [text_ids[:2]]


def test_every_shipped_set_has_128_valid_samples_with_their_source(tokenizer):
    sets = shipped_sets()
    assert list(sets) == list(SET_NAMES)
    assert all(path.parent == calibration_dir() for path in sets.values())
    for name, path in sets.items():
        samples = read_samples(path)
        assert len(samples) >= 128, name
        assert all(sample.get("source") for sample in samples), name
    chat = read_samples(sets["chat"])
    assert all("messages" in s and len(s["messages"]) >= 2 for s in chat)
    languages = {s["source"].split("(")[1].split(")")[0] for s in read_samples(sets["multilingual"]) if "(" in s["source"]}
    assert {"fr", "de", "es", "public domain"} <= languages
    default = load_calibration("default", tokenizer, max_samples=8, max_tokens=64)
    assert len(default) == 8 and all(1 < len(ids) <= 64 for ids in default)


def held_out_lines() -> set[str]:
    lines = {line.strip() for line in split_corpus(load_corpus())[1].splitlines()}
    return {line for line in lines if len(line) >= SUBSTANTIAL_LINE}


def shared_lines(samples: list[dict], held_out: set[str]) -> list[tuple[int, str]]:
    """(sample number, line) for every line of a sample that the held-out text also has."""
    return [
        (number, line)
        for number, sample in enumerate(samples, start=1)
        for line in sample_text(sample).splitlines()
        if line.strip() in held_out
    ]


def test_no_shipped_set_shares_a_substantial_line_with_the_held_out_text():
    held_out = held_out_lines()
    assert len(held_out) > 2000  # the comparison has something to compare
    for name, path in shipped_sets().items():
        shared = shared_lines(read_samples(path), held_out)
        assert not shared, f"{name}.jsonl sample {shared[0][0]} shares {shared[0][1]!r} with the held-out split"


def test_the_disjointness_check_catches_a_held_out_line(tmp_path):
    held_out = held_out_lines()
    line = sorted(held_out)[len(held_out) // 2]
    path = write_lines(tmp_path / "leaky.jsonl", GOOD, json.dumps({"messages": [{"role": "user", "content": line}]}))
    assert shared_lines(read_samples(path), held_out) == [(2, line)]
