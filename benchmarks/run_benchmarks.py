"""Side-by-side speed of qwen-mobile's bundles, ExecuTorch's own Qwen3.5 export and the
memory-bandwidth bound, on one machine in one run; writes benchmarks/RESULTS.md.

    python benchmarks/run_benchmarks.py --work /tmp/qm-bench [--runs 3]

Steps (each one reuses what an earlier, possibly interrupted, run left in --work):
1. a Qwen3.5-0.8B-shaped random checkpoint (`qwen-mobile fixture --shape 0.8b`), or --checkpoint;
2. our bundles, each by `qwen-mobile export` in its own process: ExecuTorch fp32, int8, 8da4w
   (g32 and g128) and int4 (refused by the backend: recorded as such), TFLite int8, int4,
   8da8w and 8da4w (exported with --max-context --tflite-context so that decode at 1,024 fits);
   `--ungated NAME,...` exports those with `--no-gate` (a bundle whose manifest says the gate
   never ran, for timing a lowering whose gate refuses random weights); `--reuse NAME=DIR`
   takes an existing bundle instead of exporting;
3. ExecuTorch's own documented path: `convert_weights` on the same checkpoint, then
   `export_llm` with its `qwen3_5_xnnpack_fp32.yaml` and the qwen3_5_0_8b parameters
   (written from the checkpoint's config.json: the params file is not in the executorch wheel);
4. measurement in rounds (qwen_mobile.bench.measure_interleaved): each round measures every
   artifact once, in its own process, so that peak memory is its own: a bundle by
   `qwen-mobile bench BUNDLE --json --runs 1`, a bare .pte (ExecuTorch's own, or one given
   with `--also NAME=FILE`) by this script's `--measure-pte`, which loads it with the ExecuTorch
   backend's runtime and measures it with the same code as `bench` (bench.measure_loading);
   the machine's memory bandwidth is read before the first measurement and after each one;
5. the decode bound (bench.decode_bounds): the bytes a step reads over the bandwidth read
   next to that artifact, and the artifact's fraction of it.

Exports run one at a time (each is timed and its peak memory taken from wait4); the
wall time and peak memory of every export are kept in WORK/exports.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
OWN = "executorch-own-fp32"
OURS = {  # name -> (backend, quant, --group-size or None for the scheme's default)
    "executorch-fp32": ("executorch", "fp32", None),
    "executorch-int8": ("executorch", "int8", None),
    "executorch-8da4w": ("executorch", "8da4w", None),
    "executorch-8da4w-g128": ("executorch", "8da4w", 128),
    "executorch-int4": ("executorch", "int4", None),
    "tflite-int8": ("tflite", "int8", None),
    "tflite-int4": ("tflite", "int4", None),
    "tflite-8da8w": ("tflite", "8da8w", None),
    "tflite-8da4w": ("tflite", "8da4w", None),
}
INT4_CLASS = ("executorch-8da4w", "executorch-8da4w-g128", "executorch-int4")
ALL = (*OURS, OWN)
NOTES = "## Notes"  # a section of RESULTS.md written by hand (profiles, causes); kept when the tables are rewritten


# ---------------------------------------------------------------- child processes

WAIT_FOR_QUIET = False


def wait_for_quiet() -> None:
    """With --wait-for-quiet: hold a heavy step until no other export runs on the machine
    (two exports at 0.8B need more memory than a 24 GB machine has)."""
    announced = False
    while WAIT_FOR_QUIET and (busy := heavy_processes()):
        if not announced:
            print("waiting for other exports to finish:\n  " + "\n  ".join(busy), flush=True)
            announced = True
        time.sleep(20)


def run_child(command: list[str], log: Path, timeout: float | None = None, heavy: bool = False,
              cwd: Path = REPO) -> dict:
    """Run a command to completion; its wall time, peak resident memory (wait4) and exit status."""
    if heavy:
        wait_for_quiet()
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline and time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.5)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code
    return {"command": shlex.join(command), "returncode": code, "wall_s": wall,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "log": str(log),
            "timed_out": bool(timeout and wall >= timeout)}


def last_error(log: Path) -> str:
    """The error line of a failed child: an exception or `error:` line, not a warning that mentions errors."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^(error:|[\w.]*(Error|Exception)\b)", line)]
    return (errors or lines or ["(no output)"])[-1][:300]


