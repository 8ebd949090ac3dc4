"""`qwen-mobile bench` and the benchmark script's arithmetic, on the embedded model."""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import version
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qwen_mobile import bench
from qwen_mobile.cli import app
from qwen_mobile.registry import Runner

REPO = Path(__file__).resolve().parent.parent
cli = CliRunner()


@pytest.fixture(scope="module")
def tiny_bundle(embedded_bundle) -> Path:
    """The embedded model as an ExecuTorch fp32 bundle."""
    return embedded_bundle("executorch", "fp32")


def json_output(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_bench_json_fields_exist_and_are_positive(tiny_bundle):
    result = cli.invoke(app, ["bench", str(tiny_bundle), "--json", "--runs", "2"])
    assert result.exit_code == 0, result.output
    report = json_output(result)
    for length in ("128", "512"):
        figure = report["prefill"][length]
        assert figure["tokens_per_s"] > 0 and figure["median_ms"] > 0
        assert figure["runs"] == 2 and len(figure["runs_ms"]) == 2
        assert figure["calls"] == -(-int(length) // 128)  # the bundle's max_seq_len
    for context in ("128", "1024"):
        figure = report["decode"][context]
        assert figure["tokens_per_s"] > 0 and figure["ms_per_token"] > 0
        assert figure["positions"][0] == int(context)
        assert figure["positions"][1] == int(context) + 3 * report["decode_steps"] - 1  # warm-up + 2 windows
    assert report["ttft_ms"] == report["prefill"]["128"]["median_ms"]
    for field in ("load_s", "artifact_bytes", "bundle_bytes", "peak_rss_bytes", "rss_before_load_bytes", "busy_cores"):
        assert report[field] > 0, field
    assert report["peak_rss_bytes"] >= report["rss_before_load_bytes"]
    assert report["artifact_bytes"] == (tiny_bundle / "model.pte").stat().st_size
    assert report["threads"]["torch"] >= 1 and report["threads"]["executorch"] >= 1
    assert report["backend"] == "executorch" and report["quant"] == "fp32" and report["gated"] is True
    assert report["tools"]["executorch"] == version("executorch")


def test_bench_table_states_runs_and_threads(tiny_bundle):
    result = cli.invoke(app, ["bench", str(tiny_bundle), "--runs", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps the title at the terminal's width
    assert "median of 1 after a warm-up" in text and "threads" in text
    assert "decode at context 1024" in text and "tokens/s" in text


class CountingRunner:
    """A runner whose steps take no time, recording every call it gets."""

    def __init__(self, max_context: int, max_chunk: int):
        self.calls: list[tuple[int, int]] = []
        self.runner = Runner(self.step, max_context=max_context, max_chunk=max_chunk)

    def step(self, tokens, start):
        assert 1 <= len(tokens) <= self.runner.max_chunk and start + len(tokens) <= self.runner.max_context
        self.calls.append((start, len(tokens)))
        return torch.zeros(16)


def test_medians_come_from_n_runs_after_one_warm_up(monkeypatch):
    counting = CountingRunner(max_context=2048, max_chunk=32)
    report = bench.measure_runner(counting.runner, vocab_size=16, runs=4, decode_steps=5)
    for group in ("prefill", "decode"):
        for figure in report[group].values():
            assert figure["runs"] == 4 and len(figure["runs_ms"]) == 4
            assert figure["median_ms"] == pytest.approx(statistics.median(figure["runs_ms"]))
    # each prefill: one warm-up and 4 timed runs, each fed from position 0 in chunks of 32
    assert sum(1 for start, n in counting.calls if start == 0 and n == 32) == 2 * 5
    # decode at 128 starts where the 128-token prefill stopped: windows at 128.., 25 steps in all
    decode_128 = [start for start, n in counting.calls if n == 1 and 128 <= start < 512]
    assert decode_128 == list(range(128, 128 + 5 * 5))
    assert report["decode"]["1024"]["positions"] == [1024, 1024 + 5 * 5 - 1]


def test_figures_beyond_the_context_are_skipped_with_the_reason():
    counting = CountingRunner(max_context=512, max_chunk=32)
    report = bench.measure_runner(counting.runner, vocab_size=16, runs=2)
    assert report["prefill"]["512"]["tokens_per_s"] > 0
    assert report["decode"]["1024"] == {"skipped": "n/a (context 512)"}
    assert max(start + n for start, n in counting.calls) <= 512


def test_runs_below_one_are_refused():
    with pytest.raises(Exception, match="--runs"):
        bench.measure_runner(CountingRunner(256, 32).runner, vocab_size=16, runs=0)


def test_coreml_bundle_is_refused_off_macos(tiny_bundle, tmp_path, monkeypatch):
    """A bundle whose manifest names Core ML: refused before anything is loaded, one line, non-zero exit."""
    from qwen_mobile.backends.coreml.backend import EMULATOR_REFUSAL
    from qwen_mobile.bundle import file_digests, manifest_digest

    monkeypatch.setenv("QWEN_MOBILE_COREML_EMULATOR", "1")  # the emulator, as on Linux, on any OS
    bundle = tmp_path / "coreml-bundle"
    (bundle / "model.mlpackage").mkdir(parents=True)
    (bundle / "model.mlpackage" / "Manifest.json").write_text("{}")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest.update(backend="coreml", artifact="model.mlpackage", files=file_digests(bundle))
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = cli.invoke(app, ["bench", str(bundle), "--json"])
    assert result.exit_code == 2
    assert EMULATOR_REFUSAL in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bandwidth_bound_arithmetic_by_hand():
    # 400 MiB of weights of which a 100 MiB embedding table is stored apart (one row read),
    # 18 MiB of recurrent + conv state, 24 KiB of KV per token, at context 1,024 (24 MiB of KV)
    mib = 2**20
    nbytes = bench.decode_bytes(400 * mib, 100 * mib, 18 * mib, 24 * 1024, 1024)
    assert nbytes == (400 - 100 + 18 + 24) * mib  # 342 MiB
    # at 34.2 * 2**20 * 100 bytes/s the bound is exactly 10 steps per second
    assert bench.bound_tokens_per_s(nbytes, 342 * mib * 10) == pytest.approx(10.0)
    assert bench.decode_bytes(1000, 0, 0, 8, 0) == 1000


def test_measure_bandwidth_reports_a_positive_rate_and_its_method():
    result = bench.measure_bandwidth(megabytes=16, runs=2)
    assert result["read_bytes_per_s"] > 0 and result["copy_bytes_per_s"] > 0
    assert result["array_bytes"] == 16 * 2**20 and "median of 2" in result["method"]


def load_script():
    spec = importlib.util.spec_from_file_location("run_benchmarks", REPO / "benchmarks" / "run_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_executorch_params_for_the_real_0_8b_shape(tmp_path):
    """ExecuTorch's qwen3_5_0_8b parameters, written from the 0.8B config (its published values)."""
    shutil.copyfile(REPO / "qwen_mobile" / "assets" / "shapes" / "0.8b.json", tmp_path / "config.json")
    params = load_script().own_params(tmp_path)
    assert {k: params[k] for k in ("dim", "hidden_dim", "n_heads", "head_dim", "n_kv_heads", "n_layers",
                                   "vocab_size", "linear_num_key_heads", "linear_num_value_heads",
                                   "linear_key_head_dim", "linear_value_head_dim")} == {
        "dim": 1024, "hidden_dim": 3584, "n_heads": 8, "head_dim": 256, "n_kv_heads": 2, "n_layers": 24,
        "vocab_size": 248320, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    }
    assert params["rope_theta"] == 10000000.0 and params["partial_rotary_factor"] == 0.25
    assert params["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + (
        ["linear_attention"] * 3 + ["full_attention"]) * 5
    assert params["use_q_gate"] and params["rms_norm_add_unit_offset"] and params["use_qk_norm"]


def figures(prefill_ms: float, decode_ms: float, rss: int) -> dict:
    """What one `bench --json --runs 1` returns, cut to what the rounds combine."""
    return {"decode_steps": 8, "load_s": 1.0, "busy_cores": 1.5, "peak_rss_bytes": rss, "ttft_ms": prefill_ms,
            "prefill": {"128": bench.summary([prefill_ms / 1e3], 128, calls=1), "512": {"skipped": "n/a"}},
            "decode": {"128": bench.summary([decode_ms / 1e3], 8, positions=[128, 135], ms_per_token=decode_ms / 8)}}


def test_artifacts_are_measured_in_rounds_and_bounded_by_the_readings_beside_them(tmp_path):
    """Two artifacts, three rounds, measured a, b, a, b, a, b with a bandwidth reading before the
    first and after each: figures are medians over the rounds, peak memory the highest, and each
    round's bandwidth is the higher reading around it (a: 70, 60, 90 -> 70; b: 70, 80, 90 -> 80)."""
    readings = iter([30e9, 70e9, 20e9, 60e9, 80e9, 90e9, 40e9])
    decode_ms = iter([100.0, 200.0, 300.0, 250.0, 110.0, 210.0])
    order = []

    def measure(name, path, index):
        order.append((name, path.name, index))
        return figures(1000.0, next(decode_ms), rss=len(order))

    results, bandwidth = bench.measure_interleaved(
        {"a": tmp_path / "a.pte", "b": tmp_path / "b"}, measure, 3,
        read_bandwidth=lambda: {"read_bytes_per_s": next(readings), "copy_bytes_per_s": 1.0, "method": "stub"})
    assert order == [("a", "a.pte", 0), ("b", "b", 0), ("a", "a.pte", 1), ("b", "b", 1), ("a", "a.pte", 2), ("b", "b", 2)]
    assert bandwidth["readings"] == [30e9, 70e9, 20e9, 60e9, 80e9, 90e9, 40e9]
    assert bandwidth["per_artifact"] == {"a": 70e9, "b": 80e9}
    assert results["a"]["decode"]["128"]["median_ms"] == pytest.approx(110.0)  # of 100, 300, 110
    assert results["b"]["decode"]["128"]["median_ms"] == pytest.approx(210.0)  # of 200, 250, 210
    assert results["a"]["decode"]["128"]["tokens_per_s"] == pytest.approx(8 / 0.110)
    assert results["a"]["decode"]["128"]["ms_per_token"] == pytest.approx(110.0 / 8)
    assert results["a"]["prefill"]["512"] == {"skipped": "n/a"} and results["a"]["runs"] == 3
    assert results["a"]["ttft_ms"] == pytest.approx(1000.0) and len(results["a"]["rounds"]) == 3
    assert results["a"]["peak_rss_bytes"] == 5 and results["b"]["peak_rss_bytes"] == 6


def test_an_artifact_that_fails_is_not_measured_again_and_reports_its_error():
    readings = iter([float(i) for i in range(1, 20)])
    order = []

    def measure(name, path, index):
        order.append((name, index))
        return {"error": "error: boom"} if name == "bad" else figures(1000.0, 100.0, rss=1)

    results, bandwidth = bench.measure_interleaved(
        {"bad": Path("bad"), "good": Path("good")}, measure, 3,
        read_bandwidth=lambda: {"read_bytes_per_s": next(readings), "copy_bytes_per_s": 1.0, "method": "stub"})
    assert order == [("bad", 0), ("good", 0), ("good", 1), ("good", 2)]
    assert results["bad"] == {"error": "error: boom"} and results["good"]["runs"] == 3
    assert len(bandwidth["readings"]) == 5
    assert bench.combine_rounds([figures(1000.0, 100.0, 1), {"error": "late"}]) == {"error": "late"}


def test_weight_bytes_follow_the_plan_and_count_a_tied_table_once():
    from qwen_mobile.checkpoint import open_checkpoint
    from qwen_mobile.models.qwen3_5 import Qwen35

    config = open_checkpoint(None).config
    assert config.tie_word_embeddings
    with torch.device("meta"):
        model = Qwen35(config)
    parameters = dict(model.named_parameters())  # a tied lm_head is listed once
    table = config.vocab_size * config.hidden_size
    assert bench.weight_bytes_estimate(config, None) == (4 * sum(p.numel() for p in parameters.values()), 4 * table)
    # one 4-bit linear in groups of 32 and an 8-bit per-channel table: every other weight stays fp32
    name = next(n for n, p in parameters.items() if p.dim() == 2 and "embed" not in n)
    rows, columns = parameters[name].shape
    quant = {"layers": {name: {"bits": 4, "group_size": 32}}, "embedding_bits": 8}
    total, embedding = bench.weight_bytes_estimate(config, quant)
    assert total == 4 * sum(p.numel() for p in parameters.values()) - 4 * rows * columns + (
        rows * columns // 2 + rows * (columns // 32) * 4)
    assert embedding == table + config.vocab_size * 4  # int8 + one scale per row


def test_decode_bounds_use_the_reading_beside_each_artifact_and_drop_a_separate_table():
    from qwen_mobile.checkpoint import open_checkpoint
    from qwen_mobile.info import describe

    checkpoint = open_checkpoint(None)
    shared, table = bench.weight_bytes_estimate(checkpoint.config, None)
    info = describe(checkpoint)
    state, kv = info["recurrent_state_bytes_per_sequence"], info["kv_cache_bytes_per_token"]["fp32"]
    decode = {"128": bench.summary([0.1], 8, positions=[128, 151], ms_per_token=12.5), "1024": {"skipped": "n/a"}}
    results = {"tied": {"artifact_bytes": shared, "decode": decode},
               "apart": {"artifact_bytes": shared + table, "decode": decode},
               "unknown": {"artifact_bytes": shared, "decode": decode}}
    bounds = bench.decode_bounds(results, checkpoint, {"tied": 1e9, "apart": 2e9, "unknown": 1e9},
                                 {"tied": None, "apart": None})
    assert set(bounds) == {"tied", "apart"}  # no quantization known: no bound
    assert not bounds["tied"]["embedding_stored_apart"] and bounds["apart"]["embedding_stored_apart"]
    for name, bandwidth in (("tied", 1e9), ("apart", 2e9)):
        at = bounds[name]["contexts"]
        assert set(at) == {"128"}
        assert at["128"]["bytes_per_step"] == shared + state + kv * 139  # the middle of positions 128..151
        assert at["128"]["bound_tokens_per_s"] == pytest.approx(bandwidth / at["128"]["bytes_per_step"])
        assert at["128"]["fraction"] == pytest.approx(80.0 / at["128"]["bound_tokens_per_s"])


def test_time_v_output_is_parsed(tmp_path):
    log = tmp_path / "time.txt"
    log.write_text("\tElapsed (wall clock) time (h:mm:ss or m:ss): 12:03.50\n"
                   "\tMaximum resident set size (kbytes): 7340032\n")
    assert load_script().parse_time_v(log) == {"wall_s": 723.5, "peak_rss_bytes": 7340032 * 1024, "log": str(log)}


def script_args(**overrides):
    import argparse

    values = {"reuse": {}, "time_v": {}, "ungated": [], "skip_export": False, "tflite_context": 1280,
              "export_timeout": 60.0}
    return argparse.Namespace(**{**values, **overrides})


def test_ungated_exports_are_bundles_written_by_the_cli_with_no_gate(monkeypatch, tmp_path):
    """--ungated: `qwen-mobile export ... --no-gate` in a child process (no code in strings), into
    NAME-ungated, recorded as ungated; the others are the same command without --no-gate."""
    script = load_script()
    commands = []

    def run_child(command, log, timeout=None, heavy=False, cwd=None):
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        return {"command": " ".join(command), "returncode": 0, "wall_s": 1.0, "peak_rss_bytes": 1, "log": str(log),
                "timed_out": False}

    monkeypatch.setattr(script, "run_child", run_child)
    exports = {}
    args = script_args(ungated=["executorch-8da4w-g128", "tflite-8da8w"])
    checkpoint = tmp_path / "checkpoint"
    assert script.export_ours("executorch-8da4w-g128", checkpoint, tmp_path, args, exports) == (
        tmp_path / "executorch-8da4w-g128-ungated")
    assert script.export_ours("tflite-8da8w", checkpoint, tmp_path, args, exports) == tmp_path / "tflite-8da8w-ungated"
    assert script.export_ours("executorch-fp32", checkpoint, tmp_path, args, exports) == tmp_path / "executorch-fp32"
    g128, tflite, fp32 = commands
    assert "-c" not in g128 and g128[1:4] == ["-m", "qwen_mobile", "export"]
    assert g128[-3:] == ["--group-size", "128", "--no-gate"] and "--no-gate" not in fp32
    assert tflite[-3:] == ["--no-gate", "--max-context", "1280"]
    assert exports["executorch-8da4w-g128"]["status"] == "ungated" and exports["executorch-fp32"]["status"] == "ok"
    # a finished export is reused, not run again
    assert script.export_ours("executorch-fp32", checkpoint, tmp_path, args, exports) == tmp_path / "executorch-fp32"
    assert len(commands) == 3


def test_each_artifact_is_measured_by_bench_json_or_measure_pte_in_a_child(monkeypatch, tmp_path):
    script = load_script()
    commands = []

    def run_child(command, log, timeout=None, heavy=False, cwd=None):
        commands.append(command)
        Path(log).write_text('warning: something\n{\n  "runs": 1\n}\n')
        return {"returncode": 0}

    monkeypatch.setattr(script, "run_child", run_child)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "own.pte").write_bytes(b"")
    assert script.measure(tmp_path / "bundle", tmp_path / "a.log") == {"runs": 1}
    assert script.measure(tmp_path / "own.pte", tmp_path / "b.log") == {"runs": 1}
    assert commands[0][1:] == ["-m", "qwen_mobile", "bench", str(tmp_path / "bundle"), "--json", "--runs", "1"]
    assert commands[1][2:] == ["--measure-pte", str(tmp_path / "own.pte"), "--runs", "1"]


def test_a_bare_pte_is_measured_by_the_same_code_as_its_bundle(tiny_bundle):
    """The script's --measure-pte on the bundle's own model.pte: the runtime's lengths read from the
    program, thread counts from the backend, the same fields as `bench --json`."""
    measured = load_script().measure_pte(tiny_bundle / "model.pte", runs=1)
    benched = bench.bench_bundle(tiny_bundle, runs=1)
    assert set(measured) == set(benched)
    assert (measured["max_chunk"], measured["max_context"]) == (benched["max_chunk"], benched["max_context"])
    assert measured["threads"].keys() == benched["threads"].keys() and measured["threads"]["executorch"] >= 1
    assert measured["gated"] is False and measured["artifact_bytes"] == benched["artifact_bytes"]
    for context in ("128", "1024"):
        assert measured["decode"][context]["positions"] == benched["decode"][context]["positions"]
        assert measured["decode"][context]["tokens_per_s"] > 0


def test_report_keeps_the_notes_and_marks_ungated_and_bare_artifacts(tmp_path):
    script = load_script()
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# old tables\n\n## Notes\n\nwritten by hand\n")
    one = figures(1000.0, 100.0, rss=2**30)
    results = {
        "executorch-8da4w": {**one, "bundle": "/w/b", "artifact": "model.pte", "gated": False, "artifact_bytes": 2**20},
        "old": {**one, "bundle": "/w/old.pte", "artifact": "old.pte", "gated": False, "artifact_bytes": 2**20},
    }
    meta = {"model": "m", "command": "c", "date": "d", "machine": "x", "versions": "v", "threads": "t", "runs": 3,
            "decode_steps": 8, "artifacts": ["executorch-8da4w", "old"]}
    bandwidth = {"method": "stub", "readings": [1e9, 2e9, 3e9], "copy_bytes_per_s": 1e9,
                 "per_artifact": {"executorch-8da4w": 2e9, "old": 3e9}}
    text = script.write_report(results_md, meta, {}, results, bandwidth, {})
    assert "| executorch-8da4w (--no-gate) | 1 |" in text and "| old (bare .pte) | 1 |" in text
    assert "| 2.0 |" in text and "| 3.0 |" in text  # the bandwidth beside each artifact
    assert "# old tables" not in text and text.endswith("## Notes\n\nwritten by hand\n")
    assert results_md.read_text() == text
