"""The qwen-mobile command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.registry import DEFAULT_BACKEND, discover

out = Console()
err = Console(stderr=True, soft_wrap=True)


class Commands(TyperGroup):
    """Every command's bad input ends here: one line on stderr naming the file, field or flag,
    and exit 2 (a converter's failure on valid input: one line too, exit 1). A SIGTERM ends the
    command like Ctrl-C does, so an export removes its staging directory on the way out."""

    def invoke(self, ctx):
        signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().invoke(ctx)
        except QwenMobileError as error:
            if os.environ.get("QWEN_MOBILE_TRACEBACK") and error.__cause__ is not None:
                traceback.print_exception(error.__cause__)
            err.print(f"[bold red]error:[/] {error}", highlight=False)
            raise typer.Exit(error.exit_code) from None


def _terminated(signum, frame):
    raise KeyboardInterrupt


app = typer.Typer(
    cls=Commands,
    help="Export Qwen3.5 small models (0.8B-9B) to ExecuTorch, Core ML and TFLite/LiteRT, "
    "quantized and verified on this CPU. MODEL is a checkpoint directory in Hugging Face "
    "layout, a hub id, or omitted for the embedded qwen3.5-tiny.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelArg = typer.Argument(None, help="Checkpoint directory or hub id \\[default: the embedded qwen3.5-tiny]")
# generation options shared by `generate` (eager model) and `run` (a bundle)
PromptOption = typer.Option(..., "--prompt", "-p", help="Text to continue (or the user turn, with --chat)")
MaxNewTokensOption = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Stop after this many tokens")
ChatOption = typer.Option(False, "--chat", help="Wrap the prompt in the chat template")
TemperatureOption = typer.Option(0.0, "--temperature", min=0.0, help="0 is greedy; above 0 samples")
TopPOption = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature)")
SeedOption = typer.Option(0, "--seed", help="Sampling seed")


# Loggers that report on the libraries' own internals at import: torchao's CUDA kernels that
# cannot load on a CPU machine, torch's pytree deprecations.
LIBRARY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_warnings():
    """The exporters' libraries warn about their own internals (deprecations, mutated
    buffers, CUDA kernels absent on CPU); none of it is actionable for a user of this command."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def showing_steps(title: str):
    """A status line naming the step that runs, and a line with each step's duration as it ends."""
    from qwen_mobile import progress

    with err.status(title) as status:
        def listen(step: str, seconds: float | None) -> None:
            if seconds is None:
                status.update(f"{title}: {step}")
            else:
                err.print(f"  {step} [dim]{seconds:.1f} s[/]", highlight=False)

        def notice(message: str) -> None:
            err.print(f"  [yellow]note:[/] {message}", highlight=False)

        with progress.reporting(listen, notice), quiet_warnings():
            yield