def parse_time_v(path: Path) -> dict:
    """GNU `time -v` output: wall time and peak memory of an export run outside this script."""
    wall = peak = None
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("Elapsed (wall clock) time"):
            parts = [float(p) for p in line.rsplit(" ", 1)[1].split(":")]
            wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif line.startswith("Maximum resident set size"):
            peak = int(line.rsplit(" ", 1)[1]) * 1024
    return {"wall_s": wall, "peak_rss_bytes": peak, "log": str(path)}


# ---------------------------------------------------------------- steps

def heavy_processes() -> list[str]:
    """Other exports running on this machine (they would distort timings and memory)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = status.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(status.parent.name) != os.getpid() and ("qwen-mobile export" in text or "export_llm" in text
                                                       or "qwen_mobile export" in text):
            found.append(f"{status.parent.name}: {text.strip()[:120]}")
    return found


def ensure_checkpoint(args, work: Path) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    path = work / "checkpoint"
    if not (path / "config.json").is_file():
        result = run_child([sys.executable, "-m", "qwen_mobile", "fixture", "--shape", args.shape, "--out", str(path)],
                           work / "logs" / "fixture.log")
        if result["returncode"]:
            sys.exit(f"fixture failed: {last_error(work / 'logs' / 'fixture.log')}")
    return path


def export_ours(name: str, checkpoint: Path, work: Path, args, exports: dict) -> Path | None:
    """Our bundle NAME: reused, already in --work, or exported by `qwen-mobile export` (with
    --no-gate when NAME is in --ungated: a bundle whose manifest says parity.skipped)."""
    backend, quant, group_size = OURS[name]
    ungated = name in args.ungated
    if name in args.reuse:
        out = Path(args.reuse[name])
        if name in args.time_v:
            exports[name] = {"status": "reused", **parse_time_v(args.time_v[name]),
                             "command": f"qwen-mobile export {checkpoint} --backend {backend} --quant {quant}"}
        else:
            exports.setdefault(name, {"status": "reused", "note": "exported outside this script; time not recorded"})
        return out if (out / "manifest.json").is_file() else None
    out = work / (f"{name}-ungated" if ungated else name)
    if (out / "manifest.json").is_file():  # the manifest is a published bundle's last file
        return out
    if args.skip_export:
        exports.setdefault(name, {"status": "skipped", "message": "--skip-export"})
        return None
    log = work / "logs" / f"export-{out.name}.log"
    command = [sys.executable, "-m", "qwen_mobile", "export", str(checkpoint), "--backend", backend,
               "--quant", quant, "--out", str(out), *(["--group-size", str(group_size)] if group_size else []),
               *(["--no-gate"] if ungated else [])]
    if backend == "tflite":  # the backend's default context (512) is too short for decode at 1,024
        command += ["--max-context", str(args.tflite_context)]
    result = run_child(command, log, args.export_timeout, heavy=True)
    ok = result["returncode"] == 0 and (out / "manifest.json").is_file()
    if not ok:
        status = "timed out" if result["timed_out"] else "refused" if result["returncode"] == 2 else "failed"
        exports[name] = {"status": status, **result, "message": last_error(log)}
        return None
    exports[name] = {"status": "ungated", **result, "message": "written with --no-gate: the parity gate did not run"} \
        if ungated else {"status": "ok", **result}
    return out


def own_params(checkpoint: Path) -> dict:
    """ExecuTorch's Llama-family ModelArgs for this checkpoint, field by field from its config.json
    (for the real 0.8B shape this reproduces executorch's examples/models/qwen3_5/config/0_8b_config.json)."""
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or {}
    interval = text.get("full_attention_interval", 4)
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(text["num_hidden_layers"])
    ]
    return {
        "dim": text["hidden_size"], "hidden_dim": text["intermediate_size"],
        "n_heads": text["num_attention_heads"], "head_dim": text["head_dim"],
        "n_kv_heads": text["num_key_value_heads"], "n_layers": text["num_hidden_layers"],
        "norm_eps": text["rms_norm_eps"], "rope_theta": rope.get("rope_theta", text.get("rope_theta")),
        "use_scaled_rope": False, "vocab_size": text["vocab_size"], "use_hf_rope": True,
        "partial_rotary_factor": rope.get("partial_rotary_factor", text.get("partial_rotary_factor")),
        "attention_qkv_bias": text.get("attention_bias", False), "use_qk_norm": True, "qk_norm_before_rope": True,
        "attention_type": "mha", "use_q_gate": text.get("attn_output_gate", True), "rms_norm_add_unit_offset": True,
        "linear_conv_kernel_dim": text["linear_conv_kernel_dim"],
        "linear_key_head_dim": text["linear_key_head_dim"], "linear_value_head_dim": text["linear_value_head_dim"],
        "linear_num_key_heads": text["linear_num_key_heads"],
        "linear_num_value_heads": text["linear_num_value_heads"], "layer_types": layer_types,
    }


