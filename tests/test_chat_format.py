"""chat_format: deriving a template's chat format, rendering it, sampling, the loop guard, and
the multi-turn driver that continues from engine state.

The Qwen3.5-style templates under android_demo/core/testdata/templates were written for
these tests to reproduce the structure of Qwen3.5's template (system first, trimmed
content, earlier replies' thinking dropped, enable_thinking switching the generation prompt,
thinking on by default for the large models and off for the small ones); they are not
Alibaba's text.
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from qwen_mobile import chat_format as cf

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "android_demo" / "core" / "testdata" / "templates"
EMBEDDED = ROOT / "qwen_mobile" / "assets" / "qwen3.5-tiny"
EMBEDDED_CONFIG = json.loads((EMBEDDED / "tokenizer_config.json").read_text())
IM_END, ENDOFTEXT = 2, 0


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def derived(name: str) -> dict:
    chat_format, reason = cf.explain(template(name), {"bos_token": "<s>"})
    assert chat_format is not None, reason
    return chat_format


def random_conversations(seed: int, count: int):
    """Conversations beyond derive's own check set: random lengths, contents and modes."""
    rng = random.Random(seed)
    pieces = ["Hello", " world", "\n", "\n\n", "  ", "\t", "你好", "😀", "é", "e\u0301", "<think>", "</think>",
              "{{ x }}", "'s", "1234", "\r\n", " trailing ", "ok."]
    text = lambda: "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))  # noqa: E731
    for _ in range(count):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 4)):
            if turn:
                messages.append({"role": "assistant", "content": text()})
            messages.append({"role": "user", "content": text()})
        yield messages, rng.choice([None, True, False]), rng.random() < 0.8


# --- derive --------------------------------------------------------------------------------------


def test_embedded_template_derives_the_expected_format():
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"], EMBEDDED_CONFIG)
    block = {"suffix": "<|im_end|>\n", "trim": False}
    assert chat_format == {
        "version": 1,
        "system": {"prefix": "<|im_start|>system\n", **block},
        "user": {"prefix": "<|im_start|>user\n", **block},
        "assistant": {"prefix": "<|im_start|>assistant\n", **block, "strip_thinking": None},
        "preamble": "",
        "generation_prompt": "<|im_start|>assistant\n",
        "thinking": None,
    }


def test_qwen35_style_template_derives_thinking_trim_and_history_stripping():
    chat_format = derived("qwen35_style")
    assert chat_format["thinking"] == {
        "default": True, "on": "<|im_start|>assistant\n<think>\n",
        "off": "<|im_start|>assistant\n<think>\n\n</think>\n\n", "open": "<think>", "close": "</think>",
    }
    assert chat_format["generation_prompt"] == chat_format["thinking"]["on"]
    assert all(chat_format[role]["trim"] for role in ("system", "user", "assistant"))
    assert chat_format["assistant"]["strip_thinking"] == {"close": "</think>", "lstrip": "\n"}
    assert derived("qwen35_style_thinking_off")["thinking"]["default"] is False


def test_default_system_prompt_becomes_the_preamble():
    chat_format = derived("qwen25_style_default_system")
    assert chat_format["preamble"] == "<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert chat_format["system"]["prefix"] == "<s><|im_start|>system\n"


@pytest.mark.parametrize("name", ["qwen35_style", "qwen35_style_thinking_off", "qwen25_style_default_system"])
def test_render_matches_the_template_on_random_conversations(name):
    chat_format, text = derived(name), template(name)
    for messages, thinking, gen in random_conversations(seed=hash(name) % 1000, count=150):
        expected = cf.template_render(text, messages, add_generation_prompt=gen, enable_thinking=thinking,
                                      tokenizer_config={"bos_token": "<s>"})
        assert cf.render(chat_format, messages, gen, thinking) == expected, (messages, thinking, gen)


