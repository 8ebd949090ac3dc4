"""Golden files for the Android (Java) and iOS (Swift) cores' tests, from a bundle of the embedded model.

    python scripts/app_goldens.py BUNDLE --out android_demo/core/testdata/goldens

BUNDLE is an ExecuTorch (or TFLite) bundle of the embedded qwen3.5-tiny (`qwen-mobile export`).
Everything here goes through library functions only: the bundle's runner (`open_runner`),
`qwen_mobile.chat_format`, and the `tokenizers` library. Written files:

  tokenizer.json, tokenizer_config.json   the bundle's, unchanged (the manifest's digests cover them)
  tokenizer_qwen35_pattern.json           the same vocabulary and merges behind Qwen3.5's own
                                          pre-tokenizer (NFC, Split with its regex, ByteLevel
                                          without regex) and two non-special added tokens
  tokenizer_cases.json                    a corpus and the ids/text `tokenizers` gives for both
  chat_cases.json                         per template: the derived chat_format and conversations
                                          as the Jinja template renders them
  sampler_cases.json, loop_guard_cases.json  chat_format.sample / LoopGuard on seeded inputs
  replay_*.json                           multi-turn conversations driven through the bundle's
                                          runner: every call's tokens and position, the top
                                          logits it returned (float32 bit patterns), each reply
  manifest.json                           the bundle's manifest (files with sizes and digests,
                                          chat_format, generation), unchanged
  manifest_tflite.json                    a TFLite bundle's, with --tflite BUNDLE

A replay engine returns the recorded top-K logits (every other logit -inf) and the Python
driver samples from exactly those, so the Java and Swift drivers, fed the same logits, must
produce the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path

import numpy as np

from qwen_mobile import chat_format as cf
from qwen_mobile.bundle import open_runner

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "android_demo" / "core" / "testdata" / "templates"
EMBEDDED_CHECKPOINT = ROOT / "qwen_mobile" / "assets" / "qwen3.5-tiny"
TOP_K = 32

# The Split regex of Qwen3.5's tokenizer.json (letters with their combining marks, single
# digits, punctuation runs without marks), as llama.cpp's QWEN35 pre-tokenizer and ollama's
# qwen35 converter reproduce it.
QWEN35_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write(out: Path, name: str, value) -> None:
    (out / name).write_text(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")


# --- tokenizers -----------------------------------------------------------------------------------


def qwen35_pattern_tokenizer(embedded: dict) -> dict:
    tokenizer = copy.deepcopy(embedded)
    tokenizer["normalizer"] = {"type": "NFC"}
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN35_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    tokenizer["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                   "use_regex": False}
    tokenizer["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    next_id = len(tokenizer["model"]["vocab"])
    for offset, content in enumerate(("<think>", "</think>")):  # as Qwen3/3.5 have them: added, not special
        tokenizer["added_tokens"].append({"id": next_id + offset, "content": content, "single_word": False,
                                          "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    return tokenizer


def corpus() -> list[str]:
    texts = [
        "", " ", "Hello, world!", "Hello world", " Hello", "hello   world  ", "The quick brown fox jumps over the lazy dog.",
        "I'm sure you've heard: they'll say we'd DON'T, can't, WON'T, it's, She'S.", "'s 's' ''s",
        "你好，世界！今天天气很好。", "我爱自然语言处理", "日本語のテキストです。カタカナとひらがな。", "한국어 문장입니다.",
        "مرحبا بالعالم", "Привет, мир! Ёжик.", "Γειά σου Κόσμε", "नमस्ते दुनिया, हिन्दी में लिखा गया पाठ",
        "ภาษาไทยไม่มีช่องว่าง", "Tiếng Việt có dấu: Nguyễn", "e\u0301 vs \u00e9, n\u0303, A\u030a", "ﬁ ligature ① ⅻ ２０２４",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }", "{\"key\": [1, 2.5, -3e10, true, null], \"s\": \"\\u00e9\"}",
        "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>", "x = y ** 2 // 3 != 4 && z || !w; // comment",
        "SELECT * FROM users WHERE id = 42;", "https://example.com/path?q=1&r=two#frag", "user@example.org",
        "😀 😃 😄 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈 ❤️", "emoji😀inside😀words", "🤖🤖🤖",
        "tabs\tand\ttabs", "\t\t\tindented", "line1\nline2\n\nline4", "crlf\r\nline\r\n", "\n\n\n", "  \n  \n",
        "trailing spaces   ", "   leading", "many          spaces", "\u00a0nbsp\u00a0and\u3000ideographic\u3000space",
        "control\x1cchars\x1d\x1e\x1f", "zero\u200bwidth\u200djoiner", "\u2028line\u2029para", "\x00nul\x7fdel",
        "1234567890", "3.14159 2.71828", "12,345.67", "0x1F 0b1010 1e-9", "第3章 第12节", "٣٤٥ arabic digits",
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more", "<|im_end|><|im_end|>",
        "<|im_start|>", "< |im_start| >", "<think>\nreasoning\n</think>\n\nanswer", "a<think>b</think>c",
        "ALL CAPS SENTENCE", "MiXeD cAsE wOrDs", "snake_case_name camelCaseName kebab-case-name",
        "!!!???...,,,;;;", "--- *** ___ ===", "((nested [brackets] {braces}))", "$100 €50 £30 ¥1000",
        "x̸ a̲b̲c̲ combining low lines", "Z̤̈́a̮̿l͉̈g̟̊o", "ﾊﾝｶｸｶﾀｶﾅ", "Ⅷ ⅷ", "ǅ ǈ title-case digraphs",
        "ſ long s and K kelvin", "İstanbul ıi", "ß ẞ straße",
    ]
    rng = random.Random(1234)
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list(" \t\n\r.,;:'\"!?()[]{}<>/-_=+*&^%$#@~`|\\")
            + list("你好世界中文字éüñçàøåß") + ["😀", "👍🏽", "\u0301", "\u0308", "\u00a0", "\u3000", "'s", "'LL", "<|im_end|>",
                                               "<|im_start|>", "<think>", "  ", "\n\n", "क्षि", "ﷺ"])
    for _ in range(120):
        texts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    return texts


def tokenizer_cases(embedded_path: Path, qwen35_path: Path) -> dict:
    from tokenizers import Tokenizer

    tokenizers = {"embedded": Tokenizer.from_file(str(embedded_path)), "qwen35": Tokenizer.from_file(str(qwen35_path))}
    cases = []
    for text in corpus():
        case = {"text": text}
        for name, tokenizer in tokenizers.items():
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            case[name] = ids
            case[name + "_decoded"] = tokenizer.decode(ids, skip_special_tokens=False)
            case[name + "_decoded_skip"] = tokenizer.decode(ids, skip_special_tokens=True)
        cases.append(case)
    rng = random.Random(99)
    vocab = tokenizers["qwen35"].get_vocab_size()
    decode = []  # id sequences no encoder produces: byte tokens cut mid-character, specials anywhere
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        decode.append({"ids": ids, "qwen35": tokenizers["qwen35"].decode(ids, skip_special_tokens=False),
                       "qwen35_skip": tokenizers["qwen35"].decode(ids, skip_special_tokens=True)})
    return {"cases": cases, "decode": decode}


# --- chat formats ---------------------------------------------------------------------------------


def chat_cases(tokenizer_config: dict) -> dict:
    templates = {"embedded": (tokenizer_config["chat_template"], tokenizer_config)}
    for name in ("qwen35_style", "qwen35_style_thinking_off", "qwen25_style_default_system"):
        templates[name] = ((TEMPLATES / f"{name}.jinja").read_text(), {"bos_token": "<s>"})
    rng = random.Random(7)
    pieces = ["Hi", " there", "\n", "\n\n", "  ", "你好", "😀", "e\u0301", "</think>", "<think>", "{{ x }}", "\t", "ok."]
    extra = []
    for _ in range(16):
        messages = [{"role": "system", "content": "".join(rng.choice(pieces) for _ in range(3))}] if rng.random() < .5 else []
        for turn in range(rng.randint(1, 4)):
            if turn:
                messages.append({"role": "assistant", "content": "".join(rng.choice(pieces) for _ in range(5))})
            messages.append({"role": "user", "content": "".join(rng.choice(pieces) for _ in range(4))})
        extra.append((messages, rng.choice([None, True, False])))
    result = {}
    for name, (template, config) in templates.items():
        chat_format, reason = cf.explain(template, config)
        assert chat_format is not None, f"{name}: {reason}"
        cases = []
        for messages, thinking in cf.check_conversations() + extra:
            if thinking is not None and chat_format["thinking"] is None:
                continue  # the same rendering as thinking None
            for gen in (True, False) if thinking is None else (True,):
                rendered = cf.template_render(template, messages, add_generation_prompt=gen, enable_thinking=thinking,
                                              tokenizer_config=config)
                assert rendered == cf.render(chat_format, messages, gen, thinking)
                cases.append({"messages": messages, "add_generation_prompt": gen, "enable_thinking": thinking,
                              "rendered": rendered})
        result[name] = {"chat_format": chat_format, "cases": cases}
    return result


# --- sampling and the loop guard ------------------------------------------------------------------


def sampler_cases() -> list[dict]:
    rng = random.Random(5)
    cases = []
    for index in range(60):
        vocab = rng.choice([3, 10, 50])
        logits = [float(np.float32(rng.gauss(0, 3))) for _ in range(vocab)]
        for _ in range(rng.randint(0, 3)):
            logits[rng.randrange(vocab)] = logits[rng.randrange(vocab)]  # ties
        if rng.random() < 0.3:
            logits[rng.randrange(vocab)] = -np.inf
        counts = {str(rng.randrange(vocab)): rng.randint(1, 3) for _ in range(rng.randint(0, 4))}
        params = cf.Sampling(
            temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.5]), top_p=rng.choice([1.0, 0.95, 0.8, 0.5, 0.1]),
            top_k=rng.choice([0, 0, 1, 5, 20]), min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
            presence_penalty=rng.choice([0.0, 0.5, 1.5]), frequency_penalty=rng.choice([0.0, 0.2]),
            repetition_penalty=rng.choice([1.0, 1.1, 1.5]))
        seed = rng.randrange(2**63) if index % 2 else index
        stream = cf.SplitMix64(seed)
        picks = [cf.sample(logits, {int(k): v for k, v in counts.items()}, params, stream) for _ in range(8)]
        cases.append({"logits_bits": [int(np.float32(v).view(np.int32)) for v in logits], "counts": counts,
                      "sampling": vars(params), "seed": str(seed), "picks": picks})
    return cases


def loop_guard_cases() -> list[dict]:
    rng = random.Random(11)
    cases = []
    for _ in range(80):
        guard = cf.LoopGuard(max_period=rng.choice([4, 8, 64]), min_span=rng.choice([6, 12, 64]),
                             min_repeats=rng.choice([2, 3, 4]))
        period = rng.randint(1, 10)
        block = [rng.randrange(6) for _ in range(period)]
        head = [rng.randrange(100, 110) for _ in range(rng.randint(0, 5))]
        tokens = head + (block * 40)[: rng.randint(0, 100)]
        if rng.random() < 0.3 and tokens:
            tokens[rng.randrange(len(tokens))] = 999
        cases.append({"guard": vars(guard), "tokens": tokens, "looping": guard.looping(tokens)})
    return cases


# --- replays through the bundle -------------------------------------------------------------------


class Recorder:
    """The runner's step, recorded: each call's tokens and position and its top-K logits; the
    driver gets those top-K logits back with every other logit -inf."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def step(self, tokens, start):
        logits = np.asarray(self.runner.step(list(tokens), start), dtype=np.float32).reshape(-1)
        order = np.lexsort((np.arange(len(logits)), -logits))[:TOP_K]
        truncated = np.full_like(logits, -np.inf)
        truncated[order] = logits[order]
        self.calls.append({"tokens": list(map(int, tokens)), "start": int(start), "ids": [int(i) for i in order],
                           "logits_bits": [int(v) for v in logits[order].view(np.int32)]})
        return truncated