def own_yaml() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("executorch.examples.models.qwen3_5")
    return Path(spec.submodule_search_locations[0]) / "config" / "qwen3_5_xnnpack_fp32.yaml"


def export_own(checkpoint: Path, work: Path, args, exports: dict) -> Path | None:
    """ExecuTorch's own example export, as its README documents it, from the same checkpoint."""
    out = work / OWN
    pte = out / "qwen3_5_0_8b_fp32.pte"
    if OWN in args.reuse:
        return Path(args.reuse[OWN]) if Path(args.reuse[OWN]).is_file() else None
    if pte.is_file():
        return pte
    if args.skip_export or args.skip_own:
        exports.setdefault(OWN, {"status": "skipped", "message": "--skip-export / --skip-own"})
        return None
    out.mkdir(parents=True, exist_ok=True)
    params = out / "0_8b_config.json"
    params.write_text(json.dumps(own_params(checkpoint), indent=2) + "\n")
    weights = out / "qwen3_5_0_8b.pth"
    if not weights.is_file():
        convert = run_child([sys.executable, "-m", "executorch.examples.models.qwen3_5.convert_weights",
                             str(checkpoint), str(weights)], work / "logs" / "own-convert.log")
        if convert["returncode"]:
            exports[OWN] = {"status": "failed", **convert, "message": last_error(work / "logs" / "own-convert.log")}
            return None
        exports[OWN + " convert_weights"] = {"status": "ok", **convert}
    log = work / "logs" / "own-export.log"
    result = run_child([sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config", str(own_yaml()),
                        "+base.model_class=qwen3_5_0_8b", f"+base.params={params}", f"+base.checkpoint={weights}",
                        f"+export.output_dir={out}", f"+export.output_name={pte.name}"], log, args.export_timeout,
                       heavy=True, cwd=out)  # export_llm writes output_name relative to its working directory
    ok = result["returncode"] == 0 and pte.is_file()
    exports[OWN] = {"status": "ok" if ok else "failed", **result, **({} if ok else {"message": last_error(log)})}
    return pte if ok else None


# ---------------------------------------------------------------- measuring

def measure_pte(pte: Path, runs: int) -> dict:
    """A bare .pte (ExecuTorch's own export, or any program without a bundle) loaded through the
    ExecuTorch backend's runtime and measured by the same code as `qwen-mobile bench`; its lengths
    and vocabulary from the program's own constant methods, the thread counts from the backend."""
    import torch

    from qwen_mobile import bench
    from qwen_mobile.backends.executorch import runtime
    from qwen_mobile.bundle import tool_versions
    from qwen_mobile.registry import Runner, get_backend

    spec, _ = get_backend("executorch", None)
    backend = spec.load()

    def open_pte() -> tuple[Runner, int]:
        method = runtime.load_forward(pte)

        def constant(name: str) -> int:
            return int(method.program.load_method(name).execute([])[0])

        meta = method.metadata
        meta = meta() if callable(meta) else meta
        # the tokens input's largest size: [1, 1] for ExecuTorch's static-shape export, the dynamic bound for ours
        max_chunk = min(int(meta.input_tensor_meta(0).sizes()[-1]), constant("get_max_seq_len"))
        runner = Runner(lambda tokens, start: runtime.step(method, torch.tensor([tokens]), start)[0],
                        max_context=constant("get_max_context_len"), max_chunk=max_chunk)
        return runner, constant("get_vocab_size")

    figures = bench.measure_loading(open_pte, runs)
    return {
        "bundle": str(pte), "backend": spec.name, "quant": None, "gated": False,
        "tools": tool_versions(*backend.tools), "threads": bench.runtime_threads(backend),
        "artifact": pte.name, "artifact_bytes": pte.stat().st_size, "bundle_bytes": pte.stat().st_size, **figures,
    }