def test_embedded_render_matches_apply_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED))
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"], EMBEDDED_CONFIG)
    for messages, _, gen in random_conversations(seed=3, count=60):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert cf.render(chat_format, messages, gen) == expected


def test_inexpressible_templates_give_none_with_a_reason():
    assert cf.explain(template("turn_numbered"))[0] is None
    assert "differently" in cf.explain(template("turn_numbered"))[1]
    # thinking stripped from history only when thinking is on: no single assistant form
    mode_dependent = template("qwen35_style").replace(
        "{%- if '</think>' in text -%}", "{%- if '</think>' in text and enable_thinking is not false -%}")
    chat_format, reason = cf.explain(mode_dependent)
    assert chat_format is None and "enable_thinking=False" in reason
    assert cf.explain(None) == (None, "no chat template")
    assert cf.explain("{{ raise_exception('no') }}")[0] is None


@pytest.mark.parametrize("breakage", [
    lambda f: f["assistant"].update(trim=False),
    lambda f: f["assistant"].update(strip_thinking=None),
    lambda f: f["user"].update(suffix="<|im_end|>"),
    lambda f: f["thinking"].update(default=False),
    lambda f: f["system"].update(trim=False),
    lambda f: f.update(preamble="\n"),
])
def test_the_check_catches_a_wrong_format(breakage):
    chat_format = copy.deepcopy(derived("qwen35_style"))
    breakage(chat_format)
    with pytest.raises(cf.NotExpressible):
        cf._verify(chat_format, template("qwen35_style"), None)


def test_render_rejects_conversations_outside_its_domain():
    chat_format = derived("qwen35_style")
    with pytest.raises(ValueError):
        cf.render(chat_format, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError):
        cf.render(chat_format, [{"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError):
        cf.render(chat_format, [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                {"role": "user", "content": "c"}])


def test_thinking_history_is_stripped_and_split():
    chat_format = derived("qwen35_style")
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "add them\n</think>\n\n  4 \n"},
                {"role": "user", "content": "and 3+3?"}]
    # trimmed first, then cut after </think> and stripped of newlines only, as the template does
    # trimmed first, then cut after </think> and stripped of newlines only, as the template does
    assert cf.render(chat_format, messages, True, False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n  4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert cf.split_thinking(chat_format, True, "add them\n</think>\n\n4") == ("add them", "4")
    assert cf.split_thinking(chat_format, False, "4") == ("", "4")
    assert cf.split_thinking(chat_format, None, "still thinking") == ("still thinking", "")


# --- generation defaults ---------------------------------------------------------------------------


def test_generation_defaults_of_the_embedded_model_are_greedy():
    generation = cf.generation_defaults(EMBEDDED)
    assert generation["default_mode"] == "non_thinking" and list(generation["modes"]) == ["non_thinking"]
    mode = generation["modes"]["non_thinking"]
    assert mode["temperature"] == 0.0 and mode["presence_penalty"] == 0.0 and "do_sample false" in mode["source"]
    assert generation["loop_guard"] == cf.LOOP_GUARD_DEFAULTS


def write_checkpoint(tmp_path: Path, template_name: str, generation_config: dict | None) -> Path:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template(template_name)}))
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return tmp_path


def test_generation_defaults_fall_back_to_the_model_card_per_mode(tmp_path):
    generation = cf.generation_defaults(write_checkpoint(tmp_path, "qwen35_style_thinking_off", None))
    assert generation["default_mode"] == "non_thinking"
    non_thinking, thinking = generation["modes"]["non_thinking"], generation["modes"]["thinking"]
    assert (non_thinking["temperature"], non_thinking["top_p"], non_thinking["top_k"],
            non_thinking["presence_penalty"]) == (0.7, 0.8, 20, 1.5)
    assert (thinking["temperature"], thinking["top_p"], thinking["top_k"]) == (0.6, 0.95, 20)
    assert generation["max_new_tokens"] == cf.DEFAULT_MAX_NEW_TOKENS


