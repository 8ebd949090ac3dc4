"""`qwen-mobile bench`: prefill and decode speed of a bundle through its backend's CPU runtime.

Every figure is the median of `runs` timed runs after one untimed warm-up run, on a
runner loaded once through `open_runner` (the same path `qwen-mobile run` takes):

- prefill L: the L-token prompt fed from position 0 in calls of at most `max_chunk`
  tokens (a call at position 0 starts a new sequence), then the first token picked from
  the last logits (argmax); tokens/s = L / median time.
- time to first token: the median time of that 128-token prefill, on a loaded runner
  (the load itself is `load_s`).
- decode at context C: after a prefill that filled C positions, windows of
  `decode_steps` one-token calls; the warm-up window and the timed windows follow each
  other, so the steps lie at positions C .. C + (runs + 1) * decode_steps - 1.
  tokens/s = decode_steps / median window time.

Peak resident memory is the process's high-water mark (VmHWM), measured in the process
that loaded the bundle, with the resident size before loading stated beside it. The
ratio of CPU time to wall time over the timed runs says how many cores the runtime kept
busy. A figure the bundle cannot serve (a context beyond its max_context) is reported
as skipped, with the reason, instead of a number.

The arithmetic of the memory-bandwidth bound lives here too (`decode_bytes`,
`bound_tokens_per_s`, `measure_bandwidth`, `weight_bytes_estimate`, `decode_bounds`): a
decode step cannot be faster than the bytes it must read over the machine's memory
bandwidth. So does measuring several artifacts in rounds (`measure_interleaved`,
`combine_rounds`), each measurement in a process of its own supplied by the caller
(benchmarks/run_benchmarks.py runs `qwen-mobile bench --json --runs 1`), with the
bandwidth read beside each one.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from qwen_mobile.errors import QwenMobileError
from qwen_mobile.registry import Runner

PROMPT_LENGTHS = (128, 512)
DECODE_CONTEXTS = (128, 1024)
TTFT_PROMPT = 128
DECODE_STEPS = 8
DEFAULT_RUNS = 5


# ---------------------------------------------------------------- process measurements

def rss_bytes(field: str = "VmRSS") -> int:
    """A field of /proc/self/status in bytes (VmRSS: now, VmHWM: the peak); getrusage where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def path_bytes(path: Path) -> int:
    """A file's size, or the total size of the files under a directory (a .mlpackage)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ---------------------------------------------------------------- timing

class Timer:
    """Wall and CPU time over the timed runs (warm-ups excluded)."""

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0

    def time(self, function: Callable[[], object]) -> float:
        cpu, start = cpu_seconds(), time.perf_counter()
        function()
        elapsed = time.perf_counter() - start
        self.wall += elapsed
        self.cpu += cpu_seconds() - cpu
        return elapsed

    def busy_cores(self) -> float | None:
        return self.cpu / self.wall if self.wall else None


def median_runs(function: Callable[[], object], runs: int, timer: Timer) -> list[float]:
    """One untimed warm-up, then `runs` timed runs; their times in seconds."""
    if runs < 1:
        raise QwenMobileError(f"--runs must be at least 1, got {runs}")
    function()
    return [timer.time(function) for _ in range(runs)]


def summary(seconds: list[float], tokens: int, **extra) -> dict:
    median = statistics.median(seconds)
    return {
        "tokens_per_s": tokens / median,
        "median_ms": median * 1e3,
        "runs_ms": [s * 1e3 for s in seconds],
        "runs": len(seconds),
        **extra,
    }


def prompt_tokens(length: int, vocab_size: int) -> list[int]:
    """A fixed, repeatable prompt of ids spread over the vocabulary (the speed does not depend on them)."""
    return [(7919 * i + 11) % vocab_size for i in range(length)]


def measure_runner(
    runner: Runner,
    vocab_size: int,
    runs: int = DEFAULT_RUNS,
    prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS,
    decode_contexts: tuple[int, ...] = DECODE_CONTEXTS,
    decode_steps: int = DECODE_STEPS,
) -> dict:
    """Prefill, time to first token and decode figures of a loaded runner (see the module doc)."""
    timer = Timer()
    tokens = prompt_tokens(max((*prompt_lengths, *decode_contexts)) + (runs + 1) * decode_steps + 1, vocab_size)
    position = 0  # the positions the runner's state holds

    def feed(start: int, stop: int):
        logits = None
        for chunk_start in range(start, stop, runner.max_chunk):
            chunk_stop = min(chunk_start + runner.max_chunk, stop)
            logits = runner.step(tokens[chunk_start:chunk_stop], chunk_start)
        return logits

    def fits(last_position: int) -> str | None:
        if last_position > runner.max_context:
            return f"n/a (context {runner.max_context})"
        return None

    prefill, decode = {}, {}
    ttft = None
    # ordered so that each prefill leaves the state the next decode figure starts from
    plan = sorted([("prefill", n) for n in prompt_lengths] + [("decode", c) for c in decode_contexts],
                  key=lambda item: (item[1], item[0] == "decode"))
    for kind, length in plan:
        if kind == "prefill":
            reason = fits(length)
            if reason:
                prefill[str(length)] = {"skipped": reason}
                continue
            seconds = median_runs(lambda: int(feed(0, length).argmax()), runs, timer)
            prefill[str(length)] = summary(seconds, length, calls=-(-length // runner.max_chunk))
            position = length
            if length == TTFT_PROMPT:
                ttft = prefill[str(length)]["median_ms"]
        else:
            last = length + (runs + 1) * decode_steps
            reason = fits(last)
            if reason:
                decode[str(length)] = {"skipped": reason}
                continue
            if position > length:  # start over: a call at position 0 resets the state
                position = 0
            feed(position, length)
            position = length

            def window():
                nonlocal position
                for _ in range(decode_steps):
                    runner.step(tokens[position : position + 1], position)
                    position += 1

            seconds = median_runs(window, runs, timer)
            decode[str(length)] = summary(seconds, decode_steps, positions=[length, position - 1],
                                          ms_per_token=statistics.median(seconds) * 1e3 / decode_steps)
    return {
        "runs": runs,
        "warmup_runs": 1,
        "decode_steps": decode_steps,
        "max_chunk": runner.max_chunk,
        "max_context": runner.max_context,
        "prefill": prefill,
        "ttft_ms": ttft,
        "decode": decode,
        "busy_cores": timer.busy_cores(),
    }


def measure_loading(open_runner: Callable[[], tuple[Runner, int]], runs: int = DEFAULT_RUNS, **options) -> dict:
    """Load an artifact with `open_runner` (returning the runner and the vocabulary size), timed,
    then measure it with `measure_runner`; with the process's resident memory before loading and
    its peak. Call it in a fresh process, so that the peak is this artifact's own."""
    if runs < 1:
        raise QwenMobileError(f"--runs must be at least 1, got {runs}")
    rss_before = rss_bytes()
    start = time.perf_counter()
    runner, vocab_size = open_runner()
    load_s = time.perf_counter() - start
    figures = measure_runner(runner, vocab_size, runs, **options)
    return {"load_s": load_s, **figures, "rss_before_load_bytes": rss_before, "peak_rss_bytes": rss_bytes("VmHWM")}