def measure(path: Path, log: Path, runs: int = 1) -> dict:
    """One artifact measured in a process of its own: a bundle by `qwen-mobile bench --json`, a bare
    .pte by this script's --measure-pte. The child's JSON, or {"error": its last error line}."""
    if Path(path).is_file():
        command = [sys.executable, str(Path(__file__).resolve()), "--measure-pte", str(path), "--runs", str(runs)]
    else:
        command = [sys.executable, "-m", "qwen_mobile", "bench", str(path), "--json", "--runs", str(runs)]
    outcome = run_child(command, log)
    text = Path(log).read_text(errors="replace")
    if outcome["returncode"]:
        return {"error": last_error(log)}
    # the JSON object alone: LiteRT writes log lines to stderr (the same log) as the child exits
    return json.JSONDecoder().raw_decode(text[text.index("{\n"):])[0]


def measure_rounds(artifacts: dict[str, Path], work: Path, rounds: int) -> tuple[dict, dict]:
    """bench.measure_interleaved over `artifacts`, each measurement a child process (one warm-up, one
    timed run) logged in WORK/logs."""
    from qwen_mobile.bench import measure_interleaved

    return measure_interleaved(
        artifacts, lambda name, path, index: measure(path, work / "logs" / f"bench-{name}-{index + 1}.log"),
        rounds, report=lambda line: print(line, flush=True))


def quant_plans(results: dict) -> dict:
    """Each measured artifact's quantization, for the decode bound: a bundle's manifest `quant`, None
    (fp32) for ExecuTorch's own example; a bare .pte of unknown encoding gets no bound."""
    plans = {}
    for name, result in results.items():
        where = Path(result.get("bundle", ""))
        if (where / "manifest.json").is_file():
            plans[name] = json.loads((where / "manifest.json").read_text())["quant"]
        elif name == OWN:
            plans[name] = None
    return plans


def bounds_for(results: dict, checkpoint: Path, bandwidths: dict) -> dict:
    from qwen_mobile.bench import decode_bounds
    from qwen_mobile.checkpoint import open_checkpoint

    return decode_bounds(results, open_checkpoint(str(checkpoint)), bandwidths, quant_plans(results))


# ---------------------------------------------------------------- the report

def fmt_rate(figure: dict | None) -> str:
    if not figure:
        return "-"
    return figure["skipped"] if "skipped" in figure else f"{figure['tokens_per_s']:.1f}"


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def label(name: str, result: dict) -> str:
    """The table's name for an artifact: marked when it is a bundle written with --no-gate, or a
    bare .pte of ours (ExecuTorch's own example is bare by nature)."""
    if name != OWN and result.get("artifact") == Path(result.get("bundle", "")).name:
        return f"{name} (bare .pte)"
    if name != OWN and result.get("gated") is False:
        return f"{name} (--no-gate)"
    return name