SCENARIOS = {
    "greedy": dict(system="You are a helpful assistant.", sampling=cf.Sampling(), seed=0, turns=[
        {"user": "Hello! Who are you?", "max_new_tokens": 24},
        {"user": "Tell me a story about a small robot who learns to paint. " * 12, "max_new_tokens": 24},
        {"user": "谢谢。Write a short poem about the sea 🌊.", "max_new_tokens": 6},
        {"user": "And one more line?", "max_new_tokens": 16},
        {"regenerate": True, "max_new_tokens": 16},
    ]),
    "sampled": dict(system=None, seed=1234, sampling=cf.Sampling(
        temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=1.5, frequency_penalty=0.1,
        repetition_penalty=1.1), turns=[
        {"user": "What is the capital of France?", "max_new_tokens": 20},
        {"user": "Why?\nExplain briefly.", "max_new_tokens": 20},
        {"regenerate": True, "max_new_tokens": 20},
        {"regenerate": True, "max_new_tokens": 20},
    ]),
    "context": dict(system="Be brief.", sampling=cf.Sampling(), seed=0, max_context=150, turns=[
        {"user": f"Question {i}: what comes after {i}?", "max_new_tokens": 20} for i in range(6)
    ]),
    "loop": dict(system=None, sampling=cf.Sampling(), seed=0, turns=[  # the tiny model loops greedily
        {"user": "ROMEO:", "max_new_tokens": 300},
        {"user": "JULIET:", "max_new_tokens": 12},
    ]),
    "stops": dict(system=None, sampling=cf.Sampling(temperature=0.7, top_k=20), seed=3, newline_stops=True, turns=[
        {"user": "First Citizen:", "max_new_tokens": 40},
        {"user": "Second Citizen:", "max_new_tokens": 40},
        {"user": "MENENIUS:", "max_new_tokens": 40},
    ]),
    "thinking": dict(system="You think first.", template="qwen35_style", seed=99,
                     sampling=cf.Sampling(**{k: v for k, v in cf.CARD_DEFAULTS["thinking"].items()}), turns=[
        {"user": "  Is 17 prime?  ", "max_new_tokens": 16},
        {"user": "And 21?", "max_new_tokens": 16, "enable_thinking": False},
        {"regenerate": True, "max_new_tokens": 16},
    ]),
}


