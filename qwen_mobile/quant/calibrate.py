"""Calibration sets: what a calibrated plan (GPTQ, mixed precision) is fitted on.

A calibration set is a JSONL file, one sample per line, either plain text

    {"text": "First Citizen:\\nBefore we proceed any further, hear me speak."}

or a conversation, rendered with the checkpoint's own chat template (so calibration sees the
tokens the phone will see):

    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]}

Roles are system, user and assistant; every text and content is a non-empty string. A line
may also carry "source" (a string: where the sample came from); any other key is an error,
as is a blank file. Blank lines are skipped. Errors are QwenMobileErrors of one line naming
the file and the line.

The sets the toolkit ships live in calibration/ (the package qwen_mobile.calibration; its
README gives each set's sources and licenses): general, chat, code, multilingual, and
default, which mixes the four. None shares a line with the held-out split the reports
evaluate on (tests/test_calibration.py checks it).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from qwen_mobile.errors import QwenMobileError, first_line

DEFAULT_SET = "default"
DEFAULT_MAX_SAMPLES = 128
DEFAULT_MAX_TOKENS = 512
ROLES = ("system", "user", "assistant")
SET_NAMES = ("default", "general", "chat", "code", "multilingual")


def calibration_dir() -> Path:
    """The folder holding the shipped sets: the package qwen_mobile.calibration (calibration/)."""
    return Path(str(files("qwen_mobile.calibration")))


def shipped_sets() -> dict[str, Path]:
    folder = calibration_dir()
    return {name: folder / f"{name}.jsonl" for name in SET_NAMES if (folder / f"{name}.jsonl").is_file()}


def resolve_set(name_or_path: str | Path) -> Path:
    """A shipped set's name, or a path to a JSONL file."""
    sets = shipped_sets()
    if str(name_or_path) in sets:
        return sets[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise QwenMobileError(
        f"--calibration {name_or_path}: neither a shipped set ({', '.join(sets)}) nor a file"
    )


def _check_string(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise QwenMobileError(f"{where}: {what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise QwenMobileError(f"{where}: {what} is empty")
    return value


def read_samples(path: str | Path) -> list[dict]:
    """Every sample of a JSONL calibration file, validated: {"text": str} or {"messages": [...]}."""
    return [sample for _, sample in _numbered_samples(Path(path))]


def _numbered_samples(path: Path) -> list[tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise QwenMobileError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise QwenMobileError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(sample, dict):
            raise QwenMobileError(f"{where}: expected an object with \"text\" or \"messages\"")
        kinds = [key for key in ("text", "messages") if key in sample]
        if len(kinds) != 1:
            raise QwenMobileError(
                f"{where}: expected exactly one of \"text\" or \"messages\", found {len(kinds)}"
            )
        extra = sorted(set(sample) - {"text", "messages", "source"})
        if extra:
            raise QwenMobileError(f"{where}: unknown key {extra[0]!r} (a sample has text or messages, and source)")
        if "source" in sample and not isinstance(sample["source"], str):
            raise QwenMobileError(f"{where}: source must be a string")
        if "text" in sample:
            _check_string(sample["text"], where, "text")
        else:
            messages = sample["messages"]
            if not isinstance(messages, list) or not messages:
                raise QwenMobileError(f"{where}: messages must be a non-empty list")
            for i, message in enumerate(messages):
                if not isinstance(message, dict) or set(message) != {"role", "content"}:
                    raise QwenMobileError(f"{where}: messages[{i}] must be an object with role and content only")
                role = _check_string(message["role"], where, f"messages[{i}].role")
                if role not in ROLES:
                    raise QwenMobileError(f"{where}: messages[{i}].role {role!r} is unknown ({', '.join(ROLES)})")
                _check_string(message["content"], where, f"messages[{i}].content")
        samples.append((number, sample))
    if not samples:
        raise QwenMobileError(f"{path}: no samples")
    return samples


def sample_text(sample: dict) -> str:
    """A sample's words, for comparisons (conversations: the contents, one after another)."""
    if "text" in sample:
        return sample["text"]
    return "\n".join(message["content"] for message in sample["messages"])


def tokenize_sample(sample: dict, tokenizer, where: str = "sample") -> list[int]:
    if "text" in sample:
        return list(tokenizer.encode(sample["text"], add_special_tokens=False))
    if not getattr(tokenizer, "chat_template", None):
        raise QwenMobileError(f"{where}: a conversation needs a chat template, and the tokenizer has none")
    try:
        ids = tokenizer.apply_chat_template(sample["messages"], tokenize=True, return_dict=False)
    except Exception as error:  # jinja raises its own types (a template may refuse an order of roles)
        reason = first_line(error)
        raise QwenMobileError(f"{where}: the chat template refused this conversation ({reason})") from None
    return [int(i) for i in ids]


def load_calibration(
    name_or_path: str | Path,
    tokenizer,
    max_samples: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[list[int]]:
    """The token ids of a calibration set's samples: the first `max_samples` samples (all when
    None), each cut to its first `max_tokens` tokens, conversations through the tokenizer's
    chat template. `tokenizer` is the checkpoint's (generate.load_tokenizer)."""
    if max_tokens < 2:
        raise QwenMobileError(f"max_tokens {max_tokens}: a calibration sample needs at least 2 tokens")
    path = resolve_set(name_or_path)
    samples = _numbered_samples(path)
    if max_samples is not None:
        samples = samples[:max_samples]
    return [tokenize_sample(sample, tokenizer, f"{path}:{number}")[:max_tokens] for number, sample in samples]


def calibration_summary(name_or_path: str | Path, samples: list[list[int]]) -> dict:
    """What a plan records about the text it was calibrated on."""
    return {"set": str(name_or_path), "samples": len(samples), "tokens": sum(len(s) for s in samples)}


METHODS = ("rtn", "gptq")


def calibrated_plan(
    model,
    scheme,
    method: str = "rtn",
    samples: list[list[int]] | None = None,
    keep_8bit: list[str] | str = (),
    size_budget: float | None = None,
    calibration: str | None = None,
    options=None,
    ranges: str | None = None,
):
    """The plan `qwen-mobile export` encodes: `method` rtn (plan.make_plan, unchanged) or gptq
    (quant/gptq.py), with `keep_8bit` weight names or "auto" at 8 bits per channel
    (quant/mixed.py; `size_budget` bounds auto, default +10% over the 4-bit bytes). `samples`
    are load_calibration's token ids, needed by gptq, auto and the static-activation schemes
    (a8w8, a16w8), whose ranges `ranges` chooses (quant/static.py); `calibration` names the set
    they came from, for the plan's record. Bad requests are one-line QwenMobileErrors naming the flag."""
    from qwen_mobile.quant.static import activation_ranges, check_ranges_flag

    ranges = check_ranges_flag(ranges, scheme)
    plan = _weight_plan(model, scheme, method, samples, keep_8bit, size_budget, calibration, options)
    if ranges is not None:
        plan.activation_ranges = activation_ranges(model, plan, samples or [], ranges)
        plan.calibration = {**(plan.calibration or {}), **calibration_summary(calibration or "given", samples),
                            "ranges": ranges}
    return plan


def _weight_plan(model, scheme, method, samples, keep_8bit, size_budget, calibration, options):
    """calibrated_plan's weights: rtn, gptq or mixed precision."""
    from qwen_mobile.quant.gptq import gptq_plan
    from qwen_mobile.quant.mixed import DEFAULT_SIZE_BUDGET, mixed_plan
    from qwen_mobile.quant.plan import make_plan

    if method not in METHODS:
        raise QwenMobileError(f"--method {method!r} is unknown; methods: {', '.join(METHODS)}")
    mixed = keep_8bit == "auto" or bool(keep_8bit)
    if scheme.is_float:
        if method != "rtn" or mixed:
            raise QwenMobileError(f"--method and --keep-8bit apply to quantized schemes, not to {scheme.name}")
        return make_plan(model, scheme)
    if size_budget is not None and keep_8bit != "auto":
        raise QwenMobileError("--size-budget bounds --keep-8bit auto; name auto or leave the budget out")
    budget = DEFAULT_SIZE_BUDGET if size_budget is None else size_budget
    if budget < 0:
        raise QwenMobileError(f"--size-budget {budget}: a fraction >= 0 (0.1 is +10% over the 4-bit size)")
    needs_samples = method == "gptq" or keep_8bit == "auto"
    if needs_samples and not samples:
        flag = "--method gptq" if method == "gptq" else "--keep-8bit auto"
        raise QwenMobileError(f"{flag} needs calibration text (--calibration); it got no samples")
    try:
        if mixed:
            plan = mixed_plan(model, scheme, samples or [], method, keep_8bit, budget, options)
        elif method == "gptq":
            plan = gptq_plan(model, scheme, samples, options=options)
        else:
            return make_plan(model, scheme)
    except ValueError as error:  # unknown weight names in keep_8bit, a Hessian that stays singular
        raise QwenMobileError(f"--keep-8bit / --method {method}: {error}") from None
    if samples and needs_samples:
        plan.calibration = {**(plan.calibration or {}), **calibration_summary(calibration or "given", samples)}
    return plan