def write_report(path: Path, meta: dict, exports: dict, results: dict, bandwidth: dict, bounds: dict) -> str:
    lines = [
        f"# Benchmarks: {meta['model']}, one run on one machine",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}.",
        "",
        f"- machine: {meta['machine']}",
        f"- versions: {meta['versions']}",
        f"- threads: {meta['threads']}",
        f"- memory bandwidth ({bandwidth['method']}): read before the first artifact and after each one: "
        + ", ".join(f"{value / 1e9:.1f}" for value in bandwidth["readings"])
        + f" GB/s (copy {bandwidth['copy_bytes_per_s'] / 1e9:.1f} GB/s at the start); each artifact's bound uses "
        "the higher of the two readings around it (other tenants' traffic can only lower a reading, so the higher "
        "one is nearer what its decode steps could have had)",
        f"- method: {meta['runs']} rounds, each measuring every artifact once in its own process (a bundle by "
        "`qwen-mobile bench --json --runs 1`, a bare .pte by this script's --measure-pte through the same runtime "
        "and code: one warm-up, one timed run), so that the machine's drift reaches every artifact alike; "
        "every figure is the median over the rounds, all in this one run. Decode at context C: windows of "
        f"{meta['decode_steps']} one-token calls at positions C onward after a prefill to C. Prefill: the prompt "
        "in calls of the artifact's largest chunk, then the first token picked; time to first token is the "
        "128-token prefill on a loaded model. The machine is shared with other work and noisy: compare ratios "
        "within this table, not with other runs.",
        "",
        "| artifact | size MiB | prefill 128 tok/s | prefill 512 tok/s | decode @128 tok/s | decode @1024 tok/s "
        "| TTFT ms | peak RSS MiB | load s | cores busy | read GB/s | decode bound @128 tok/s | fraction of bound @128 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    missing = []
    for name in meta.get("artifacts") or [*ALL, *(name for name in results if name not in ALL)]:
        result = results.get(name)
        if result is None or "error" in result:
            record = exports.get(name, {})
            why = (result or {}).get("error") or record.get("message") or "not run"
            missing.append(f"- {name}: {record.get('status', 'not measured')}: {why}")
            lines.append(f"| {name} | " + " | ".join(["-"] * 12) + " |")
            continue
        bound = bounds.get(name, {}).get("contexts", {}).get("128")
        read = bandwidth.get("per_artifact", {}).get(name)
        lines.append(
            f"| {label(name, result)} | {mib(result['artifact_bytes'])} | {fmt_rate(result['prefill'].get('128'))} | "
            f"{fmt_rate(result['prefill'].get('512'))} | {fmt_rate(result['decode'].get('128'))} | "
            f"{fmt_rate(result['decode'].get('1024'))} | "
            f"{'-' if result['ttft_ms'] is None else format(result['ttft_ms'], ',.0f')} | "
            f"{mib(result['peak_rss_bytes'])} | {result['load_s']:.1f} | {result['busy_cores']:.2f} | "
            f"{'-' if read is None else format(read / 1e9, '.1f')} | "
            f"{'-' if not bound else format(bound['bound_tokens_per_s'], '.1f')} | "
            f"{'-' if not bound else format(bound['fraction'], '.0%')} |"
        )
    lines += [""] + missing
    lines += ["", "## Exports", "", "| artifact | status | wall time | peak memory | note |", "| --- | --- | ---: | ---: | --- |"]
    for name, record in exports.items():
        wall, peak = record.get("wall_s"), record.get("peak_rss_bytes")
        wall_text = "-" if wall is None else f"{wall / 60:.1f} min"
        peak_text = "-" if peak is None else f"{peak / 2**30:.1f} GiB"
        note = record.get("message") or record.get("note") or ""
        lines.append(f"| {name} | {record.get('status')} | {wall_text} | {peak_text} | {note} |")
    lines += ["", "## Targets (ratios within this run)", ""] + targets(results, exports, bounds)
    lines += ["", "## Decode bound arithmetic", "",
              "bytes per step = artifact bytes (weights as stored) - the embedding table when the artifact stores it "
              "apart from the lm_head (a step reads one row of it) + recurrent and conv state (fp32) + KV (fp32) "
              "up to the step's position; bound = the read bandwidth next to the artifact / bytes per step.", "",
              "| artifact | bytes/step @128 | embedding stored apart | bound @128 tok/s | bound @1024 tok/s |",
              "| --- | ---: | --- | ---: | ---: |"]
    for name, entry in bounds.items():
        at = entry["contexts"]
        lines.append(f"| {name} | {mib(at['128']['bytes_per_step']) + ' MiB' if '128' in at else '-'} | "
                     f"{entry['embedding_stored_apart']} | "
                     f"{format(at['128']['bound_tokens_per_s'], '.1f') if '128' in at else '-'} | "
                     f"{format(at['1024']['bound_tokens_per_s'], '.1f') if '1024' in at else '-'} |")
    lines += ["", "Raw figures (every run) are in `results.json` in the work directory.", ""]
    text = "\n".join(lines)
    if path.is_file() and NOTES in path.read_text():  # the hand-written analysis survives a re-run
        text += "\n" + path.read_text()[path.read_text().index(NOTES):]
    path.write_text(text)
    return text


def rate(results: dict, name: str, figure: str, key: str) -> float | None:
    entry = results.get(name, {}).get(figure, {}).get(key, {})
    return entry.get("tokens_per_s")


