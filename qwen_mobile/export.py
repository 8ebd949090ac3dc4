"""`qwen-mobile export`: the one export flow every backend goes through.

validate the request (backend, scheme, lengths, tokenizer, output path) before any slow
work -> load -> (the gate's float reference, where the plan then releases the float weights)
-> plan -> the backend's check -> the parity gate's eager references -> stage -> the backend
lowers into the staging directory -> tokenizer -> manifest -> the parity gate through each of
the backend's runtimes -> publish atomically. A backend only lowers and runs
(qwen_mobile/registry.py: Backend); everything else happens here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_mobile import progress
from qwen_mobile.bundle import build_manifest, copy_tokenizer, read_tokenizer_config, write_manifest
from qwen_mobile.checkpoint import Checkpoint, LoadedModel, load_checkpoint, open_checkpoint, stop_token_ids
from qwen_mobile.config import Qwen35Config
from qwen_mobile.errors import LoweringFailed, QwenMobileError, first_line
from qwen_mobile.memory import return_freed_memory, widen_unplanned
from qwen_mobile.quant.plan import (PLAN_FILE, QuantPlan, make_plan, release_planned_weights, resolve_scheme,
                                    save_plan)
from qwen_mobile.registry import Backend, BackendSpec, ExportTarget, Lengths, get_backend
from qwen_mobile.staging import check_target, staged_directory

UNGATED = {"skipped": True, "passed": False,
           "note": "written with --no-gate: never checked; `qwen-mobile verify` runs the gate on it"}


def default_out(checkpoint: Checkpoint, backend: str, quant: str) -> Path:
    """MODEL-BACKEND-QUANT in the current directory, MODEL being the checkpoint directory's own
    name (a hub id's repository name; the embedded model's name)."""
    source = checkpoint.source
    name = Path(source).name if Path(source).is_absolute() else source.split("@")[0].rsplit("/", 1)[-1]
    return Path(f"{name}-{backend}-{quant}")


def resolve_lengths(defaults: Lengths, config: Qwen35Config, max_context: int | None) -> Lengths:
    """The backend's default lengths, or --max-context, within what the model's positions allow."""
    if max_context is None:
        context = min(defaults.max_context, config.max_position_embeddings)
    elif max_context < 2:
        raise QwenMobileError(f"--max-context {max_context}: must be at least 2")
    elif max_context > config.max_position_embeddings:
        raise QwenMobileError(
            f"--max-context {max_context}: the model's positions end at max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    else:
        context = max_context
    return Lengths(max_context=context, max_chunk=min(defaults.max_chunk, context))


def special_tokens(checkpoint: Checkpoint, bos_token: str | None) -> dict:
    """The manifest's special_tokens: the stop ids, and the id of the backend's BOS token if it uses one."""
    eos = list(stop_token_ids(checkpoint))
    if not eos:
        raise QwenMobileError(f"{checkpoint.path}: neither generation_config.json nor config.json names an eos_token_id")
    return {"bos": None if bos_token is None else token_id(checkpoint.path, bos_token), "eos": eos}


def conversation_fields(checkpoint: Checkpoint, tokenizer_config: dict) -> dict:
    """What an app needs to hold a conversation without a template engine: the chat template,
    the same as fixed strings (`chat_format`, checked against the template's own rendering; null
    with a notice when it cannot be expressed so), and generation defaults."""
    from qwen_mobile import chat_format

    template = tokenizer_config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise QwenMobileError(
            f"{checkpoint.path / 'tokenizer_config.json'}: field chat_template: expected a string, got "
            f"{type(template).__name__} (qwen-mobile reads a single template)"
        )
    derived, reason = chat_format.explain(template, tokenizer_config)
    if template and derived is None:
        progress.notice(f"chat_format left out of the manifest: {reason}; apps get the template only")
    return {
        "chat_template": template,
        "chat_format": derived,
        "generation": chat_format.generation_defaults(checkpoint.path, derived),
    }


def token_id(checkpoint_dir: Path, token: str) -> int:
    from tokenizers import Tokenizer

    path = checkpoint_dir / "tokenizer.json"
    try:
        found = Tokenizer.from_file(str(path)).token_to_id(token)
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise QwenMobileError(f"{path}: cannot be read by tokenizers ({str(error).splitlines()[0]})") from None
    if found is None:
        raise QwenMobileError(f"{path}: has no {token} token, which this backend's runner uses as BOS")
    return found


def export_bundle(
    model: str | None,
    backend: str,
    quant: str | None,
    out: Path | None,
    group_size: int | None = None,
    embeddings_8bit: bool = False,
    max_context: int | None = None,
    gate: bool = True,
    *,
    method: str = "rtn",
    calibration: str | None = None,
    keep_8bit: str | None = None,
    size_budget: float | None = None,
    ranges: str | None = None,
) -> Path:
    """Write a bundle for MODEL to `out` (default MODEL-BACKEND-QUANT) and return its path.
    With gate=False the bundle is written without its parity gate and its manifest says so.
    method, calibration, keep_8bit ("auto" or comma-separated weight names) and size_budget make a
    calibrated plan (quant.calibrate.calibrated_plan), which the bundle then carries as PLAN_FILE;
    so does a static-activation scheme (a8w8, a16w8), whose ranges (by `ranges`) are calibrated."""
    spec, quant = get_backend(backend, quant)
    scheme = resolve_scheme(quant, group_size, embeddings_8bit)
    checkpoint = open_checkpoint(model)
    target = prepare_target(checkpoint, spec.name, quant, max_context)
    calibration_request = CalibrationRequest.checked(scheme, method, calibration, keep_8bit, size_budget, ranges)
    out = check_target(out or default_out(checkpoint, target.spec.name, target.quant))

    # Where nothing after the plan reads the float matrices except the gate's eager passes, they
    # stay in the checkpoint's bf16 (memory.py): half the 2B model's 7.3 GiB. A calibrated plan
    # runs its own passes through the model, which loads in float32 as before.
    at_rest = (not scheme.is_float and not calibration_request.calibrated
               and not target.implementation.lowering_reads_planned_weights)
    with progress.step("loading the checkpoint"):
        loaded = load_checkpoint(checkpoint, matrices_at_rest=at_rest)
    float_logits = None
    if at_rest:
        # Then nothing after the plan reads a float weight it quantizes but the gate's float
        # reference: that runs first, and the plan releases each float weight as it makes its
        # integers, so the two are never held whole together (9B: 16.7 GiB of bf16 beside 8.3 of
        # integers). The backend's check of the plan comes after that reference.
        if gate:
            from qwen_mobile.parity import float_reference

            float_logits = float_reference(loaded.model, target.lengths, checkpoint.path)
        with progress.step(f"planning {target.quant} quantization, releasing each float weight as it goes"):
            plan = make_plan(loaded.model, scheme, release_float=True)
    else:
        with progress.step(f"planning {target.quant} quantization" + calibration_request.describe()):
            plan = calibration_request.plan(loaded.model, scheme, checkpoint.path)
    widen_unplanned(loaded.model, plan)  # what lowering reads besides the plan
    return_freed_memory()
    return write_bundle(target, loaded, plan, out, gate, carry_plan=calibration_request.calibrated,
                        release_float_weights=True, float_logits=float_logits)


@dataclass(frozen=True)
class BundleTarget:
    """One backend's side of an export, settled before any slow work."""

    spec: BackendSpec
    implementation: Backend
    quant: str
    lengths: Lengths
    special_tokens: dict
    conversation: dict  # export.conversation_fields


