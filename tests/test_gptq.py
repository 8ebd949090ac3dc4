"""GPTQ plans: the update on one linear, and whole plans that keep every invariant of the RTN
plans the backends encode (integers in range, int8, bf16-exact scales rounded up, symmetric,
narrow 8-bit under dynamic activations, tied lm_head sharing the embedding's integers)."""

import pytest
import torch
from torch import nn

from qwen_mobile.checkpoint import load
from qwen_mobile.quant.gptq import (
    GPTQ_METHOD,
    SCALE_SHRINK,
    GptqOptions,
    LayerwiseRunner,
    WeightSpec,
    gptq_plan,
    gptq_weight,
    rounded_weight,
    rtn_plan,
    rtn_weight,
    searched_scale,
    weight_specs,
)
from qwen_mobile.quant.plan import FLOAT_LINEARS, bf16_ceil, make_plan, planned_modules, resolve_scheme

SCHEMES = [("int4", {}), ("8da4w", {}), ("int8", {}), ("8da8w", {}), ("int4", {"embeddings_8bit": True}),
           ("int4", {"group_size": 64})]



@pytest.fixture(scope="module")
def samples():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 4096, (length,), generator=generator).tolist() for length in (48, 33, 64, 40)]


def correlated_inputs(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Inputs whose features are correlated and unevenly scaled, as real activations are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    energy = torch.logspace(0, 1.5, columns)[torch.randperm(columns, generator=generator)]
    return (torch.randn(rows, columns, generator=generator) @ mixing + 0.3 * torch.randn(rows, columns, generator=generator)) * energy


def assert_invariants(q, spec: WeightSpec, weight: torch.Tensor, searched: bool = False):
    qmin, qmax = -(1 << (spec.bits - 1)) + int(spec.narrow), (1 << (spec.bits - 1)) - 1
    assert q.qdata.dtype == torch.int8 and q.qdata.shape == weight.shape
    assert qmin <= q.qdata.min().item() and q.qdata.max().item() <= qmax
    assert (q.bits, q.group_size, q.activations) == (spec.bits, spec.group_size, spec.activations)
    assert torch.equal(q.zero_point, torch.zeros_like(q.scale, dtype=torch.int8))
    assert torch.equal(q.scale, q.scale.to(torch.bfloat16).float())
    rtn = rtn_weight(weight, spec).scale
    if not searched:
        assert torch.equal(q.scale, rtn)  # scales fixed before the update: RTN's own
    else:  # or one of the searched candidates: RTN's shrunk, rounded up to bf16
        candidates = torch.stack([rtn] + [bf16_ceil(rtn * shrink) for shrink in SCALE_SHRINK[1:]])
        assert torch.all((candidates == q.scale).any(0)) and torch.all(q.scale <= rtn)


@pytest.mark.parametrize("bits, group, narrow, act_order", [(4, 32, False, True), (4, 32, False, False),
                                                            (4, 128, False, True), (8, 128, True, True)])
def test_gptq_cuts_a_linears_output_error_on_its_calibration_inputs(bits, group, narrow, act_order):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 128, generator=generator) * 0.05
    inputs = correlated_inputs(1024, 128, seed=2)
    spec = WeightSpec("w", bits, group, None, narrow)
    rtn, gptq = rtn_weight(weight, spec), gptq_weight(weight, inputs.T @ inputs, spec, act_order=act_order)
    assert_invariants(gptq, spec, weight)
    reference = inputs @ weight.T
    rtn_error = (inputs @ rtn.dequantize().T - reference).norm()
    gptq_error = (inputs @ gptq.dequantize().T - reference).norm()
    assert gptq_error < 0.8 * rtn_error
    assert not torch.equal(gptq.qdata, rtn.qdata)


def test_without_correlations_to_exploit_gptq_is_round_to_nearest():
    """A diagonal Hessian moves no column: the integers are RTN's, bit for bit (same rounding)."""
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    spec = WeightSpec("w", 4, 32, None, False)
    hessian = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5)
    assert torch.equal(gptq_weight(weight, hessian, spec).qdata, rtn_weight(weight, spec).qdata)
    # a dead input (never nonzero on the calibration text) rounds to nearest instead of breaking the solve
    hessian[5, 5] = 0.0
    assert torch.equal(gptq_weight(weight, hessian, spec).qdata, rtn_weight(weight, spec).qdata)


@pytest.mark.parametrize("name, options", SCHEMES)
def test_weight_specs_decide_what_make_plan_decides(model, name, options):
    scheme = resolve_scheme(name, **options)
    ours, theirs = rtn_plan(model, scheme), make_plan(model, scheme)
    assert ours.kept_float == theirs.kept_float and list(ours.weights) == list(theirs.weights)
    for key, weight in theirs.weights.items():
        mine = ours.weights[key]
        assert (mine.bits, mine.group_size, mine.activations) == (weight.bits, weight.group_size, weight.activations)
        assert torch.equal(mine.qdata, weight.qdata) and torch.equal(mine.scale, weight.scale)
    assert ours.weights["lm_head.weight"].qdata is ours.weights["embed_tokens.weight"].qdata