def targets(results: dict, exports: dict, bounds: dict) -> list[str]:
    def verdict(value, goal):
        return "n/a" if value is None else ("met" if value >= goal else "MISSED")

    out = []
    for name in INT4_CLASS:
        for context in ("128", "1024"):
            ours, own = rate(results, name, "decode", context), rate(results, OWN, "decode", context)
            ratio = ours / own if ours and own else None
            if ratio is not None:
                out.append(f"- {name} decode / ExecuTorch's own fp32 example decode (context {context}) >= 3.5: "
                           f"{ratio:.2f}x ({verdict(ratio, 3.5)})")
    for name in ALL:
        entry = bounds.get(name, {}).get("contexts", {}).get("128")
        if entry:
            out.append(f"- {name}: decode at 128 is {entry['fraction']:.0%} of its bound "
                       f"({verdict(entry['fraction'], 0.6)} at >= 60%)")
    for name in ALL:
        prefill, decode = rate(results, name, "prefill", "512"), rate(results, name, "decode", "128")
        if prefill and decode:
            out.append(f"- {name}: prefill 512 / decode = {prefill / decode:.1f}x ({verdict(prefill / decode, 5)} at >= 5x)")
    out += tflite_targets(results)
    mine, theirs = exports.get("executorch-8da4w", {}), exports.get(OWN, {})
    if mine.get("wall_s") and theirs.get("wall_s"):
        what = "written with --no-gate: the gate did not run" if mine.get("status") == "ungated" else mine.get("status")
        out.append(f"- 0.8B 8da4w export ({what}) vs ExecuTorch's fp32 example export: {mine['wall_s'] / 60:.1f} vs "
                   f"{theirs['wall_s'] / 60:.1f} min, {mine['peak_rss_bytes'] / 2**30:.1f} vs "
                   f"{theirs['peak_rss_bytes'] / 2**30:.1f} GiB "
                   f"({'met' if mine['wall_s'] < theirs['wall_s'] and mine['peak_rss_bytes'] < theirs['peak_rss_bytes'] else 'MISSED'})")
    else:
        out.append("- export time and memory vs ExecuTorch's example export: n/a (one of them was not timed here)")
    return out


def tflite_targets(results: dict) -> list[str]:
    """TFLite 8da4w against ExecuTorch 8da4w (the phone schemes of the two Android runtimes)."""
    ours, theirs = results.get("tflite-8da4w"), results.get("executorch-8da4w")
    if not ours or not theirs:
        return []
    out = []
    for figure, key in (("decode", "128"), ("decode", "1024"), ("prefill", "512")):
        mine, other = rate(results, "tflite-8da4w", figure, key), rate(results, "executorch-8da4w", figure, key)
        if mine and other:
            out.append(f"- tflite-8da4w {figure} {key} / executorch-8da4w's >= 0.8: {mine / other:.2f}x "
                       f"({'met' if mine / other >= 0.8 else 'MISSED'})")
    size, peak = ours.get("artifact_bytes"), ours.get("peak_rss_bytes")
    if size and peak:
        out.append(f"- tflite-8da4w peak resident memory / file size <= 1.5: {peak / size:.2f}x "
                   f"({'met' if peak / size <= 1.5 else 'MISSED'})")
    if size and theirs.get("artifact_bytes"):
        ratio = size / theirs["artifact_bytes"]
        out.append(f"- tflite-8da4w file / executorch-8da4w's <= 1.05: {ratio:.3f}x ({'met' if ratio <= 1.05 else 'MISSED'})")
    return out


# ---------------------------------------------------------------- main