def test_generation_config_describes_the_templates_default_mode(tmp_path):
    config = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 40, "max_new_tokens": 300}
    generation = cf.generation_defaults(write_checkpoint(tmp_path, "qwen35_style", config))
    assert generation["default_mode"] == "thinking"
    thinking = generation["modes"]["thinking"]
    assert (thinking["temperature"], thinking["top_p"], thinking["top_k"], thinking["presence_penalty"]) == \
        (1.0, 0.95, 40, 1.5)
    assert generation["modes"]["non_thinking"]["source"] == cf.CARD_SOURCE
    assert generation["max_new_tokens"] == 300


def test_schema_accepts_what_the_functions_write(tmp_path):
    import jsonschema

    schema = json.loads((ROOT / "qwen_mobile" / "schemas" / "chat_format.schema.json").read_text())
    for name in ("chat_format", "generation"):
        jsonschema.Draft202012Validator.check_schema({**schema, "$ref": f"#/$defs/{name}"})
    validate = lambda value, name: jsonschema.validate(value, {**schema, "$ref": f"#/$defs/{name}"})  # noqa: E731
    validate(derived("qwen35_style"), "chat_format")
    validate(cf.derive(EMBEDDED_CONFIG["chat_template"]), "chat_format")
    validate(cf.generation_defaults(EMBEDDED), "generation")
    validate(cf.generation_defaults(write_checkpoint(tmp_path, "qwen35_style", None)), "generation")
    broken = derived("qwen35_style")
    del broken["user"]["suffix"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, "chat_format")


# --- sampling and the loop guard -------------------------------------------------------------------