def prepare_target(checkpoint: Checkpoint, backend: str, quant: str | None, max_context: int | None) -> BundleTarget:
    """The backend and scheme checked, the tokenizer read, the lengths resolved: a one-line
    error for whatever the export would refuse, before the checkpoint loads."""
    spec, quant = get_backend(backend, quant)
    implementation = spec.load()
    tokenizer_config = read_tokenizer_config(checkpoint.path)
    return BundleTarget(
        spec, implementation, quant,
        resolve_lengths(implementation.default_lengths, checkpoint.config, max_context),
        special_tokens(checkpoint, implementation.bos_token),
        conversation_fields(checkpoint, tokenizer_config),
    )


def write_bundle(target: BundleTarget, loaded: LoadedModel, plan: QuantPlan, out: Path, gate: bool = True,
                 carry_plan: bool = False, release_float_weights: bool = False,
                 float_logits: torch.Tensor | None = None) -> Path:
    """Lower `plan` of the loaded model into the bundle `out` (already checked by check_target),
    gate it unless gate=False, and publish it. carry_plan: the bundle carries the plan as
    PLAN_FILE (a calibrated plan, which verify cannot rebuild from the manifest).

    release_float_weights: the caller has no further use for `loaded.model` (export_bundle, which
    makes one plan; report.py writes several plans of one model and leaves it whole), so the
    weights the plan quantizes (3 GB of the 0.8B model's 3.1 GB) are freed as soon as nothing
    needs them, and lowering and the runtime's load do not sit on top of them. The gate's eager
    references, which need them, are computed before lowering; they leave the plan's dequantized
    weights in place of the float ones (parity.references keep_float). A backend that lowers from
    the plan alone (Backend.lowering_reads_planned_weights) then lowers with them released; any
    other lowers from the float weights, released after it. The artifact and the gate's figures
    are the same either way. float_logits: the gate's float reference (parity.float_reference),
    made before the plan released the float weights."""
    implementation, lengths, checkpoint = target.implementation, target.lengths, loaded.checkpoint
    implementation.check(plan, lengths)
    release_before_lowering = release_float_weights and not implementation.lowering_reads_planned_weights
    refs = None
    if gate:
        from qwen_mobile.parity import references, require_parity

        refs = references(loaded.model, lengths, plan, tokenizer_dir=checkpoint.path,
                          keep_float=not release_before_lowering, float_logits=float_logits)
    if release_before_lowering:
        release_planned_weights(loaded.model, plan)
        return_freed_memory()
    with staged_directory(out) as staging:
        with progress.step(f"lowering for {target.spec.name}"):
            fields = lowered(implementation, ExportTarget(loaded.model, plan, lengths, target.special_tokens), staging)
        if release_float_weights and not release_before_lowering:  # else released already
            release_planned_weights(loaded.model, plan)
        return_freed_memory()  # the converter's graphs, before the gate loads the artifact beside them
        copy_tokenizer(checkpoint.path, staging)
        if carry_plan:
            save_plan(plan, staging / PLAN_FILE).chmod(0o644)  # verify checks the artifact against it, never refits it
        manifest = build_manifest(target.spec, implementation, checkpoint, plan, lengths, target.special_tokens,
                                  target.conversation, fields)
        if refs is not None:
            manifest["parity"] = require_parity(implementation, staging, manifest, refs, plan)
        else:
            manifest["parity"] = dict(UNGATED)
        write_manifest(manifest, staging, out)
    return out


