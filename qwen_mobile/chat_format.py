"""Chat formats an app renders without Jinja, sampling an app can reproduce, and the
multi-turn driver that continues from an engine's state.

A checkpoint's chat template is a Jinja program; a phone app has no Jinja. `derive` renders
the template with marker messages and reads off, per role, the text before and after the
content, the generation prompt (and its thinking on/off forms when the template takes
`enable_thinking`), the text that stands in for a missing system message, and what the
template does to content (trimming; dropping an earlier reply's thinking). It then renders
dozens of conversations both ways and returns None, with a reason (`explain`), unless every
one matches the template's own rendering character for character. The result is the
manifest's `chat_format` (schemas/chat_format.schema.json); `render` is the app-side
rendering, which the Java (android_demo/core) and Swift (ios_demo/QwenMobileKit) cores mirror.

The domain `render` covers, and that `derive` checks: an optional system message first, then
user and assistant messages alternating, starting and ending with a user message, plain text
content. Tools, images and a conversation that ends with an assistant message are outside it.

Continuing from the engine's state (`Conversation`)
---------------------------------------------------
An app keeps the model's state between turns: each new turn prefills only its own tokens (the
stop token that ended the previous reply, the rest of the assistant suffix, the next user
turn, the generation prompt), never the earlier turns again. The engine's context is then the
transcript as it happened, which equals the template's rendering of the same messages except
where the template rewrites history:

- Qwen3-style templates drop an earlier reply's thinking (`<think>...</think>`) and, in
  thinking-off mode, the empty `<think>\\n\\n</think>\\n\\n` that the generation prompt put
  before it; Qwen3.5-style templates also trim each message's content. A continued context
  keeps those tokens (the model did see them). This costs context, not correctness of the
  format: the next turn's own text is rendered exactly as the template would.
- To get the template's rendering of the history (to drop old thinking, or when the context is
  full), `Conversation` rebuilds: it renders the most recent messages that fit with `render`
  and prefills them from position 0. That is what happens automatically when a turn does not
  fit (oldest turns are dropped first; the system message is kept).
- Regenerating the last reply restores a snapshot of the state taken after the turn's prefill
  where the engine can copy its state (LiteRT, Core ML); elsewhere (ExecuTorch keeps the state
  inside the program) it re-prefills the transcript up to that point from position 0.

Sampling is defined here exactly (penalties, temperature, top-k, top-p, min-p, a SplitMix64
random stream) so that the same logits and seed give the same tokens in Python, Java and
Swift; a loop guard stops replies that repeat a block of tokens (small Qwen3.5 models loop,
worst in thinking mode).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

FORMAT_VERSION = 1
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Rendering the template itself, as transformers' apply_chat_template does
# ---------------------------------------------------------------------------------------------

_UNSET = object()


def special_tokens(tokenizer_config: dict | None) -> dict:
    """The special-token strings apply_chat_template hands the template (bos_token, eos_token, ...)."""
    names = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = (tokenizer_config or {}).get(key)
        if isinstance(value, dict):  # the older AddedToken layout
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def template_render(
    chat_template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    enable_thinking=_UNSET,
    tokenizer_config: dict | None = None,
) -> str:
    """The template's own rendering, through transformers' Jinja environment (the one
    apply_chat_template uses: same filters, same globals, same sandbox)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = dict(special_tokens(tokenizer_config))
    if enable_thinking is not _UNSET and enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return rendered[0]


# ---------------------------------------------------------------------------------------------
# The app-side rendering
# ---------------------------------------------------------------------------------------------

# Python's str.strip() whitespace (what Jinja's `trim` removes), spelled out for the Java and
# Swift cores, whose own notions of whitespace differ.
PY_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007" \
                "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _content(spec: dict, text: str, history: bool) -> str:
    if spec.get("trim"):
        text = text.strip(PY_WHITESPACE)
    strip = spec.get("strip_thinking")
    if history and strip and strip["close"] in text:
        text = text.split(strip["close"])[-1].lstrip(strip["lstrip"])
    return text