def replay(bundle: Path, name: str, scenario: dict, tokenizer_config: dict) -> dict:
    runner, manifest = open_runner(bundle)
    recorder = Recorder(runner)
    if "template" in scenario:
        chat_format = cf.derive((TEMPLATES / f"{scenario['template']}.jinja").read_text())
    else:
        chat_format = cf.derive(manifest["chat_template"], tokenizer_config)
    engine = cf.Engine(recorder.step, runner.max_context, runner.max_chunk)
    guard = cf.LoopGuard()
    tokenizer = cf.HFTokenizer(bundle / "tokenizer.json")
    stop_ids = list(manifest["special_tokens"]["eos"])
    if scenario.get("newline_stops"):  # a stop token that does not start the assistant suffix
        stop_ids += tokenizer.encode("\n")
    chat = cf.Conversation(engine, chat_format, tokenizer, stop_ids=stop_ids, sampling=scenario["sampling"],
                           seed=scenario["seed"], system=scenario["system"], loop_guard=guard,
                           max_context=scenario.get("max_context"))
    turns = []
    for turn in scenario["turns"]:
        chat.max_new_tokens = turn["max_new_tokens"]
        if "enable_thinking" in turn:
            chat.enable_thinking = turn["enable_thinking"]
        reply = chat.regenerate() if turn.get("regenerate") else chat.say(turn["user"])
        turns.append({**turn, "expect": {"tokens": reply.tokens, "text": reply.text, "finish": reply.finish,
                                         "prompt_tokens": reply.prompt_tokens, "rebuilt": reply.rebuilt}})
    return {
        "name": name, "chat_format": chat_format, "sampling": vars(scenario["sampling"]), "seed": str(scenario["seed"]),
        "system": scenario["system"], "stop_ids": stop_ids, "loop_guard": vars(guard),
        "engine": {"max_context": runner.max_context, "max_chunk": runner.max_chunk, "vocab_size": manifest["vocab_size"]},
        "max_context": scenario.get("max_context"), "top_k_recorded": TOP_K, "turns": turns,
        "messages": chat.messages, "fed": chat.fed, "calls": recorder.calls,
    }