def runtime_threads(backend) -> dict:
    """The machine's cores, torch's threads and the backend's own runtime thread settings."""
    import torch

    return {"cpu_cores": os.cpu_count(), "torch": torch.get_num_threads(), **backend.thread_counts()}


def bench_bundle(bundle: Path, runs: int = DEFAULT_RUNS, **options) -> dict:
    """Load a bundle through its backend's runtime and measure it; one dict, ready for JSON.
    Bundles written with --no-gate are measured too (the manifest says they were never checked)."""
    from qwen_mobile.bundle import read_manifest

    if runs < 1:
        raise QwenMobileError(f"--runs must be at least 1, got {runs}")
    bundle = Path(bundle)
    manifest, spec = read_manifest(bundle)
    backend = spec.load()
    refusal = backend.bench_refusal()
    if refusal:
        raise QwenMobileError(f"{bundle}: {refusal}")
    figures = measure_loading(lambda: (backend.open(bundle, manifest), manifest["vocab_size"]), runs, **options)
    return {
        "bundle": str(bundle),
        "backend": manifest["backend"],
        "quant": manifest["quant"]["scheme"],
        "gated": not manifest["parity"].get("skipped", False),
        "tools": manifest["tools"],
        "threads": runtime_threads(backend),
        "artifact": spec.artifact,
        "artifact_bytes": path_bytes(bundle / spec.artifact),
        "bundle_bytes": path_bytes(bundle),
        **figures,
    }


# ---------------------------------------------------------------- the bandwidth bound