def describe_checkpoint(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("text_config", config)
    return (f"random-weight Qwen3.5 checkpoint {checkpoint} ({text['num_hidden_layers']} layers, hidden "
            f"{text['hidden_size']}, vocab {text['vocab_size']:,}: the 0.8B shape when written by `qwen-mobile fixture "
            f"--shape 0.8b`)")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except OSError:
        memory = 0
    return f"{model}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, {platform.platform()}"


def pairs(values: list[str]) -> dict:
    return dict(value.split("=", 1) for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/qwen-mobile-bench"), help="Exports, logs, results")
    parser.add_argument("--checkpoint", help="An existing checkpoint directory instead of a new fixture")
    parser.add_argument("--shape", default="0.8b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="Comma-separated artifact names to measure: " + ", ".join(ALL))
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=DIR",
                        help=f"An existing bundle for NAME (for {OWN}: its .pte)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=PATH",
                        help="Measure this bundle or bare .pte too, in the same rounds, as NAME (an A/B's other side)")
    parser.add_argument("--time-v", action="append", default=[], metavar="NAME=FILE",
                        help="`time -v` output of a reused export: its wall time and peak memory")
    parser.add_argument("--ungated", default="", help="Comma-separated artifact names to export with --no-gate "
                        "(for timing artifacts whose gate fails at this shape; reported as such)")
    parser.add_argument("--skip-export", action="store_true", help="Measure only what already exists")
    parser.add_argument("--skip-own", action="store_true", help="Do not run ExecuTorch's own export")
    parser.add_argument("--tflite-context", type=int, default=1280)
    parser.add_argument("--export-timeout", type=float, default=40 * 60)
    parser.add_argument("--export-only", action="store_true", help="Stop after the exports (measure in a later run)")
    parser.add_argument("--wait-for-quiet", action="store_true", help="Start each export only when no other runs")
    parser.add_argument("--report-only", action="store_true", help="Rewrite RESULTS.md from WORK/results.json")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--measure-pte", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_pte:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(measure_pte(args.measure_pte, args.runs), indent=2))
        return
    if args.report_only:  # the tables again from WORK/results.json (after editing the notes, say)
        saved = json.loads((args.work / "results.json").read_text())
        if args.checkpoint:  # the bounds again too (after changing how they are computed)
            saved["bounds"] = bounds_for(saved["results"], Path(args.checkpoint), saved["bandwidth"]["per_artifact"])
            (args.work / "results.json").write_text(json.dumps(saved, indent=2))
        print(write_report(args.results, saved["meta"], saved["exports"], saved["results"], saved["bandwidth"],
                           saved["bounds"]))
        return
    args.reuse, args.time_v, also = pairs(args.reuse), pairs(args.time_v), pairs(args.also)
    args.ungated = [name for name in args.ungated.split(",") if name]
    global WAIT_FOR_QUIET
    WAIT_FOR_QUIET = args.wait_for_quiet
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    selected = args.only.split(",") if args.only else list(ALL)
    busy = heavy_processes()
    if busy:
        print("warning: other exports are running; timings will be noisy:\n  " + "\n  ".join(busy), flush=True)
    exports_path = work / "exports.json"
    exports = json.loads(exports_path.read_text()) if exports_path.is_file() else {}
    checkpoint = ensure_checkpoint(args, work)
    artifacts = {}
    for name in selected:
        if name == OWN:
            path = export_own(checkpoint, work, args, exports)
        else:
            path = export_ours(name, checkpoint, work, args, exports)
        exports_path.write_text(json.dumps(exports, indent=2))
        if path:
            artifacts[name] = path

    if args.export_only:
        print(json.dumps(exports, indent=2))
        return
    for name, path in also.items():
        if not Path(path).exists():
            sys.exit(f"--also {name}={path}: not found")
        artifacts[name] = Path(path)
    results, bandwidth = measure_rounds(artifacts, work, args.runs)
    bounds = bounds_for(results, checkpoint, bandwidth["per_artifact"])
    from qwen_mobile.bundle import tool_versions

    threads = {}  # every runtime's thread settings as the measured processes reported them
    for result in results.values():
        threads.update({key: value for key, value in result.get("threads", {}).items() if value is not None})
    meta = {
        "command": "python benchmarks/run_benchmarks.py " + shlex.join(sys.argv[1:]),
        "model": describe_checkpoint(checkpoint),
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": machine(),
        "versions": ", ".join(f"{k} {v}" for k, v in tool_versions("executorch", "ai-edge-litert", "litert-torch").items())
        + f", Python {platform.python_version()}",
        "threads": ", ".join(f"{key} {value}" for key, value in threads.items())
        + "; 'cores busy' is CPU time / wall time over the timed runs",
        "runs": args.runs,
        "decode_steps": next((r["decode_steps"] for r in results.values() if "decode_steps" in r), None),
        "artifacts": [*selected, *also],
        "busy_at_start": busy,
    }
    (work / "results.json").write_text(json.dumps(
        {"meta": meta, "bandwidth": bandwidth, "exports": exports, "results": results, "bounds": bounds}, indent=2))
    print(write_report(args.results, meta, exports, results, bandwidth, bounds))


if __name__ == "__main__":
    main()