def test_splitmix64_matches_the_reference_stream():
    rng = cf.SplitMix64(0)
    assert [rng.next_long() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert 0.0 <= cf.SplitMix64(7).next_double() < 1.0


def test_greedy_penalties_and_truncation():
    rng = cf.SplitMix64(1)
    logits = [1.0, 3.0, 3.0, -2.0]
    assert cf.sample(logits, {}, cf.Sampling(), rng) == 1  # ties: lowest index
    assert cf.sample(logits, {1: 1}, cf.Sampling(presence_penalty=0.5), rng) == 2
    assert cf.sample(logits, {1: 1}, cf.Sampling(repetition_penalty=2.0), rng) == 2  # 3 / 2 < 3
    assert cf.sample([-1.0, -1.5], {0: 1}, cf.Sampling(repetition_penalty=2.0), rng) == 1  # -1 * 2 < -1.5
    assert cf.sample(logits, {1: 3}, cf.Sampling(frequency_penalty=0.1), rng) == 2
    logits = [1.0, 3.0, 2.0, -2.0]
    for seed in range(20):  # top_k 1, a tiny top_p, a large min_p leave only the best token, at any temperature
        assert cf.sample(logits, {}, cf.Sampling(temperature=5.0, top_k=1), cf.SplitMix64(seed)) == 1
        assert cf.sample(logits, {}, cf.Sampling(temperature=5.0, top_p=0.01), cf.SplitMix64(seed)) == 1
        assert cf.sample(logits, {}, cf.Sampling(temperature=5.0, min_p=0.99), cf.SplitMix64(seed)) == 1


def test_sampling_follows_the_softmax():
    rng = cf.SplitMix64(42)
    logits = [0.0, math.log(3.0), -math.inf]
    picks = [cf.sample(logits, {}, cf.Sampling(temperature=1.0), rng) for _ in range(4000)]
    assert picks.count(2) == 0
    assert abs(picks.count(1) / 4000 - 0.75) < 0.03
    # top_p 0.7 keeps only the 0.75 token; 0.8 keeps both
    assert {cf.sample(logits, {}, cf.Sampling(temperature=1.0, top_p=0.7), rng) for _ in range(200)} == {1}
    assert {cf.sample(logits, {}, cf.Sampling(temperature=1.0, top_p=0.8), rng) for _ in range(200)} == {0, 1}


def test_loop_guard_trips_exactly_at_its_threshold():
    guard = cf.LoopGuard(max_period=8, min_span=12, min_repeats=3)
    prefix = [100, 101, 102]
    block = [5, 6, 7, 8, 9]  # period 5: needs max(12, 2 * 5) = 12 matching positions, 17 tokens of loop
    looped = prefix + (block * 4)[:17]
    assert guard.looping(looped)
    assert not guard.looping(looped[:-1])
    assert guard.looping([1] * 13) and not guard.looping([1] * 12)
    assert not guard.looping(list(range(200)))


# --- the multi-turn driver -------------------------------------------------------------------------


class ScriptedEngine:
    """Logits that depend on every token fed so far (a hash of the history); a reply ends with
    <|im_end|> once `reply_length` tokens follow the generation prompt (`prompt_tail` tokens
    after the last <|im_start|>: "assistant\\n" is 4 tokens of the embedded tokenizer). It records each call and can copy its state."""

    def __init__(self, vocab: int = 4096, reply_length: int = 6, max_context: int = 512, max_chunk: int = 16,
                 prompt_tail: int = 4):
        self.vocab, self.reply_length, self.prompt_tail = vocab, reply_length, prompt_tail
        self.max_context, self.max_chunk = max_context, max_chunk
        self.history: list[int] = []
        self.calls: list[tuple[list[int], int]] = []

    def step(self, tokens, start):
        assert 1 <= len(tokens) <= self.max_chunk and start + len(tokens) <= self.max_context
        if start == 0:
            self.history = []
        assert start == len(self.history), "fed at a position that does not continue the state"
        self.calls.append((list(tokens), start))
        self.history.extend(tokens)
        rng = np.random.default_rng(abs(hash(tuple(self.history))) % (2**32))
        logits = rng.normal(size=self.vocab).astype(np.float32)
        logits[[IM_END, ENDOFTEXT, 1]] = -10.0
        since_im_start = len(self.history) - 1 - max(i for i, t in enumerate(self.history) if t == 1)
        if since_im_start >= self.prompt_tail + self.reply_length:
            logits[IM_END] = 50.0
        return logits

    def snapshot(self):
        return list(self.history)

    def restore(self, state):
        self.history = list(state)

    def engine(self, snapshots: bool) -> cf.Engine:
        return cf.Engine(self.step, self.max_context, self.max_chunk,
                         self.snapshot if snapshots else None, self.restore if snapshots else None)


@pytest.fixture(scope="module")
def tokenizer():
    return cf.HFTokenizer(EMBEDDED / "tokenizer.json")


def conversation(engine, chat_format, tokenizer, **kwargs) -> cf.Conversation:
    return cf.Conversation(engine, chat_format, tokenizer, stop_ids=(IM_END, ENDOFTEXT), **kwargs)


def test_each_turn_prefills_only_its_own_tokens(tokenizer):
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"])
    scripted = ScriptedEngine()
    chat = conversation(scripted.engine(False), chat_format, tokenizer, system="Be brief.")
    replies = [chat.say(text) for text in ("Hi there", "Tell me more\nplease", "你好")]
    assert [r.finish for r in replies] == ["stop"] * 3 and all(len(r.tokens) == 6 for r in replies)
    starts = [start for _, start in scripted.calls]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)  # never fed twice
    assert sum(len(tokens) for tokens, _ in scripted.calls) == len(chat.fed) == len(scripted.history)
    second = next(c for c in scripted.calls if c[1] == replies[0].prompt_tokens + len(replies[0].tokens))
    assert second[0][0] == IM_END  # the sampled stop token opens the next turn
    # with the embedded template the continued context is exactly the template's rendering
    assert tokenizer.decode(chat.fed) == cf.render(chat_format, chat.messages[:-1], True) + replies[-1].text