def check_messages(chat_format: dict, messages: Sequence[dict]) -> None:
    """The domain `render` covers: [system], user, assistant, user, ..., user."""
    roles = [m.get("role") for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if roles and roles[0] == "system" and chat_format.get("system") is None:
        raise ValueError("this chat format has no system role")
    if not body or len(body) % 2 == 0 or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
        raise ValueError(f"messages must be [system], then user and assistant alternating, ending with user; got {roles}")
    for message in messages:
        if not isinstance(message.get("content"), str):
            raise ValueError("message content must be a string")


def thinking_on(chat_format: dict, enable_thinking: bool | None) -> bool:
    thinking = chat_format.get("thinking")
    if thinking is None:
        return False
    return thinking["default"] if enable_thinking is None else bool(enable_thinking)


def generation_prompt(chat_format: dict, enable_thinking: bool | None = None) -> str:
    thinking = chat_format.get("thinking")
    if thinking is None:
        return chat_format["generation_prompt"]
    return thinking["on"] if thinking_on(chat_format, enable_thinking) else thinking["off"]


def render_head(chat_format: dict, system: str | None) -> str:
    """What comes before the first user message: the system block, or the preamble."""
    if system is None:
        return chat_format["preamble"]
    spec = chat_format["system"]
    return spec["prefix"] + _content(spec, system, False) + spec["suffix"]


def render_user(chat_format: dict, text: str) -> str:
    spec = chat_format["user"]
    return spec["prefix"] + _content(spec, text, False) + spec["suffix"]


def render_assistant(chat_format: dict, text: str) -> str:
    """An earlier reply as the template renders it in the history."""
    spec = chat_format["assistant"]
    return spec["prefix"] + _content(spec, text, True) + spec["suffix"]


def render(
    chat_format: dict, messages: Sequence[dict], add_generation_prompt: bool = True, enable_thinking: bool | None = None
) -> str:
    """The conversation as the checkpoint's template renders it (see the module doc for the domain)."""
    check_messages(chat_format, messages)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    parts = [render_head(chat_format, system)]
    for message in messages[1:] if system is not None else messages:
        render_turn = render_user if message["role"] == "user" else render_assistant
        parts.append(render_turn(chat_format, message["content"]))
    if add_generation_prompt:
        parts.append(generation_prompt(chat_format, enable_thinking))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Deriving a chat format from a template, and checking it
# ---------------------------------------------------------------------------------------------


class NotExpressible(Exception):
    """The template cannot be expressed as a chat format; the message says where it differs."""


_M = {"sys": "QMsysMARK", "u1": "QMuserONE", "a1": "QMasstONE", "u2": "QMuserTWO", "r1": "QMreasonONE"}


def _once(text: str, marker: str, what: str) -> int:
    if text.count(marker) != 1:
        raise NotExpressible(f"{what}: the content appears {text.count(marker)} times in the rendering, not once")
    return text.index(marker)


def _cut(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise NotExpressible(f"{what}: the rendering does not start with the earlier turns' rendering")
    return text[len(prefix):]


def explain(chat_template: str | None, tokenizer_config: dict | None = None) -> tuple[dict | None, str]:
    """(chat_format, "ok") or (None, why it cannot be expressed)."""
    if not chat_template:
        return None, "no chat template"
    try:
        chat_format = _derive(chat_template, tokenizer_config)
        _verify(chat_format, chat_template, tokenizer_config)
    except NotExpressible as reason:
        return None, str(reason)
    except Exception as error:  # the template itself raised (raise_exception, an undefined name, ...)
        return None, f"the template failed on a plain conversation: {type(error).__name__}: {error}"
    return chat_format, "ok"


def derive(chat_template: str | None, tokenizer_config: dict | None = None) -> dict | None:
    """The manifest's `chat_format` for this template, or None (the reason is logged; `explain`
    returns it) when the template cannot be expressed this way."""
    chat_format, reason = explain(chat_template, tokenizer_config)
    if chat_format is None:
        log.warning("chat_format: %s", reason)
    return chat_format


def _derive(template: str, config: dict | None) -> dict:
    def R(messages, gen=False, thinking=_UNSET):  # noqa: N802
        return template_render(template, messages, add_generation_prompt=gen, enable_thinking=thinking,
                               tokenizer_config=config)

    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assistant = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    m = _M

    # one user message: what precedes it (preamble + user prefix), the user suffix
    one = R([user(m["u1"])])
    at = _once(one, m["u1"], "a user message")
    head, user_suffix = one[:at], one[at + len(m["u1"]):]

    # user, assistant, user: the assistant's history form, and the user prefix of a later turn
    three = _cut(R([user(m["u1"]), assistant(m["a1"]), user(m["u2"])]), one, "a second user turn")
    at = _once(three, m["a1"], "an assistant reply")
    assistant_prefix, after = three[:at], three[at + len(m["a1"]):]
    at = _once(after, m["u2"], "a second user message")
    between, tail = after[:at], after[at + len(m["u2"]):]
    if tail != user_suffix:
        raise NotExpressible("a second user message ends differently from the first")
    # the assistant suffix: where the conversation ends with the reply, nothing follows it
    two = _cut(R([user(m["u1"]), assistant(m["a1"])]), one, "a reply after the first turn")
    assistant_suffix = two[_once(two, m["a1"], "a final reply") + len(m["a1"]):]
    if not between.startswith(assistant_suffix):
        raise NotExpressible("the text after a reply differs when another user turn follows")
    user_prefix = between[len(assistant_suffix):]
    if not head.endswith(user_prefix):
        raise NotExpressible("the first user turn starts differently from later ones")
    preamble = head[: len(head) - len(user_prefix)]

    # the system message, when the template renders one
    system = None
    try:
        with_system = R([{"role": "system", "content": m["sys"]}, user(m["u1"])])
    except Exception:  # templates that refuse a system message
        with_system = ""
    if m["sys"] in with_system:
        at = _once(with_system, m["sys"], "a system message")
        rest = with_system[at + len(m["sys"]):]
        first_turn = user_prefix + m["u1"] + user_suffix
        if not rest.endswith(first_turn):
            raise NotExpressible("the system message changes how the first user turn is rendered")
        system = {"prefix": with_system[:at], "suffix": rest[: len(rest) - len(first_turn)], "trim": False}

    # the generation prompt, and its thinking forms when the template takes enable_thinking
    prompts = {}
    for mode in (_UNSET, True, False):
        rendered = R([user(m["u1"])], gen=True, thinking=mode)
        prompts[mode] = _cut(rendered, one, "the generation prompt")
    thinking = None
    if prompts[True] != prompts[False]:
        if prompts[_UNSET] not in (prompts[True], prompts[False]):
            raise NotExpressible("the generation prompt without enable_thinking is neither the on nor the off form")
        thinking = {"default": prompts[_UNSET] == prompts[True], "on": prompts[True], "off": prompts[False],
                    "open": THINK_OPEN, "close": THINK_CLOSE}

    chat_format = {
        "version": FORMAT_VERSION,
        "system": system,
        "user": {"prefix": user_prefix, "suffix": user_suffix, "trim": False},
        "assistant": {"prefix": assistant_prefix, "suffix": assistant_suffix, "trim": False, "strip_thinking": None},
        "preamble": preamble,
        "generation_prompt": prompts[_UNSET],
        "thinking": thinking,
    }

    # content transforms: does the template trim content, drop an earlier reply's thinking?
    padded = " \n{}\t \n"
    if R([user(padded.format(m["u1"]))]) == head + m["u1"] + user_suffix:
        chat_format["user"]["trim"] = True
    if system is not None:
        rendered = R([{"role": "system", "content": padded.format(m["sys"])}, user(m["u1"])])
        if rendered == system["prefix"] + m["sys"] + system["suffix"] + user_prefix + m["u1"] + user_suffix:
            system["trim"] = True
    history = lambda reply: R([user(m["u1"]), assistant(reply), user(m["u2"])])  # noqa: E731
    before = one + assistant_prefix
    if history(padded.format(m["a1"])).startswith(before + m["a1"] + assistant_suffix):
        chat_format["assistant"]["trim"] = True
    if THINK_CLOSE in template:
        reply = f"{m['r1']}\n{THINK_CLOSE}\n\n{m['a1']}"
        if m["r1"] not in history(reply):
            chat_format["assistant"]["strip_thinking"] = {"close": THINK_CLOSE, "lstrip": "\n"}
    return chat_format


def check_conversations() -> list[tuple[list[dict], bool | None]]:
    """The conversations `derive` renders both ways before it trusts a format: with and without
    a system message, 1 to 4 turns, thinking default/on/off, content with newlines, unicode,
    padding and earlier replies' thinking."""
    users = ["Hi", "Tell me a joke.\nMake it short.", "  spaced  \n", "你好，世界 🌍", "tabs\tand\r\nCRLF",
             "<b>markup</b> & {braces} {{ jinja }}", "ends with newline\n\n", "x"]
    replies = ["Hello! How can I help?", "Why did the chicken cross the road?\n\nTo get to the other side.",
               "plan: reply\n</think>\n\nThe answer is 4.", "  padded reply \n", "<think>\nreasoning\n</think>\n\nDone",
               "Ünïcödé — “quotes” ✓", "\n</think>\n\n  after an empty thought", "multi\n\nparagraph\n"]
    systems = [None, "You are a helpful assistant.", "  Be brief.\nAnswer in French. \n"]
    cases = []
    for turns in range(1, 5):
        for s, system in enumerate(systems):
            for thinking in (None, True, False):
                messages = [] if system is None else [{"role": "system", "content": system}]
                for t in range(turns):
                    messages.append({"role": "user", "content": users[(t + s + turns) % len(users)]})
                    if t < turns - 1:
                        messages.append({"role": "assistant", "content": replies[(t + 2 * s + turns) % len(replies)]})
                cases.append((messages, thinking))
    return cases


def _verify(chat_format: dict, template: str, config: dict | None) -> None:
    for messages, thinking in check_conversations():
        if messages[0]["role"] == "system" and chat_format["system"] is None:
            continue
        for gen in (True, False):
            if not gen and thinking is not None:
                continue
            expected = template_render(template, messages, add_generation_prompt=gen, enable_thinking=thinking,
                                       tokenizer_config=config)
            got = render(chat_format, messages, add_generation_prompt=gen, enable_thinking=thinking)
            if got != expected:
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                raise NotExpressible(
                    f"a {len(messages)}-message conversation (enable_thinking={thinking}, add_generation_prompt={gen}) "
                    f"renders differently at character {at}: template {expected[at:at + 40]!r}, "
                    f"derived {got[at:at + 40]!r}"
                )


# ---------------------------------------------------------------------------------------------
# Generation defaults
# ---------------------------------------------------------------------------------------------

# Qwen3.5's model card recommendations (instruct / non-thinking, general; thinking), with the
# presence penalty kept on in thinking mode too: small Qwen3.5 models loop, worst when thinking.
CARD_DEFAULTS = {
    "non_thinking": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0,
                     "presence_penalty": 1.5, "frequency_penalty": 0.0, "repetition_penalty": 1.0},
    "thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                 "presence_penalty": 1.5, "frequency_penalty": 0.0, "repetition_penalty": 1.0},
}
CARD_SOURCE = "Qwen3.5 model card recommendation"
SAMPLING_KEYS = tuple(CARD_DEFAULTS["non_thinking"])
DEFAULT_MAX_NEW_TOKENS = 1024
LOOP_GUARD_DEFAULTS = {"max_period": 64, "min_span": 64, "min_repeats": 4}


def generation_defaults(checkpoint_dir: Path, chat_format: dict | None | object = _UNSET) -> dict:
    """The manifest's `generation`: sampling per mode, the reply length, the loop guard.

    `chat_format` is the checkpoint's (derived here when not given). Modes: "non_thinking" always; "thinking" too when the chat template takes enable_thinking.
    `default_mode` is the one the template uses when enable_thinking is not given. The
    checkpoint's generation_config.json describes that default mode: its values (temperature,
    top_p, top_k, min_p, repetition_penalty, and presence/frequency penalties where present)
    replace the model card's for it; `do_sample: false` means greedy with no penalty but the
    file's repetition_penalty. A file that names sampling values without do_sample is taken to
    mean them (transformers itself would default do_sample to false). Everything else, and
    the other mode, falls back to CARD_DEFAULTS (source says which applied).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if chat_format is _UNSET:  # not derived by the caller already
        tokenizer_config = _read_json(checkpoint_dir / "tokenizer_config.json") or {}
        chat_format = derive(tokenizer_config.get("chat_template"), tokenizer_config)
    has_thinking = bool(chat_format and chat_format.get("thinking"))
    default_mode = "thinking" if has_thinking and chat_format["thinking"]["default"] else "non_thinking"
    modes = {name: {**CARD_DEFAULTS[name], "source": CARD_SOURCE}
             for name in (("non_thinking", "thinking") if has_thinking else ("non_thinking",))}

    config = _read_json(checkpoint_dir / "generation_config.json") or {}
    named = {key: config[key] for key in SAMPLING_KEYS if isinstance(config.get(key), (int, float))}
    if config.get("do_sample") is False:
        modes[default_mode] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
                               "frequency_penalty": 0.0,
                               "repetition_penalty": float(named.get("repetition_penalty", 1.0)),
                               "source": "generation_config.json (do_sample false: greedy)"}
    elif named:
        modes[default_mode] = {**modes[default_mode], **{k: float(v) if k != "top_k" else int(v)
                                                         for k, v in named.items()},
                               "source": "generation_config.json, model card for the rest"}
    max_new = config.get("max_new_tokens")
    return {
        "default_mode": default_mode,
        "modes": modes,
        "max_new_tokens": int(max_new) if isinstance(max_new, int) and max_new > 0 else DEFAULT_MAX_NEW_TOKENS,
        "loop_guard": dict(LOOP_GUARD_DEFAULTS),
    }


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------
# Sampling, exactly as the apps do it
# ---------------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1


class SplitMix64:
    """The apps' random stream: SplitMix64, doubles from the top 53 bits."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next_long(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def next_double(self) -> float:
        return (self.next_long() >> 11) * 2.0**-53


@dataclass
class Sampling:
    """temperature 0 is greedy. Penalties apply to the tokens of the current reply (vLLM's
    presence/frequency semantics; repetition_penalty likewise, over the reply only)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_manifest(cls, mode: dict) -> "Sampling":
        return cls(**{key: mode[key] for key in SAMPLING_KEYS if key in mode})


def sample(logits, counts: dict[int, int], params: Sampling, rng: SplitMix64) -> int:
    """One token. Order: penalties, greedy (lowest index on ties) or temperature, top-k over
    (logit desc, index asc), softmax weights exp(z - max), top-p (keep while the mass before a
    token is below top_p), min-p (weight >= min_p * the top weight), then a draw."""
    x = np.array(logits, dtype=np.float64).reshape(-1)
    penalised = params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    if penalised:
        for token, count in counts.items():
            v = float(x[token])
            if params.repetition_penalty != 1.0:
                v = v / params.repetition_penalty if v > 0 else v * params.repetition_penalty
            v = v - params.presence_penalty
            v = v - params.frequency_penalty * count
            x[token] = v
    if params.temperature <= 0:
        return int(np.argmax(x))
    z = x / params.temperature
    order = np.lexsort((np.arange(len(z)), -z))
    if 0 < params.top_k < len(order):
        order = order[: params.top_k]
    values = [float(z[i]) for i in order]
    top = values[0]
    if top == -math.inf:
        return int(order[0])
    weights = [math.exp(v - top) for v in values]
    keep = len(weights)
    if params.top_p < 1.0:
        total = 0.0
        for w in weights:
            total += w
        limit = params.top_p * total
        acc, keep = 0.0, 0
        for i, w in enumerate(weights):
            if i > 0 and acc >= limit:
                break
            acc += w
            keep = i + 1
    if params.min_p > 0.0:
        threshold = params.min_p * weights[0]
        keep = next((i for i in range(1, keep) if weights[i] < threshold), keep)
    total = 0.0
    for w in weights[:keep]:
        total += w
    u = rng.next_double() * total
    acc = 0.0
    for i in range(keep):
        acc += weights[i]
        if u < acc:
            return int(order[i])
    return int(order[keep - 1])


@dataclass
class LoopGuard:
    """A reply loops when its last tokens repeat with some period p (1..max_period): the
    last max(min_span, (min_repeats - 1) * p) tokens each equal the token p before them."""

    max_period: int = LOOP_GUARD_DEFAULTS["max_period"]
    min_span: int = LOOP_GUARD_DEFAULTS["min_span"]
    min_repeats: int = LOOP_GUARD_DEFAULTS["min_repeats"]

    def looping(self, tokens: Sequence[int]) -> bool:
        n = len(tokens)
        for period in range(1, self.max_period + 1):
            need = max(self.min_span, (self.min_repeats - 1) * period)
            if need + period > n:
                break  # `need + period` only grows with the period
            if all(tokens[n - 1 - j] == tokens[n - 1 - j - period] for j in range(need)):
                return True
        return False


# ---------------------------------------------------------------------------------------------
# The multi-turn driver
# ---------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A bundle's tokenizer.json through the `tokenizers` library: no special tokens added on
    encode (the chat format spells them out), none skipped on decode."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.tokenizer = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


STOP, LENGTH, CONTEXT, LOOP, CANCELLED = "stop", "length", "context", "loop", "cancelled"


@dataclass
class Reply:
    tokens: list[int]  # the reply's tokens, without the stop token
    text: str
    finish: str  # stop | length | context | loop | cancelled
    prompt_tokens: int  # tokens this turn prefilled
    rebuilt: bool = False  # the context was re-rendered from position 0 for this turn


@dataclass
class Engine:
    """What the driver needs: step(tokens, start) -> last position's logits; optional state copies."""

    step: Callable
    max_context: int
    max_chunk: int
    snapshot: Callable | None = None  # () -> opaque copy of the state
    restore: Callable | None = None  # (copy) -> None

    @classmethod
    def from_runner(cls, runner) -> "Engine":
        return cls(runner.step, runner.max_context, runner.max_chunk)


@dataclass
class Conversation:
    """Multi-turn chat continuing from the engine's state (see the module doc)."""

    engine: Engine
    chat_format: dict
    tokenizer: Tokenizer
    stop_ids: Sequence[int]
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    system: str | None = None
    enable_thinking: bool | None = None
    max_new_tokens: int = 256
    loop_guard: LoopGuard | None = field(default_factory=LoopGuard)
    max_context: int | None = None  # at most the engine's; smaller to test the rebuild

    def __post_init__(self):
        self.rng = SplitMix64(self.seed)
        self.messages: list[dict] = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.first_kept = len(self.messages)  # messages before this index are no longer in the context
        self.fed: list[int] = []  # every token the engine holds, position = index
        self.pending: int | None = None  # sampled last, not yet fed
        self.last_finish: str | None = None
        self.turn: dict | None = None  # the last turn: prefix length, logits and state copy after its prefill
        limit = self.engine.max_context
        self.context = min(self.max_context or limit, limit)

    # -- turns ----------------------------------------------------------------------------------

    def say(self, text: str, on_token: Callable[[int], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> Reply:
        """Prefill the new turn's own tokens (or rebuild when they do not fit), then reply."""
        ids, rebuilt = self._turn_tokens(text)
        self.messages.append({"role": "user", "content": text})
        if rebuilt:
            self.fed, self.pending = [], None
        if len(self.fed) + len(ids) > self.context:
            raise ValueError(f"the message is {len(ids)} tokens; the context holds {self.context}")
        logits = self._prefill(ids, len(self.fed))
        self.fed.extend(ids)
        state = self.engine.snapshot() if self.engine.snapshot else None
        self.turn = {"end": len(self.fed), "logits": logits, "state": state}
        reply = self._reply(logits, on_token, cancelled, prompt_tokens=len(ids))
        reply.rebuilt = rebuilt
        return reply

    def regenerate(self, on_token: Callable[[int], None] | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Reply:
        """The last reply again (the random stream goes on, so a sampled reply differs)."""
        if self.turn is None:
            raise ValueError("nothing to regenerate")
        self.messages.pop()  # the last reply
        del self.fed[self.turn["end"]:]
        if self.turn["state"] is not None:
            self.engine.restore(self.turn["state"])
            logits, prompt = self.turn["logits"], 0
        else:
            logits, prompt = self._prefill(self.fed, 0), len(self.fed)
        return self._reply(logits, on_token, cancelled, prompt_tokens=prompt)

    def _turn_tokens(self, text: str) -> tuple[list[int], bool]:
        """The new turn's tokens continuing the context, or the re-rendered window (rebuilt=True)."""
        fmt, thinking = self.chat_format, self.enable_thinking
        turn_text = render_user(fmt, text) + generation_prompt(fmt, thinking)
        if not self.fed:
            head = render_head(fmt, self.system)
            return self.tokenizer.encode(head + turn_text), False
        suffix = fmt["assistant"]["suffix"]
        closing: list[int] = []
        if self.pending is not None:
            pending_text = self.tokenizer.decode([self.pending])
            if self.last_finish != STOP:
                closing = [self.pending]  # shown to the user: it belongs to the reply
            elif suffix.startswith(pending_text):
                closing, suffix = [self.pending], suffix[len(pending_text):]
        ids = closing + self.tokenizer.encode(suffix + turn_text)
        if len(self.fed) + len(ids) + self._reserve() <= self.context:
            return ids, False
        return self._window(text), True

    def _reserve(self) -> int:
        return min(self.max_new_tokens, self.context // 4)

    def _window(self, text: str) -> list[int]:
        """The most recent messages that fit, rendered as the template renders them."""
        system = [] if self.system is None else [self.messages[0]]
        body = self.messages[self.first_kept:]
        while True:
            messages = system + body + [{"role": "user", "content": text}]
            ids = self.tokenizer.encode(render(self.chat_format, messages, True, self.enable_thinking))
            if len(ids) + self._reserve() <= self.context or not body:
                return ids
            body = body[2:]
            self.first_kept += 2

    def _prefill(self, ids: Sequence[int], start: int):
        logits = None
        for at in range(0, len(ids), self.engine.max_chunk):
            logits = self.engine.step(list(ids[at: at + self.engine.max_chunk]), start + at)
        return logits

    def _reply(self, logits, on_token, cancelled, prompt_tokens: int) -> Reply:
        tokens: list[int] = []
        counts: dict[int, int] = {}
        position = len(self.fed)
        finish = None
        while finish is None:
            token = sample(logits, counts, self.sampling, self.rng)
            self.pending = token
            if token in self.stop_ids:
                finish = STOP
                break
            tokens.append(token)
            counts[token] = counts.get(token, 0) + 1
            if on_token:
                on_token(token)
            if len(tokens) >= self.max_new_tokens:
                finish = LENGTH
            elif self.loop_guard and self.loop_guard.looping(tokens):
                finish = LOOP
            elif cancelled and cancelled():
                finish = CANCELLED
            elif position >= self.context:
                finish = CONTEXT
            else:
                logits = self.engine.step([token], position)
                self.fed.append(token)
                position += 1
                self.pending = None
        self.last_finish = finish
        text = self.tokenizer.decode(tokens)
        self.messages.append({"role": "assistant", "content": text})
        return Reply(tokens, text, finish, prompt_tokens)


def sampling_for(generation: dict, enable_thinking: bool | None, chat_format: dict | None) -> Sampling:
    """The manifest's sampling for the mode a conversation runs in."""
    modes = generation["modes"]
    if enable_thinking is None:
        name = generation["default_mode"]
    else:
        name = "thinking" if enable_thinking and "thinking" in modes else "non_thinking"
    if chat_format is not None and chat_format.get("thinking") is None:
        name = "non_thinking"
    return Sampling.from_manifest(modes[name])


def split_thinking(chat_format: dict, enable_thinking: bool | None, reply: str) -> tuple[str, str]:
    """(thinking, answer) of a reply as generated: in thinking mode the reply starts inside the
    think block, which ends at the close tag; otherwise all of it is the answer."""
    thinking = chat_format.get("thinking")
    if thinking is None or not thinking_on(chat_format, enable_thinking):
        return "", reply
    close = thinking["close"]
    if close not in reply:
        return reply, ""
    before, _, after = reply.partition(close)
    return before.strip("\n"), after.lstrip("\n")
