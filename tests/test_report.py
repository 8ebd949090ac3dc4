"""`qwen-mobile report`: its figures recomputed here from the bundle's runtime and the float model,
its agreement with the export gate's figures, refusals kept in the report, and bad input."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from qwen_mobile.bundle import open_runner
from qwen_mobile.checkpoint import load
from qwen_mobile.cli import app
from qwen_mobile.corpus import load_corpus, split_corpus
from qwen_mobile.generate import load_tokenizer
from qwen_mobile.report import ReportRequest, build_report
from qwen_mobile.report_render import write_report

EVAL_TOKENS = 200  # one window, covering the gate's 161 positions
cli = CliRunner()


@pytest.fixture(scope="module")
def int8_report(embedded_bundle, tmp_path_factory):
    """The report on the gated ExecuTorch int8 bundle of the embedded model, as written to report.json."""
    bundle = embedded_bundle("executorch", "int8")
    out = tmp_path_factory.mktemp("report") / "out"
    request = ReportRequest.checked([str(bundle)], out, None, None, "rtn", None, None, None)
    written = write_report(build_report(request, out, eval_tokens=EVAL_TOKENS, drift_lengths=(16, 48), snr_tokens=32),
                           out)
    return bundle, out, written, json.loads((out / "report.json").read_text())


def test_figures_match_an_independent_computation(int8_report):
    bundle, _, _, report = int8_report
    (row,) = report["artifacts"]
    ids = load_tokenizer(bundle).encode(split_corpus(load_corpus())[1][:EVAL_TOKENS * 16], add_special_tokens=False)
    ids = ids[:EVAL_TOKENS]
    runner, _ = open_runner(bundle)
    artifact = torch.stack([runner.step([token], position).reshape(-1).float()
                            for position, token in enumerate(ids[:-1])])
    model = load(None).model
    with torch.no_grad():  # the float model in one call over every position, not stepwise as the report feeds it
        float_logits, _ = model(torch.tensor([ids[:-1]]), torch.tensor([0]), model.init_state(len(ids)),
                                all_positions=True)
    float_logits = float_logits[0]
    nll = -artifact.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    p = float_logits.softmax(-1)
    kl = (p * (p.log() - artifact.log_softmax(-1))).sum(-1).mean().item()

    assert row["eval_positions"] == len(ids) - 1
    assert row["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert row["mean_kl"] == pytest.approx(kl, rel=1e-3)
    assert 1e-6 < row["mean_kl"] < 1e-2  # int8 moved the distribution, a little
    assert row["top1_agreement"] == pytest.approx((float_logits.argmax(-1) == artifact.argmax(-1)).float().mean().item())
    assert row["artifact_bytes"] == (bundle / "model.pte").stat().st_size


def test_figures_agree_with_the_manifest_gate(int8_report):
    bundle, _, _, report = int8_report
    (row,) = report["artifacts"]
    gate = json.loads((bundle / "manifest.json").read_text())["parity"]["versus_float"]
    assert row["manifest_versus_float"] == gate
    here = row["at_gate_positions"]
    assert here["positions"] == 100
    # the same tokens and positions through the same runtime; only the feeding differs (prefill chunks there)
    assert here["mean_kl"] == pytest.approx(gate["mean_kl"], rel=0.05)
    assert here["top1_agreement"] == pytest.approx(gate["top1_agreement"], abs=0.011)


def test_outputs_plans_and_drift(int8_report):
    _, out, written, report = int8_report
    assert {path.name for path in written} == {"report.html", "report.md", "report.json", "quality.png", "snr.png",
                                              "drift.png"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    (plan,) = report["plans"].values()
    assert len(plan["tensors"]) == 52 and all(30 < t["snr_db"] < 80 for t in plan["tensors"])  # int8: ~45 dB
    drift = plan["drift"]
    assert drift["lengths"] == [16, 48] and "eager with the plan" in drift["measured_in"]
    assert set(drift["state_relative_error"]) == {"layer0", "layer1", "layer2", "layer4", "layer5", "layer6"}
    assert all(0 < e < 0.1 for errors in drift["state_relative_error"].values() for e in errors)


def test_a_refused_combination_is_reported_not_raised(tmp_path):
    out = tmp_path / "out"
    request = ReportRequest.checked([], out, "executorch", "int4", "rtn", None, None, None)
    report = build_report(request, out)
    (row,) = report["artifacts"]
    assert row["status"] == "refused" and "not supported by the executorch backend" in row["reason"]
    assert {p.name for p in write_report(report, out)} == {"report.html", "report.md", "report.json"}
    assert "refused" in (out / "report.md").read_text()


@pytest.mark.parametrize("arguments, message", [
    (["-b", "nope", "-q", "int8"], "--backend 'nope' is unknown"),
    (["-b", "executorch", "-q", "int3"], "--quant 'int3' is unknown"),
    (["-b", "executorch", "-q", "int8", "--method", "awq"], "--method 'awq' is unknown"),
    (["-b", "executorch", "-q", "int8", "--eval", "{missing}"], "--eval"),
    (["{missing}"], "not a bundle directory"),
    (["-b", "executorch", "-q", "int8", "--out", "{file}"], "exists and is not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, arguments, message):
    (tmp_path / "file").write_text("x")
    arguments = [a.format(missing=tmp_path / "missing", file=tmp_path / "file") for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "out")]
    result = cli.invoke(app, ["report", *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
