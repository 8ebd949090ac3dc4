"""`qwen-mobile report`: what quantization costs each artifact, measured against the float model.

Per artifact, through its own runtime (the backend's Runner, as the parity gate drives it):
perplexity on the evaluation text, mean KL of the next-token distributions against the float
model fed identically, top-1 agreement, size on disk, and a greedy transcript check (where the
artifact's greedy continuation of a fixed prompt first departs from the float model's).

Per plan (shared by every backend that encodes it), in eager with the plan (quant.eager): the
output SNR of every quantized tensor against float, and the drift of each linear-attention
layer's recurrent state and of the logits as the context grows. No runtime exposes its state
through the Runner interface, so drift is measured in eager for every artifact, and the report
says so.

build_report measures; report_render writes report.html, report.md, report.json and the plots.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen_mobile import progress
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.models.qwen3_5 import DeltaNetState, Qwen35
from qwen_mobile.quant.plan import QuantPlan

# tokens of evaluation text each artifact is fed, one call per token (every position's logits); the Core ML
# emulator takes about 0.1 s a call on the embedded model, so this is most of what measuring an artifact costs
EVAL_TOKENS = 256
# each window of the evaluation text is a fresh sequence from position 0, as evaluate.perplexity feeds
EVAL_WINDOW = 256
# context lengths at which recurrent-state drift is read (eager has no context limit)
DRIFT_LENGTHS = (64, 128, 256, 512, 1024, 2048)
# the drift KL at a length: the mean over this many positions ending there (one position is noisy)
DRIFT_KL_POSITIONS = 32
# tokens of evaluation text the per-tensor SNR is measured on
SNR_TOKENS = 256
# the greedy transcript check: short prompts in the shipped corpus's style, continued this far
TRANSCRIPT_PROMPTS = ("First Citizen:\n", "ROMEO:\nBut soft", "KING HENRY:\nNow")
TRANSCRIPT_TOKENS = 32
METHOD_NAMES = {"round_to_nearest_symmetric": "rtn", "gptq_symmetric": "gptq"}
DRIFT_MEASURED_IN = "eager with the plan (the runtimes do not expose their state to the report)"


@dataclass
class Artifact:
    """One combination asked for: a bundle to measure, or the backend's refusal."""

    backend: str
    quant: str
    method: str
    bundle: Path | None = None
    refusal: str | None = None
    plan: QuantPlan | None = None  # MODEL mode: the plan it was exported with (BUNDLE mode reads the bundle's)

    @property
    def name(self) -> str:
        return f"{self.backend} {self.quant} {self.method}"


@dataclass
class FloatModel:
    """The float model an artifact is measured against, and what it gave for text already fed to
    it: artifacts exported from one checkpoint share its figures."""

    model: Qwen35
    logits: dict[tuple, torch.Tensor] = field(default_factory=dict)  # by the windows fed
    transcripts: dict[tuple, list[int]] = field(default_factory=dict)  # by the prompt's ids

    def window_logits(self, fed: list[list[int]]) -> torch.Tensor:
        """Each window fed one token per call from position 0, as the artifact is."""
        from qwen_mobile.parity import reference_logits

        key = tuple(map(tuple, fed))
        if key not in self.logits:
            with progress.step("float model: the evaluation tokens in eager"):
                self.logits[key] = torch.cat([
                    reference_logits(self.model, torch.tensor([w]), [(p, p + 1) for p in range(len(w) - 1)], len(w))
                    for w in fed])
        return self.logits[key]

    def greedy(self, prompt: list[int]) -> list[int]:
        from qwen_mobile.generate import eager_runner

        if tuple(prompt) not in self.transcripts:
            self.transcripts[tuple(prompt)] = greedy(eager_runner(self.model, len(prompt) + TRANSCRIPT_TOKENS), prompt)
        return self.transcripts[tuple(prompt)]