def decode_bytes(weight_bytes: int, unread_weight_bytes: int, state_bytes: int, kv_bytes_per_token: int,
                 context: int) -> int:
    """Bytes one decode step at `context` must read: the weights as stored, less those it does not
    touch (an embedding table stored apart from the lm_head: one row of it is read), the recurrent
    and conv state, and the KV cache up to the context."""
    return weight_bytes - unread_weight_bytes + state_bytes + kv_bytes_per_token * context


def bound_tokens_per_s(bytes_per_token: int, bandwidth_bytes_per_s: float) -> float:
    """The most decode steps per second the memory system allows."""
    return bandwidth_bytes_per_s / bytes_per_token


def measure_bandwidth(megabytes: int = 512, runs: int = 7) -> dict:
    """Memory bandwidth on this machine with torch's threads: a read (sum over a float32 array
    of `megabytes` MiB, far larger than any cache) and a copy (read + write counted), median of
    `runs` after a warm-up. The read figure is the one a decode step is bound by."""
    import torch

    count = megabytes * 1024 * 1024 // 4
    source = torch.ones(count, dtype=torch.float32)
    target = torch.empty_like(source)
    nbytes = source.numel() * 4
    timer = Timer()
    read = median_runs(lambda: float(source.sum()), runs, timer)
    copy = median_runs(lambda: target.copy_(source), runs, timer)
    del source, target
    return {
        "read_bytes_per_s": nbytes / statistics.median(read),
        "copy_bytes_per_s": 2 * nbytes / statistics.median(copy),
        "array_bytes": nbytes,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "method": f"torch.sum over a {megabytes} MiB float32 array (read) and Tensor.copy_ between two "
                  f"(read + write), {torch.get_num_threads()} torch threads, median of {runs} after a warm-up",
    }