def test_keeping_a_weight_at_8_bits_is_per_channel_and_narrow_under_dynamic_activations(model):
    keep = ["layers.0.linear_attn.out_proj.weight", "lm_head.weight"]
    specs, _ = weight_specs(model, resolve_scheme("8da4w"), keep)
    for name in keep + ["embed_tokens.weight"]:  # the tied embedding goes with its lm_head
        assert (specs[name].bits, specs[name].group_size, specs[name].narrow) == (8, 192, True)
    assert specs["layers.0.mlp.up_proj.weight"].bits == 4
    assert not weight_specs(model, resolve_scheme("int4"), keep)[0][keep[0]].narrow
    with pytest.raises(ValueError, match="no planned weight: layers.0.nope.weight"):
        weight_specs(model, resolve_scheme("int4"), ["layers.0.nope.weight"])


def test_the_layerwise_runner_is_the_models_own_forward(model, samples):
    runner = LayerwiseRunner(model, samples)
    with torch.no_grad():
        for index in range(len(model.layers)):
            runner.advance(runner.run_layer(index))
        for sample, normed in zip(samples, runner.final_normed()):
            ids = torch.tensor([sample])
            expected, _ = model(ids, torch.tensor([0]), model.init_state(len(sample)), all_positions=True)
            assert torch.allclose(model.lm_head(normed), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["int4", "8da8w"])
def test_a_gptq_plan_of_the_embedded_model_keeps_every_invariant(model, samples, name):
    scheme = resolve_scheme(name)
    rtn = make_plan(model, scheme)
    plan = gptq_plan(model, scheme, samples)  # the defaults: searched scales, tied head by GPTQ
    specs, kept_float = weight_specs(model, scheme)
    assert plan.method == GPTQ_METHOD and plan.kept_float == rtn.kept_float == kept_float
    assert set(plan.kept_float) == {n for n in planned_modules(model) if n.rsplit(".", 2)[-2] in FLOAT_LINEARS}
    assert list(plan.weights) == list(rtn.weights)
    modules = planned_modules(model)
    for key, weight in plan.weights.items():
        assert_invariants(weight, specs[key], modules[key].weight, searched=True)
        assert not torch.equal(weight.qdata, rtn.weights[key].qdata), key
    head, embedding = plan.weights["lm_head.weight"], plan.weights["embed_tokens.weight"]
    assert head.qdata is embedding.qdata and head.scale is embedding.scale
    assert head.activations == scheme.activations and embedding.activations is None
    manifest = plan.to_manifest()
    assert manifest["method"] == GPTQ_METHOD and manifest["calibration"]["samples"] == len(samples)
    assert manifest["layers"] == rtn.to_manifest()["layers"]


def test_gptq_on_rtn_scales_with_an_rtn_tied_head_and_sequential_layers(model, samples):
    scheme = resolve_scheme("8da4w")
    options = GptqOptions(search_scales=False, tied_head="rtn", sequential=True)
    plan, rtn = gptq_plan(model, scheme, samples, options=options), make_plan(model, scheme)
    specs, _ = weight_specs(model, scheme)
    modules = planned_modules(model)
    for key, weight in plan.weights.items():
        assert_invariants(weight, specs[key], modules[key].weight)
        assert torch.equal(weight.qdata, rtn.weights[key].qdata) == (key in ("embed_tokens.weight", "lm_head.weight"))
    assert plan.weights["lm_head.weight"].qdata is plan.weights["embed_tokens.weight"].qdata


def test_searched_scales_never_round_worse_than_round_to_nearest():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(5)) * 0.05
    spec = WeightSpec("w", 4, 32, None, False)
    importance = torch.rand(96, generator=torch.Generator().manual_seed(6))
    for given in (None, importance):
        scale = searched_scale(weight, spec, given)
        weights = torch.ones(96) if given is None else given

        def cost(q, weights=weights):
            return ((q.dequantize() - weight) ** 2 * weights).reshape(64, 3, 32).sum(-1)

        assert torch.all(cost(rounded_weight(weight, spec, scale)) <= cost(rtn_weight(weight, spec)) + 1e-12)
        assert (scale < rtn_weight(weight, spec).scale).float().mean() > 0.2  # the search finds better, often


def test_an_untied_lm_head_is_gptqd_and_group_fallbacks_hold(random_checkpoints):
    untied = load(str(random_checkpoints["grouped3"][0])).model.eval()
    scheme = resolve_scheme("int4", group_size=64)
    samples = [torch.randint(0, untied.config.vocab_size, (40,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in range(3)]
    plan, rtn = gptq_plan(untied, scheme, samples), make_plan(untied, scheme)
    assert plan.group_fallbacks() == rtn.group_fallbacks() and plan.group_fallbacks()
    assert plan.weights["lm_head.weight"].qdata is not plan.weights["embed_tokens.weight"].qdata
    assert not torch.equal(plan.weights["lm_head.weight"].qdata, rtn.weights["lm_head.weight"].qdata)
    specs, _ = weight_specs(untied, scheme)
    modules = planned_modules(untied)
    for key, weight in plan.weights.items():
        assert_invariants(weight, specs[key], modules[key].weight, searched=True)


def test_gptq_needs_samples(model):
    with pytest.raises(ValueError, match="calibration samples"):
        gptq_plan(model, resolve_scheme("int4"), [])
    assert not gptq_plan(model, resolve_scheme("fp32"), [[1, 2, 3]]).weights
    assert isinstance(model.layers[0].mlp.up_proj, nn.Linear)