def plan_name(plan: QuantPlan) -> str:
    method = METHOD_NAMES.get(plan.method, plan.method)
    kept = [n for n, w in plan.weights.items() if plan.scheme.weight_bits and w.bits > plan.scheme.weight_bits]
    return f"{plan.scheme.name} {method}" + (f" +{len(kept)} at 8-bit" if kept else "")


# --- the evaluation text


def read_eval_file(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise QwenMobileError(f"--eval {path}: cannot be read as UTF-8 text ({error.__class__.__name__})") from None
    if not text.strip():
        raise QwenMobileError(f"--eval {path}: is empty")
    return text


def eval_text(eval_file: Path | None) -> tuple[str, str]:
    """(text, what it is): --eval's file, or the held-out split of the shipped corpus."""
    from qwen_mobile.corpus import CORPUS_PATH, load_corpus, split_corpus

    if eval_file is None:
        return split_corpus(load_corpus())[1], f"the held-out split of {CORPUS_PATH.name}"
    return read_eval_file(eval_file), str(eval_file)


def encode(text: str, tokenizer_dir: Path, vocab_size: int, where: str) -> list[int]:
    from qwen_mobile.generate import load_tokenizer

    # verbose=False: a text longer than the model's positions is expected here (fed in windows)
    ids = load_tokenizer(tokenizer_dir).encode(text, add_special_tokens=False, verbose=False)
    if len(ids) < 2:
        raise QwenMobileError(f"--eval {where}: {len(ids)} tokens; the report needs at least 2")
    beyond = [token for token in ids if not 0 <= token < vocab_size]
    if beyond:
        raise QwenMobileError(f"{tokenizer_dir / 'tokenizer.json'}: gives token id {beyond[0]}, outside the model's "
                              f"vocab_size {vocab_size}")
    return ids


# --- per artifact, through its runtime


def windows(tokens: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of window + 1 tokens (the last token of each is only predicted)."""
    return [tokens[start : start + window + 1] for start in range(0, len(tokens) - 1, window)
            if len(tokens[start : start + window + 1]) >= 2]


def stepwise_logits(step: Callable, window_tokens: list[list[int]]) -> torch.Tensor:
    """Each window fed one token per call from position 0: the logits of every predicted position."""
    rows = []
    for tokens in window_tokens:
        rows.extend(step([token], position).reshape(-1).float() for position, token in enumerate(tokens[:-1]))
    return torch.stack(rows)


def targets(window_tokens: list[list[int]]) -> torch.Tensor:
    return torch.tensor([token for tokens in window_tokens for token in tokens[1:]])


def perplexity_of(logits: torch.Tensor, next_tokens: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits, next_tokens).item())


def first_departure(reference: list[int], tokens: list[int]) -> int | None:
    """The index of the first generated token that differs, or None when the two agree throughout."""
    return next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)


def greedy(runner, prompt: list[int]) -> list[int]:
    from qwen_mobile.generate import generate_tokens

    return list(generate_tokens(runner.step, prompt, max_new_tokens=TRANSCRIPT_TOKENS,
                                max_context=runner.max_context, max_chunk=runner.max_chunk))


def measure_artifact(bundle: Path, manifest: dict, spec, reference: FloatModel, tokens: list[int],
                     held_out: bool) -> dict:
    """The artifact in its backend's first runtime (what run, bench and the apps use), fed the
    evaluation text and the transcript prompts, against the float model fed identically.
    held_out: the text is the held-out split the export gate feeds, so the gate's own figures
    (manifest parity.versus_float) can be set beside the same positions' figures here."""
    from qwen_mobile.generate import load_tokenizer
    from qwen_mobile.parity import mean_kl, top1_agreement

    implementation = spec.load()
    runtime = implementation.runtimes[0]
    window = min(EVAL_WINDOW, manifest["max_context"] - 1)
    fed = windows(tokens, window)
    with progress.step(f"{spec.name}: loading the artifact ({runtime})"):
        runner = implementation.open(bundle, manifest, runtime)
    with progress.step(f"{spec.name}: {sum(len(w) - 1 for w in fed)} evaluation tokens through {runtime}"):
        logits = stepwise_logits(runner.step, fed)
    float_logits = reference.window_logits(fed)
    expected = targets(fed)
    tokenizer = load_tokenizer(bundle)
    transcripts = []
    with progress.step(f"greedy transcripts: {len(TRANSCRIPT_PROMPTS)} prompts, {TRANSCRIPT_TOKENS} tokens"):
        for prompt in TRANSCRIPT_PROMPTS:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            artifact_tokens = greedy(runner, ids)
            float_tokens = reference.greedy(ids)
            transcripts.append({"prompt": prompt, "first_departure": first_departure(float_tokens, artifact_tokens),
                                "tokens": len(float_tokens), "float": tokenizer.decode(float_tokens),
                                "artifact": tokenizer.decode(artifact_tokens)})
    artifact_files = [entry["bytes"] for name, entry in manifest["files"].items()
                      if name == manifest["artifact"] or name.startswith(manifest["artifact"] + "/")]
    versus_float = manifest["parity"].get("versus_float")
    gate = gate_positions(manifest["parity"], len(fed[0]) - 1) if versus_float and held_out else None
    return {
        "runtime": runtime,
        "perplexity": perplexity_of(logits, expected),
        "float_perplexity": perplexity_of(float_logits, expected),
        "mean_kl": mean_kl(float_logits, logits),
        "top1_agreement": top1_agreement(float_logits, logits),
        "eval_positions": len(expected),
        "window": window,
        "artifact_bytes": sum(artifact_files),
        "bundle_bytes": sum(entry["bytes"] for entry in manifest["files"].values()),
        "transcripts": transcripts,
        # where the bundle was gated: the gate's own figures, and this report's at the positions the gate
        # compared (the gate fed its first positions in prefill chunks, this report one token per call)
        "manifest_versus_float": versus_float,
        "at_gate_positions": None if gate is None else {
            "positions": len(gate), "mean_kl": mean_kl(float_logits[gate], logits[gate]),
            "top1_agreement": top1_agreement(float_logits[gate], logits[gate])},
    }


def gate_positions(parity: dict, measured: int) -> list[int] | None:
    """The positions whose logits the export gate compared (the last of each prefill chunk, then
    each decode step), if this report's first window measured them all."""
    ends = [sum(parity["prefill_chunks"][: i + 1]) for i in range(len(parity["prefill_chunks"]))]
    positions = [end - 1 for end in ends] + [ends[-1] + step for step in range(parity["decode_steps"])]
    return positions if positions[-1] < measured else None


# --- per plan, in eager


@torch.no_grad()
def tensor_snr(model: Qwen35, plan: QuantPlan, tokens: list[int]) -> dict[str, float]:
    """Output SNR in dB of each quantized tensor on its own: the float model's input to it, through
    its float weight and through the plan's (with the plan's activation quantization), so a
    tensor's figure is its own damage, not what upstream tensors passed on."""
    from qwen_mobile.quant.eager import dequantized
    from qwen_mobile.quant.plan import planned_modules

    modules = {name: module for name, module in planned_modules(model).items() if name in plan.weights}
    captured = {}

    def capture(name):
        def hook(module, inputs, output):
            captured[name] = (inputs[0], output)
        return hook

    handles = [module.register_forward_hook(capture(name)) for name, module in modules.items()]
    try:
        model(torch.tensor([tokens]), torch.tensor([0]), model.init_state(len(tokens)), all_positions=True)
    finally:
        for handle in handles:
            handle.remove()
    snr = {}
    with dequantized(model, plan):
        for name, module in modules.items():
            inputs, reference = captured[name]
            noise = (module(inputs) - reference).pow(2).sum().item()
            snr[name] = 10 * math.log10(reference.pow(2).sum().item() / noise) if noise > 0 else math.inf
    return snr


@torch.no_grad()
def drift(model: Qwen35, plan: QuantPlan, tokens: list[int], lengths: tuple[int, ...]) -> dict:
    """The float model and the plan in eager fed the same text in chunks; at each length, each
    linear-attention layer's recurrent state ||quantized - float|| / ||float||, and the mean KL
    of the next-token distributions over the DRIFT_KL_POSITIONS positions ending there."""
    from qwen_mobile.parity import mean_kl
    from qwen_mobile.quant.eager import dequantized

    chunk = math.gcd(*lengths)
    longest = lengths[-1]
    ids = torch.tensor([tokens[:longest]])

    def run() -> tuple[list[torch.Tensor], dict[int, list[torch.Tensor]]]:
        state, logits, states = model.init_state(longest), [], {}
        for start in range(0, longest, chunk):
            out, state = model(ids[:, start : start + chunk], torch.tensor([start]), state, all_positions=True)
            logits.append(out[0])
            if start + chunk in lengths:
                states[start + chunk] = [s.recurrent.clone() for s in state if isinstance(s, DeltaNetState)]
        return torch.cat(logits), states

    float_logits, float_states = run()
    with dequantized(model, plan):
        plan_logits, plan_states = run()
    layers = [i for i, layer in enumerate(model.layers) if layer.is_linear]
    return {
        "measured_in": DRIFT_MEASURED_IN,
        "lengths": list(lengths),
        "kl_positions": DRIFT_KL_POSITIONS,
        "mean_kl": [mean_kl(float_logits[n - DRIFT_KL_POSITIONS : n], plan_logits[n - DRIFT_KL_POSITIONS : n])
                    for n in lengths],
        "state_relative_error": {
            f"layer{layer}": [((plan_states[n][k] - float_states[n][k]).norm() / float_states[n][k].norm()).item()
                              for n in lengths]
            for k, layer in enumerate(layers)
        },
    }


def measure_plan(model: Qwen35, plan: QuantPlan, tokens: list[int], drift_lengths: tuple[int, ...],
                 snr_tokens: int) -> dict:
    scheme = plan.scheme
    entry = {"scheme": scheme.name, "method": plan.method,
             "kept_8bit": sorted(n for n, w in plan.weights.items() if scheme.weight_bits and w.bits > scheme.weight_bits),
             "tensors": [], "drift": None}
    if not plan.weights:
        return entry
    with progress.step(f"{plan_name(plan)}: output SNR of {len(plan.weights)} quantized tensors"):
        snr = tensor_snr(model, plan, tokens[:snr_tokens])
    entry["tensors"] = [{"name": name, "bits": plan.weights[name].bits, "group_size": plan.weights[name].group_size,
                         "snr_db": figure} for name, figure in snr.items()]
    lengths = tuple(n for n in drift_lengths if n <= len(tokens))
    if lengths:
        with progress.step(f"{plan_name(plan)}: drift over {lengths[-1]} tokens in eager"):
            entry["drift"] = drift(model, plan, tokens, lengths)
        entry["drift"]["left_out"] = [n for n in drift_lengths if n > len(tokens)]
    return entry


# --- the whole report


@dataclass(frozen=True)
class ReportRequest:
    """What `qwen-mobile report` was asked, checked (names known, files readable) before any slow work."""

    model: str | None  # MODEL mode: the checkpoint to export from (None: the embedded model)
    backends: tuple[str, ...]
    quants: tuple[str, ...]
    methods: tuple[str, ...]
    calibration: str | None
    bundles: tuple[Path, ...]  # BUNDLE mode: existing bundles (then backends, quants and methods are empty)
    source: str | None  # BUNDLE mode: the checkpoint they were exported from (see bundle.load_source)
    eval_file: Path | None

    @classmethod
    def checked(cls, targets: list[str], out: Path, backends: str | None, quants: str | None, methods: str,
                calibration: str | None, source: str | None, eval_file: Path | None) -> ReportRequest:
        """targets: [MODEL] (or none: the embedded model) with --backend and --quant; BUNDLEs without them."""
        from qwen_mobile.quant.calibrate import DEFAULT_SET, METHODS, read_samples, resolve_set
        from qwen_mobile.quant.plan import scheme_table
        from qwen_mobile.registry import describe_available, discover
        from qwen_mobile.staging import check_target

        if out.exists() and not out.is_dir():
            raise QwenMobileError(f"--out {out}: exists and is not a directory")
        if eval_file is not None:
            read_eval_file(eval_file)
        exporting = backends is not None or quants is not None
        if not exporting:
            if not targets:
                raise QwenMobileError("--backend and --quant name what to export from MODEL; or give BUNDLE directories")
            for flag, value in (("--calibration", calibration), ("--method", None if methods == "rtn" else methods)):
                if value is not None:
                    raise QwenMobileError(f"{flag} applies when exporting from MODEL; bundles were given")
            for bundle in targets:
                if not Path(bundle).is_dir():
                    raise QwenMobileError(f"{bundle}: not a bundle directory")
            return cls(None, (), (), (), None, tuple(Path(b) for b in targets), source, eval_file)
        if len(targets) > 1:
            raise QwenMobileError(f"--backend / --quant export one MODEL; got {len(targets)}: {', '.join(targets)}")
        if source is not None:
            raise QwenMobileError("--source names the checkpoint of existing bundles; MODEL is exported from directly")
        if (out / "bundles").exists():
            check_target(out / "bundles")  # the report's exports go there: refuse to mix them with older ones

        def names(flag: str, value: str | None, known) -> tuple[str, ...]:
            if not value:
                raise QwenMobileError(f"{flag} is needed when exporting from MODEL (comma-separated)")
            listed = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
            unknown = [name for name in listed if name not in known]
            if unknown or not listed:
                raise QwenMobileError(f"{flag} {(unknown or [value])[0]!r} is unknown; {', '.join(known)}")
            return listed

        specs = discover()
        if not specs:
            raise QwenMobileError(f"--backend: {describe_available(specs)}")
        backend_names = names("--backend", backends, specs)
        quant_names = names("--quant", quants, scheme_table())
        method_names = names("--method", methods, METHODS)
        if calibration is not None and "gptq" not in method_names:
            raise QwenMobileError("--calibration feeds --method gptq, which is not asked for")
        if "gptq" in method_names:
            calibration = calibration or DEFAULT_SET
            read_samples(resolve_set(calibration))  # a malformed file fails here, naming file and line
        return cls(targets[0] if targets else None, backend_names, quant_names, method_names, calibration, (), None,
                   eval_file)


def export_artifacts(request: ReportRequest, work: Path, advanced: Callable[[], None]) -> tuple[list[Artifact], object]:
    """Every (backend, quant, method) asked for, exported without the gate into `work`, each plan
    made once and encoded by every backend that takes it; a combination the backend or the
    calibration refuses is kept with its reason. Returns the artifacts and the loaded model."""
    from qwen_mobile.checkpoint import load_checkpoint, open_checkpoint
    from qwen_mobile.export import CalibrationRequest, prepare_target, write_bundle
    from qwen_mobile.quant.plan import resolve_scheme
    from qwen_mobile.staging import check_target

    checkpoint = open_checkpoint(request.model)
    with progress.step("loading the checkpoint"):
        loaded = load_checkpoint(checkpoint)
    artifacts = []
    for quant in request.quants:
        scheme = resolve_scheme(quant)
        for method in request.methods:
            plan = None
            try:
                calibration = CalibrationRequest.checked(scheme, method, request.calibration if method == "gptq" else None,
                                                         None, None)
            except QwenMobileError as refusal:
                artifacts += [Artifact(b, quant, method, refusal=str(refusal)) for b in request.backends]
                for _ in request.backends:
                    advanced()
                continue
            for backend in request.backends:
                artifact = Artifact(backend, quant, method)
                try:
                    target = prepare_target(checkpoint, backend, quant, None)
                    if plan is None:
                        with progress.step(f"planning {quant}" + calibration.describe()):
                            plan = calibration.plan(loaded.model, scheme, checkpoint.path)
                    out = check_target(work / f"{backend}-{quant}-{method}")
                    artifact.bundle = write_bundle(target, loaded, plan, out, gate=False,
                                                   carry_plan=calibration.calibrated)
                    artifact.plan = plan
                except QwenMobileError as refusal:
                    artifact.refusal = str(refusal)
                artifacts.append(artifact)
                advanced()
    return artifacts, loaded


def build_report(
    request: ReportRequest,
    out: Path,
    *,
    eval_tokens: int = EVAL_TOKENS,
    drift_lengths: tuple[int, ...] = DRIFT_LENGTHS,
    snr_tokens: int = SNR_TOKENS,
    advanced: Callable[[int, int], None] | None = None,
) -> dict:
    """Export (MODEL mode) or open (BUNDLE mode) every artifact, measure it, and return the report
    (every figure; report_render writes it). Bundles exported here go under out/bundles/.
    `advanced(done, total)` hears of each unit of work as it ends: an export, an artifact measured."""
    from qwen_mobile.bundle import load_source, read_manifest

    started = time.perf_counter()
    exports = len(request.backends) * len(request.quants) * len(request.methods)
    total = exports + (exports or len(request.bundles))
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if advanced:
            advanced(done, total)

    text, text_source = eval_text(request.eval_file)
    if request.bundles:
        artifacts = []
        for bundle in request.bundles:
            manifest, _ = read_manifest(bundle)
            method = METHOD_NAMES.get(manifest["quant"].get("method"), manifest["quant"].get("method", "rtn"))
            artifacts.append(Artifact(manifest["backend"], manifest["quant"]["scheme"], method, bundle=Path(bundle)))
        source_model = None
    else:
        artifacts, source_model = export_artifacts(request, out / "bundles", advance)

    plans: dict[str, dict] = {}
    references: dict[int, FloatModel] = {}
    rows = []
    for artifact in artifacts:
        row = {"name": artifact.name, "backend": artifact.backend, "quant": artifact.quant, "method": artifact.method}
        if artifact.refusal is not None:
            rows.append({**row, "status": "refused", "reason": artifact.refusal})
            continue
        manifest, spec = read_manifest(artifact.bundle)
        if artifact.plan is None:
            loaded, plan = load_source(artifact.bundle, manifest, request.source)
        else:
            loaded, plan = source_model, artifact.plan
        tokens = encode(text, artifact.bundle, loaded.model.config.vocab_size, text_source)
        reference = references.setdefault(id(loaded.model), FloatModel(loaded.model))
        figures = measure_artifact(artifact.bundle, manifest, spec, reference, tokens[:eval_tokens],
                                   held_out=request.eval_file is None)
        name = plan_name(plan)
        if name not in plans:
            plans[name] = measure_plan(loaded.model, plan, tokens, drift_lengths, snr_tokens)
        rows.append({**row, "status": "measured", "bundle": str(artifact.bundle), "plan": name,
                     "source": manifest["source"]["checkpoint"], **figures})
        advance()
    return {
        "eval": {"text": text_source, "tokens": eval_tokens, "window": EVAL_WINDOW, "snr_tokens": snr_tokens},
        "artifacts": rows,
        "plans": plans,
        "drift_measured_in": DRIFT_MEASURED_IN,
        "transcript": {"prompts": list(TRANSCRIPT_PROMPTS), "tokens": TRANSCRIPT_TOKENS},
        "wall_seconds": time.perf_counter() - started,
    }