def weight_bytes_estimate(config, quant: dict | None) -> tuple[int, int]:
    """(bytes of all weights with a tied embedding table counted once, bytes of the embedding table)
    as a quantization plan (a manifest's `quant`; None: every weight fp32) stores them: `bits` per
    weight plus one 4-byte scale per group (or per output channel), fp32 where the plan names no bits."""
    import torch

    from qwen_mobile.models.qwen3_5 import Qwen35

    with torch.device("meta"):
        model = Qwen35(config)
    layers = (quant or {}).get("layers", {})

    def stored(parameter, plan: dict) -> int:
        if plan["bits"] >= 32:
            return parameter.numel() * 4
        rows, columns = parameter.shape
        groups = rows * (columns // plan["group_size"] if plan["group_size"] else 1)
        return parameter.numel() * plan["bits"] // 8 + groups * 4

    total, embedding, seen = 0, 0, set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += stored(parameter, layers.get(name) or {"bits": 32})
        if "embed_tokens" in name:
            embedding = stored(parameter, layers.get(name) or
                               {"bits": (quant or {}).get("embedding_bits") or 32, "group_size": 0})
    return total, embedding


def decode_bounds(results: dict[str, dict], checkpoint, bandwidths: dict[str, float],
                  quants: dict[str, dict | None]) -> dict:
    """Per measured artifact whose quantization is known (`quants`: its manifest's `quant`, None for
    fp32 weights) on `checkpoint` (a qwen_mobile.checkpoint.Checkpoint): the bytes one decode step
    reads at the middle position of each decode figure, the bound over the bandwidth read beside the
    artifact (`bandwidths`), and the measured fraction of that bound.

    An artifact nearer in size to `weights + embedding table` than to `weights` stores the table
    apart from the lm_head; a decode step reads one row of it, not the table."""
    from qwen_mobile.info import describe

    info = describe(checkpoint)
    state = info["recurrent_state_bytes_per_sequence"]
    kv = info["kv_cache_bytes_per_token"]["fp32"]
    bounds = {}
    for name, result in results.items():
        if "artifact_bytes" not in result or name not in quants or name not in bandwidths:
            continue
        size, bandwidth = result["artifact_bytes"], bandwidths[name]
        shared, table = weight_bytes_estimate(checkpoint.config, quants[name])
        separate = abs(size - (shared + table)) < abs(size - shared)
        unread = table if separate else 0
        entry = {"artifact_bytes": size, "estimated_weight_bytes": shared, "embedding_table_bytes": table,
                 "bandwidth_bytes_per_s": bandwidth, "embedding_stored_apart": separate, "state_bytes": state,
                 "kv_bytes_per_token": kv, "contexts": {}}
        for context, figure in result.get("decode", {}).items():
            if "tokens_per_s" not in figure:
                continue
            position = (figure["positions"][0] + figure["positions"][1]) // 2
            nbytes = decode_bytes(size, unread, state, kv, position)
            bound = bound_tokens_per_s(nbytes, bandwidth)
            entry["contexts"][context] = {"bytes_per_step": nbytes, "bound_tokens_per_s": bound,
                                          "fraction": figure["tokens_per_s"] / bound}
        bounds[name] = entry
    return bounds


# ---------------------------------------------------------------- several artifacts, in rounds

def measure_interleaved(
    artifacts: dict[str, object],
    measure: Callable[[str, object, int], dict],
    rounds: int,
    read_bandwidth: Callable[[], dict] = measure_bandwidth,
    report: Callable[[str], None] = lambda line: None,
) -> tuple[dict, dict]:
    """Every artifact measured once per round for `rounds` rounds, `measure(name, artifact, round)`
    returning one result (a `bench_bundle`-shaped dict of single timed runs, or {"error": ...}, after
    which that artifact is not measured again), with the read bandwidth taken before the first
    measurement and after each one. Returns (the results combined over the rounds by name, the
    bandwidth: its method, every reading in order and the bandwidth beside each artifact).

    On a shared machine both the speed and the bandwidth reading drift within minutes (reads
    of 21.7 to 78 GB/s; a baseline measured 13.5 then 18.4 tok/s in one process, though its
    second window read more). Measured one after the other, each artifact met another moment's
    machine and the ratios between them carried the drift; in rounds, each ratio compares
    measurements taken minutes apart at most. Each measurement's bandwidth is the higher of the
    two readings around it (traffic can only lower a reading), and an artifact's is the median of
    those over its rounds."""
    first = read_bandwidth()
    readings = [first["read_bytes_per_s"]]
    report(f"read bandwidth {readings[-1] / 1e9:.1f} GB/s")
    measured: dict[str, list[dict]] = {name: [] for name in artifacts}
    beside: dict[str, list[float]] = {name: [] for name in artifacts}
    for index in range(rounds):
        for name, artifact in artifacts.items():
            if measured[name] and "error" in measured[name][-1]:
                continue
            measured[name].append(measure(name, artifact, index))
            readings.append(read_bandwidth()["read_bytes_per_s"])
            beside[name].append(max(readings[-2:]))
            report(f"round {index + 1}: {name} measured; read bandwidth {readings[-1] / 1e9:.1f} GB/s")
    results = {name: combine_rounds(rounds_of) for name, rounds_of in measured.items() if rounds_of}
    bandwidth = {"method": first["method"], "copy_bytes_per_s": first["copy_bytes_per_s"], "readings": readings,
                 "per_artifact": {name: statistics.median(values) for name, values in beside.items() if values}}
    return results, bandwidth


def combine_rounds(measured: list[dict]) -> dict:
    """One result from an artifact's rounds (each a single timed run): each figure's median over
    the rounds, peak memory the highest, load time and busy cores the median, the rest from the
    first round; a failed round makes the whole result that failure."""
    failed = next((result for result in measured if "error" in result), None)
    if failed:
        return failed
    combined = {**measured[0], "runs": len(measured), "rounds": measured}
    for kind in ("prefill", "decode"):
        combined[kind] = {}
        for key, figure in measured[0][kind].items():
            if "tokens_per_s" not in figure:
                combined[kind][key] = figure
                continue
            tokens = int(key) if kind == "prefill" else measured[0]["decode_steps"]
            seconds = [result[kind][key]["median_ms"] / 1e3 for result in measured]
            extra = {k: v for k, v in figure.items() if k not in ("tokens_per_s", "median_ms", "runs_ms", "runs")}
            if "ms_per_token" in extra:
                extra["ms_per_token"] = statistics.median(seconds) * 1e3 / tokens
            combined[kind][key] = summary(seconds, tokens, **extra)
    combined["ttft_ms"] = combined["prefill"].get(str(TTFT_PROMPT), {}).get("median_ms")
    for key in ("load_s", "busy_cores"):
        values = [result[key] for result in measured if result.get(key) is not None]
        combined[key] = statistics.median(values) if values else None
    combined["peak_rss_bytes"] = max(result["peak_rss_bytes"] for result in measured)
    return combined