def lowered(implementation, target: ExportTarget, staging: Path) -> dict:
    """The backend's lower(), its converter's failure as one line (the staging directory goes
    with it)."""
    try:
        return implementation.lower(target, staging)
    except QwenMobileError:
        raise
    except Exception as error:  # any converter's internal failure: coremltools, litert-torch, ExecuTorch
        kind, text = type(error).__name__, first_line(error)
        raise LoweringFailed(
            f"{implementation.spec.name} could not lower this model ({kind if text == kind else f'{kind}: {text}'}); "
            "nothing was written. QWEN_MOBILE_TRACEBACK=1 shows where it failed"
        ) from error


@dataclass(frozen=True)
class CalibrationRequest:
    """--method, --calibration, --keep-8bit, --size-budget and --ranges, checked before any slow work."""

    method: str
    calibration: str | None
    keep_8bit: str | list[str] | None
    size_budget: float | None
    ranges: str | None = None  # static-activation schemes: how their ranges are chosen (quant/static.py)

    @classmethod
    def checked(cls, scheme, method: str, calibration: str | None, keep_8bit: str | None,
                size_budget: float | None, ranges: str | None = None) -> "CalibrationRequest":
        from qwen_mobile.quant.calibrate import DEFAULT_SET, METHODS, read_samples, resolve_set
        from qwen_mobile.quant.static import check_ranges_flag

        if method not in METHODS:
            raise QwenMobileError(f"--method {method!r} is unknown; methods: {', '.join(METHODS)}")
        kept = None if keep_8bit is None else "auto" if keep_8bit == "auto" else [
            name.strip() for name in keep_8bit.split(",") if name.strip()]
        if (method != "rtn" or kept) and scheme.is_float:
            raise QwenMobileError(f"--method and --keep-8bit apply to quantized schemes, not to {scheme.name}")
        ranges = check_ranges_flag(ranges, scheme)
        needs_text = method == "gptq" or kept == "auto" or ranges is not None
        if calibration is not None and not needs_text:
            raise QwenMobileError("--calibration feeds --method gptq, --keep-8bit auto and the static-activation "
                                  "schemes (a8w8, a16w8); none is asked for")
        if needs_text:
            calibration = calibration or DEFAULT_SET
            read_samples(resolve_set(calibration))  # a malformed file fails here, naming file and line
        return cls(method, calibration, kept, size_budget, ranges)

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn" or bool(self.keep_8bit) or self.ranges is not None

    def describe(self) -> str:
        if not self.calibrated:
            return ""
        kept = "" if not self.keep_8bit else f", 8-bit: {self.keep_8bit if self.keep_8bit == 'auto' else len(self.keep_8bit)}"
        ranges = "" if self.ranges is None else f", {self.ranges} activation ranges"
        return f" ({self.method}{kept}{ranges}" + (f", calibration {self.calibration})" if self.calibration else ")")

    def plan(self, model, scheme, checkpoint_dir: Path):
        from qwen_mobile.generate import load_tokenizer
        from qwen_mobile.quant.calibrate import DEFAULT_MAX_SAMPLES, calibrated_plan, load_calibration

        samples = None
        if self.calibration is not None:
            samples = load_calibration(self.calibration, load_tokenizer(checkpoint_dir), DEFAULT_MAX_SAMPLES)
        return calibrated_plan(model, scheme, self.method, samples, self.keep_8bit or (), self.size_budget,
                               self.calibration, ranges=self.ranges)