# --- manifests ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle of the embedded model (qwen-mobile export)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tflite", type=Path, help="a TFLite bundle of the embedded model, for manifest_tflite.json")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(args.bundle / name, out / name)
    embedded = json.loads((args.bundle / "tokenizer.json").read_text())
    (out / "tokenizer_qwen35_pattern.json").write_text(json.dumps(qwen35_pattern_tokenizer(embedded), ensure_ascii=False))
    write(out, "tokenizer_cases.json", tokenizer_cases(out / "tokenizer.json", out / "tokenizer_qwen35_pattern.json"))
    tokenizer_config = json.loads((args.bundle / "tokenizer_config.json").read_text())
    write(out, "chat_cases.json", chat_cases(tokenizer_config))
    write(out, "sampler_cases.json", sampler_cases())
    write(out, "loop_guard_cases.json", loop_guard_cases())
    for name, scenario in SCENARIOS.items():
        write(out, f"replay_{name}.json", replay(args.bundle, name, scenario, tokenizer_config))
    shutil.copyfile(args.bundle / "manifest.json", out / "manifest.json")
    if args.tflite:
        shutil.copyfile(args.tflite / "manifest.json", out / "manifest_tflite.json")
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>9,d}  {path.name}")


if __name__ == "__main__":
    main()