@app.command()
def info(model: Optional[str] = ModelArg, as_json: bool = typer.Option(False, "--json", help="Print JSON")):
    """Layers by type, parameter counts, state and KV-cache sizes, and what is skipped."""
    from qwen_mobile.checkpoint import open_checkpoint
    from qwen_mobile.info import describe

    summary = describe(open_checkpoint(model))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{summary['source']} ({summary['model_type']})", show_header=False)
    layers = summary["layers"]
    params = summary["parameters"]
    rows = [
        ("layers", f"{layers['total']}: {layers['linear_attention']} Gated DeltaNet, "
         f"{layers['full_attention']} gated full attention ({layers['pattern']})"),
        ("parameters", f"{params['total']:,} (embedding {params['embedding']:,}, "
         + ("lm_head tied" if summary["tied_embeddings"] else f"lm_head {params['lm_head']:,}") + ")"),
        ("  linear attention / full attention / mlp",
         f"{params['linear_attention']:,} / {params['full_attention']:,} / {params['mlp']:,}"),
        ("vocab / max positions", f"{summary['vocab_size']:,} / {summary['max_position_embeddings']:,}"),
        ("recurrent + conv state per sequence", f"{summary['recurrent_state_bytes_per_sequence']:,} bytes (fp32)"),
        ("KV cache per token of context",
         f"{summary['kv_cache_bytes_per_token']['fp32']:,} bytes fp32, {summary['kv_cache_bytes_per_token']['fp16']:,} fp16"),
        ("skipped", ", ".join(summary["skipped"]["parts"]) + f" ({summary['skipped']['tensors']} tensors)"
         if summary["skipped"]["parts"] else "nothing"),
        ("config hash", summary["config_hash"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


@app.command()
def generate(
    model: Optional[str] = ModelArg,
    prompt: str = PromptOption,
    max_new_tokens: int = MaxNewTokensOption,
    chat: bool = ChatOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    seed: int = SeedOption,
    max_context: int = typer.Option(2048, "--max-context", min=2, help="Context length (prompt + output)"),
):
    """Generate with the export-ready model on this CPU. Only the continuation goes to stdout."""
    from qwen_mobile.checkpoint import load, stop_token_ids
    from qwen_mobile.generate import GenerationStats, eager_runner, generate_text, load_tokenizer

    loaded = load(model)
    stats = GenerationStats()
    pieces = generate_text(
        eager_runner(loaded.model, max_context), load_tokenizer(loaded.checkpoint.path), prompt, chat=chat,
        stop_ids=stop_token_ids(loaded.checkpoint), stats=stats, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, context_flag="--max-context",
    )
    _print_stream(pieces, stats)


def _print_stream(pieces, stats) -> None:
    """The continuation on stdout as it is generated, then the runner's speed on stderr."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(stats.summary(), style="dim", highlight=False)


def _backend_help() -> str:
    specs = discover()
    return "Target runtime: " + "; ".join(f"{name} ({', '.join(spec.quant_schemes)})" for name, spec in specs.items())


def _quant_help() -> str:
    from qwen_mobile.quant.plan import scheme_table

    schemes = "; ".join(f"{name}: {entry['summary']}" for name, entry in scheme_table().items())
    return f"Quantization scheme \\[default: the backend's first, as listed under --backend]. {schemes}"


@app.command()
def export(
    model: Optional[str] = ModelArg,
    backend: str = typer.Option(DEFAULT_BACKEND, "--backend", "-b", help=_backend_help()),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help=_quant_help(), show_default=False),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Bundle directory to create \\[default: ./MODEL-BACKEND-QUANT]", show_default=False
    ),
    group_size: Optional[int] = typer.Option(
        None, "--group-size", help="Columns per scale for grouped schemes (int4, 8da4w): 32, 64 or 128 \\[default: 32]",
        show_default=False,
    ),
    embeddings_8bit: bool = typer.Option(
        False, "--embeddings-8bit", help="Keep the embedding and lm_head at 8 bit (per channel) under a 4-bit scheme"
    ),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", min=2, show_default=False,
        help="Longest sequence (prompt + output) the artifact holds; sizes the KV caches "
        "\\[default: executorch 2048, coreml and tflite 512, within the model's max_position_embeddings]",
    ),
    no_gate: bool = typer.Option(
        False, "--no-gate", help="Write the bundle without running the parity gate; its manifest says it was never "
        "checked (parity.skipped), and `qwen-mobile verify` runs the gate on it later",
    ),
    method: str = typer.Option(
        "rtn", "--method", help="How a quantized scheme's integers are chosen: rtn (round to nearest) or gptq "
        "(fitted on --calibration text; minutes at 0.8B)",
    ),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", show_default=False,
        help="Text for gptq, --keep-8bit auto and the static ranges of a8w8 / a16w8: a shipped set (default, general, "
        "chat, code, multilingual) or a JSONL file of {\"text\": ...} or {\"messages\": [...]} lines \\[default: default]",
    ),
    keep_8bit: Optional[str] = typer.Option(
        None, "--keep-8bit", show_default=False,
        help="Weights kept at 8 bits (per channel) under a 4-bit scheme: comma-separated names "
        "(layers.0.linear_attn.out_proj.weight, ...), or auto: the most sensitive on the calibration text within "
        "--size-budget",
    ),
    size_budget: Optional[float] = typer.Option(
        None, "--size-budget", show_default=False,
        help="With --keep-8bit auto: the extra bytes allowed over plain 4-bit, as a fraction \\[default: 0.1]",
    ),
    ranges: Optional[str] = typer.Option(
        None, "--ranges", show_default=False,
        help="How a8w8 / a16w8 choose each linear's static activation range from the calibration text: minmax, "
        "percentile (clips the 0.01% tails) or mse (the clipping with the least squared error) \\[default: a8w8 mse, "
        "a16w8 minmax]",
    ),
):
    """Write a bundle (artifact, tokenizer, manifest) that the demo apps run unchanged.

    The export checks the artifact as written through its own runtime (the parity gate, see
    docs/parity.md) and publishes the bundle only if it passes; nothing is left behind otherwise.
    Only the bundle's path goes to stdout; progress goes to stderr.

    Examples: `qwen-mobile export` (the embedded model, ExecuTorch fp32);
    `qwen-mobile export ./Qwen3.5-0.8B -b executorch -q 8da4w`; `qwen-mobile export ./Qwen3.5-0.8B -b coreml -q int4`;
    `qwen-mobile export ./Qwen3.5-0.8B -b tflite -q a16w8` (for NPUs: integer linears with static ranges from the
    default calibration set)."""
    from qwen_mobile.export import export_bundle

    with showing_steps(f"exporting to {backend}"):
        bundle = export_bundle(model, backend, quant, out_dir, group_size, embeddings_8bit, max_context, not no_gate,
                               method=method, calibration=calibration, keep_8bit=keep_8bit, size_budget=size_budget,
                               ranges=ranges)
    out.print(str(bundle), highlight=False, soft_wrap=True)


BundleArg = typer.Argument(..., help="A bundle directory written by `qwen-mobile export`")


@app.command()
def verify(
    bundle: Path = BundleArg,
    source: Optional[str] = typer.Option(
        None, "--source", show_default=False,
        help="The checkpoint the bundle was exported from (directory or hub id); checked against the manifest's "
        "config_hash. Needed for every source but the embedded model: verify reads nothing outside the bundle "
        "unless told to",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
):
    """Check every file of the bundle against its manifest, then re-run the parity gate on the artifact
    as written, through each of its runtimes. Exit 1 if the gate fails, 2 if the bundle is malformed."""
    from qwen_mobile.bundle import verify_bundle

    with showing_steps(f"verifying {bundle}"):
        result = verify_bundle(bundle, source)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        out.print(_gate_table(bundle, result))
    if not result["passed"]:
        raise typer.Exit(1)


def _gate_table(bundle: Path, result: dict) -> Table:
    """The gate's verdict per runtime and for the weights, with each figure beside its bar."""
    def bar(value, allowed, above: bool = False):
        if allowed is None:
            return f"{value:.4g}"
        return f"{value:.4g} ({'needs' if above else 'allowed'} {allowed:.4g})"

    table = Table(title=f"{bundle}: {'PASS' if result['passed'] else 'FAIL'} (vs the {result['reference']})")
    for column in ("runtime", "gate", "max|diff| / std", "relative diff", "mean KL", "KL, worst positions", "top-1",
                   "after reset"):
        table.add_column(column)
    for runtime, parity in result["runtimes"].items():
        table.add_row(runtime, "pass" if parity["passed"] else "FAIL", bar(parity["ratio_to_std"], parity["tolerance"]),
                      bar(parity["relative_diff"], parity["max_relative_diff"]),
                      bar(parity["mean_kl"], parity["max_mean_kl"]),
                      bar(parity["worst_positions_kl"], parity["max_worst_positions_kl"]),
                      bar(parity["top1_agreement"], parity["min_top1"], above=True),
                      bar(parity["reset_max_abs_diff"], parity["reset_allowed"]))
    weights = result["weights"]
    table.caption = (f"{result['positions_checked']} positions, {result['tokens_fed']} tokens fed; weights: "
                     + (f"{weights['checked']} looked up, {len(weights['differ'])} differ"
                        + (f" ({', '.join(weights['differ'][:3])})" if weights["differ"] else "")
                        if weights["checked"] else weights.get("note", "not checked"))
                     + ("" if not result.get("noise_floor") else
                        f"; noise floor {max(result['noise_floor']['relative_diffs']):.3g}")
                     + ("" if not result.get("versus_float") else
                        f"; vs float: mean KL {result['versus_float']['mean_kl']:.3g}, "
                        f"top-1 {result['versus_float']['top1_agreement']:.3f}"))
    return table


@app.command()
def run(
    bundle: Path = BundleArg,
    prompt: str = PromptOption,
    max_new_tokens: int = MaxNewTokensOption,
    chat: bool = ChatOption,
    temperature: float = TemperatureOption,
    top_p: float = TopPOption,
    seed: int = SeedOption,
):
    """Stream text from a bundle through its backend's runtime on this CPU. Only the continuation goes to stdout."""
    from qwen_mobile.bundle import open_runner
    from qwen_mobile.generate import GenerationStats, generate_text, load_tokenizer

    with quiet_warnings():
        runner, manifest = open_runner(bundle)
    if manifest["parity"].get("skipped"):
        err.print(f"[yellow]note:[/] {bundle} was written with --no-gate and never verified "
                  "(`qwen-mobile verify` checks it)", highlight=False)
    stats = GenerationStats()
    pieces = generate_text(
        runner, load_tokenizer(bundle), prompt, chat=chat, stop_ids=tuple(manifest["special_tokens"]["eos"]),
        stats=stats, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        context_flag=f"the bundle's max_context ({manifest['max_context']}; re-export with a larger --max-context)",
    )
    _print_stream(pieces, stats)


@app.command()
def fixture(
    shape: str = typer.Option(..., "--shape", help="Real Qwen3.5 shape: 0.8b, 2b, 4b or 9b"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to create"),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights"),
    peaked: bool = typer.Option(
        False, "--peaked", help="Sharpen attention and logits as training does (q/k norm gains 2, final norm 8), so "
        "gates at this shape can see a key in the wrong slot or a wrong rotary"),
):
    """A random-weight checkpoint at a real Qwen3.5 shape, for benchmarks and large-shape tests.

    Example: `qwen-mobile fixture --shape 0.8b --out /tmp/q08`"""
    from qwen_mobile.fixture import shape_config, write_fixture

    shape_config(shape)  # a bad --shape is reported before any progress bar appears
    with Progress(*Progress.get_default_columns()[:-1], DownloadColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task(f"qwen3.5 {shape} fixture", total=None)
        path = write_fixture(shape, out_dir, seed, lambda done, total: bar.update(task, completed=done, total=total),
                             peaked)
    out.print(str(path), highlight=False, soft_wrap=True)


@app.command()
def bench(
    bundle: Path = BundleArg,
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
    runs: int = typer.Option(5, "--runs", min=1, help="Timed runs per figure (after one warm-up); medians are reported"),
):
    """Prefill and decode tokens/s, time to first token, peak memory and artifact size, through the
    backend's CPU runtime (ExecuTorch, LiteRT). Takes bundles written with --no-gate too. Core ML
    bundles are refused off macOS (the emulator is not a performance runtime)."""
    from qwen_mobile.bench import bench_bundle

    with err.status(f"benchmarking {bundle}"), quiet_warnings():
        result = bench_bundle(bundle, runs)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    threads = ", ".join(f"{name} {count}" for name, count in result["threads"].items() if count is not None)
    table = Table(title=f"{bundle}: {result['backend']} {result['quant']} "
                  f"(median of {result['runs']} after a warm-up; threads: {threads}; "
                  f"{result['busy_cores']:.1f} cores busy)", show_header=False)

    def rate(figure: dict) -> str:
        return figure["skipped"] if "skipped" in figure else f"{figure['tokens_per_s']:.1f} tokens/s"

    for length, figure in result["prefill"].items():
        table.add_row(f"prefill {length} tokens", rate(figure))
    for context, figure in result["decode"].items():
        table.add_row(f"decode at context {context}", rate(figure))
    table.add_row("time to first token (128-token prompt)",
                  "n/a" if result["ttft_ms"] is None else f"{result['ttft_ms']:.0f} ms")
    table.add_row("load", f"{result['load_s']:.2f} s")
    table.add_row("peak resident memory", f"{result['peak_rss_bytes'] / 2**20:,.0f} MiB "
                  f"({result['rss_before_load_bytes'] / 2**20:,.0f} MiB before loading)")
    table.add_row(f"artifact ({result['artifact']})", f"{result['artifact_bytes'] / 2**20:,.1f} MiB")
    out.print(table)


@app.command()
def package(
    bundle: Path = BundleArg,
    target: str = typer.Option(..., "--app", help="The demo app: android (android_demo/) or ios (ios_demo/)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
):
    """Check a bundle against what the demo app runs (manifest format, backend, scheme, digests, the
    gate, the chat format, memory against phone RAM) and print the commands that put it on the phone.
    Exit 1 when a check fails."""
    from qwen_mobile.package import check_for_app

    report = check_for_app(bundle, target)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for name, passed, detail in report["checks"]:
            err.print(f"{'[green]ok[/]' if passed else '[bold red]no[/]'}  {name}: {detail}", highlight=False)
        for command in report["commands"]:
            print(command)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def report(
    targets: Optional[list[str]] = typer.Argument(
        None, show_default=False, metavar="MODEL | BUNDLE",
        help="MODEL (checkpoint directory or hub id; omitted: the embedded qwen3.5-tiny) to export with --backend, "
        "--quant and --method, or existing BUNDLE directories to measure as they are",
    ),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory for report.html, report.md, report.json, the "
                                 "plots, and (from MODEL) the bundles under bundles/"),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", show_default=False,
                                          help="Comma-separated backends to export to (from MODEL)"),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", show_default=False,
                                        help="Comma-separated schemes (from MODEL); a backend that does not encode one "
                                        "is reported as refused"),
    method: str = typer.Option("rtn", "--method", help="Comma-separated: rtn, gptq (from MODEL)"),
    calibration: Optional[str] = typer.Option(None, "--calibration", show_default=False,
                                              help="gptq's calibration text, as for export \\[default: default]"),
    eval_file: Optional[Path] = typer.Option(None, "--eval", show_default=False,
                                             help="UTF-8 text to evaluate on \\[default: the held-out split of the "
                                             "shipped corpus]"),
    eval_tokens: Optional[int] = typer.Option(
        None, "--eval-tokens", min=2, show_default=False,
        help="Tokens of the evaluation text fed through each artifact, one call each \\[default: 256]"),
    source: Optional[str] = typer.Option(None, "--source", show_default=False,
                                         help="With BUNDLEs: the checkpoint they were exported from, as for verify"),
):
    """Perplexity, KL and top-1 against the float model, size, and a greedy transcript check for every
    artifact through its own runtime; per-tensor SNR and recurrent-state drift per plan, in eager.
    Writes report.html (self-contained), report.md, report.json and the plots' PNGs to --out.

    Examples: `qwen-mobile report -b executorch,coreml,tflite -q int8,int4 --method rtn,gptq -o report/`;
    `qwen-mobile report ./bundle-a ./bundle-b -o report/`."""
    from qwen_mobile.report import ReportRequest, build_report
    from qwen_mobile.report_render import write_report

    request = ReportRequest.checked(targets or [], out_dir, backend, quant, method, calibration, source, eval_file)
    with Progress(*Progress.get_default_columns(), console=err) as bar, quiet_warnings():
        task = bar.add_task("report", total=None)
        with progress_listening(bar, task):
            result = build_report(
                request, out_dir, advanced=lambda done, total: bar.update(task, completed=done, total=total),
                **({} if eval_tokens is None else {"eval_tokens": eval_tokens}))
    for path in write_report(result, out_dir):
        out.print(str(path), highlight=False, soft_wrap=True)
    err.print(f"{sum(r['status'] == 'measured' for r in result['artifacts'])} measured, "
              f"{sum(r['status'] == 'refused' for r in result['artifacts'])} refused, "
              f"{result['wall_seconds']:.0f} s", highlight=False)


@contextlib.contextmanager
def progress_listening(bar: Progress, task):
    """The progress bar's description names the step that runs; each step's duration is printed above it."""
    from qwen_mobile import progress

    def listen(step: str, seconds: float | None) -> None:
        if seconds is None:
            bar.update(task, description=step[:60])
        else:
            bar.console.print(f"  {step} [dim]{seconds:.1f} s[/]", highlight=False)

    def notice(message: str) -> None:
        bar.console.print(f"  [yellow]note:[/] {message}", highlight=False)

    with progress.reporting(listen, notice):
        yield
