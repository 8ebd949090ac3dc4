"""calibrated_plan: the one call `qwen-mobile export` makes for --method, --keep-8bit, --size-budget."""

import pytest
import torch

from qwen_mobile.checkpoint import EMBEDDED_MODEL
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.generate import load_tokenizer
from qwen_mobile.quant.calibrate import calibrated_plan, load_calibration
from qwen_mobile.quant.plan import make_plan, resolve_scheme



@pytest.fixture(scope="module")
def samples():
    return load_calibration("default", load_tokenizer(EMBEDDED_MODEL), max_samples=3, max_tokens=48)


def test_rtn_without_keeps_is_make_plan_unchanged(model):
    scheme = resolve_scheme("8da4w")
    plan, rtn = calibrated_plan(model, scheme), make_plan(model, scheme)
    assert plan.to_manifest() == rtn.to_manifest() and plan.calibration is None
    assert all(torch.equal(plan.weights[n].qdata, w.qdata) for n, w in rtn.weights.items())
    assert rtn.to_manifest()["method"] == "round_to_nearest_symmetric"


def test_gptq_and_auto_record_the_calibration_they_saw(model, samples):
    scheme = resolve_scheme("int4")
    plan = calibrated_plan(model, scheme, "gptq", samples, calibration="default")
    record = plan.to_manifest()["calibration"]
    assert plan.method == "gptq_symmetric" and record["set"] == "default"
    assert record["samples"] == 3 and record["tokens"] == sum(map(len, samples))
    mixed = calibrated_plan(model, scheme, "rtn", samples, keep_8bit="auto", size_budget=0.03, calibration="chat")
    assert mixed.calibration["keep_8bit"]["kept"] and mixed.calibration["set"] == "chat"
    assert mixed.calibration["keep_8bit"]["size"]["fraction"] == 0.03


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="awq"), "--method 'awq' is unknown; methods: rtn, gptq"),
        (dict(method="gptq"), "--method gptq needs calibration text"),
        (dict(keep_8bit="auto"), "--keep-8bit auto needs calibration text"),
        (dict(size_budget=0.2), "--size-budget bounds --keep-8bit auto"),
        (dict(keep_8bit="auto", size_budget=-1, samples=[[1, 2]]), "--size-budget -1"),
        (dict(keep_8bit=["layers.0.nope.weight"]), "no planned weight: layers.0.nope.weight"),
    ],
)
def test_bad_requests_are_one_line_errors_naming_the_flag(model, kwargs, message):
    with pytest.raises(QwenMobileError) as error:
        calibrated_plan(model, resolve_scheme("int4"), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(QwenMobileError, match="apply to quantized schemes, not to fp16"):
        calibrated_plan(model, resolve_scheme("fp16"), "gptq", [[1, 2]])