def test_qwen35_style_continuation_keeps_the_think_block_in_context(tokenizer):
    chat_format = derived("qwen35_style")
    scripted = ScriptedEngine()
    chat = conversation(scripted.engine(False), chat_format, tokenizer, enable_thinking=False)
    chat.say("  first  ")
    chat.say("second")
    text = tokenizer.decode(chat.fed)
    assert text.startswith("<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert text.count("<think>\n\n</think>\n\n") == 2  # the template's re-rendering would keep only the last
    assert text.endswith(chat.messages[-1]["content"])


def test_stop_by_length_feeds_the_last_token_and_the_whole_suffix(tokenizer):
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"])
    scripted = ScriptedEngine(reply_length=50)
    chat = conversation(scripted.engine(False), chat_format, tokenizer, max_new_tokens=4, loop_guard=None)
    first = chat.say("one")
    assert first.finish == "length" and len(first.tokens) == 4
    assert len(chat.fed) == first.prompt_tokens + len(first.tokens) - 1  # the last one is not fed yet
    chat.say("two")
    turn = scripted.calls[[len(t) > 1 for t, _ in scripted.calls].index(True, 1)][0]
    assert turn[0] == first.tokens[-1]  # sampled, shown, not fed until now
    assert tokenizer.decode(turn[1:]).startswith("<|im_end|>\n<|im_start|>user\ntwo")


@pytest.mark.parametrize("snapshots", [True, False])
def test_regenerate_restores_the_turn(tokenizer, snapshots):
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"])
    scripted = ScriptedEngine()
    chat = conversation(scripted.engine(snapshots), chat_format, tokenizer,
                        sampling=cf.Sampling(temperature=1.0, top_k=50), seed=5)
    chat.say("hello")
    first = chat.say("again")
    fed = list(chat.fed)
    calls = len(scripted.calls)
    again = chat.regenerate()
    assert chat.messages[-1]["content"] == again.text and len(chat.messages) == 4
    assert again.tokens != first.tokens  # the random stream went on
    assert chat.fed[: len(fed) - len(first.tokens)] == fed[: len(fed) - len(first.tokens)]
    prefilled = [c for c in scripted.calls[calls:] if len(c[0]) > 1]
    assert (prefilled == []) if snapshots else (prefilled[0][1] == 0)
    # the same state either way: a greedy regenerate repeats the reply exactly
    greedy = conversation(scripted.engine(snapshots), chat_format, tokenizer)
    greedy.say("hello")
    reply = greedy.say("x")
    assert greedy.regenerate().tokens == reply.tokens


def test_a_turn_that_does_not_fit_rebuilds_the_recent_window(tokenizer):
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"])
    scripted = ScriptedEngine(max_context=96)
    chat = conversation(scripted.engine(False), chat_format, tokenizer, system="sys", max_new_tokens=8)
    replies = [chat.say(f"message number {i} with some words") for i in range(6)]
    assert any(r.rebuilt for r in replies)
    assert chat.first_kept > 1  # the oldest turns were dropped, the system message kept
    window = [chat.messages[0]] + chat.messages[chat.first_kept:]
    # the context is the template's rendering of the kept window (the embedded template
    # does not rewrite history, so continued turns render the same way)
    assert tokenizer.decode(chat.fed) == cf.render(chat_format, window[:-1], True) + replies[-1].text
    assert max(start + len(tokens) for tokens, start in scripted.calls) <= 96


def test_loop_guard_stops_a_repeating_reply(tokenizer):
    chat_format = cf.derive(EMBEDDED_CONFIG["chat_template"])

    class Looping(ScriptedEngine):
        def step(self, tokens, start):
            super().step(tokens, start)
            logits = np.zeros(self.vocab, dtype=np.float32)
            logits[300 + (len(self.history) % 3)] = 10.0
            return logits

    scripted = Looping()
    chat = conversation(scripted.engine(False), chat_format, tokenizer, max_new_tokens=500)
    reply = chat.say("go")
    assert reply.finish == "loop" and len(reply.tokens) == 64 + 3
