"""A single-plan export frees the float weights it no longer needs (export.write_bundle's
release_float_weights, parity.references' keep_float) and holds no dequantized copy of a weight
(quant.eager.dequantized computes from the plan's integers): the gate's references are the same,
and lowering reads no weight that was released."""

import json

import pytest
import torch

from qwen_mobile.backends.executorch.backend import ExecuTorchBackend
from qwen_mobile.checkpoint import EMBEDDED_MODEL, load_checkpoint, open_checkpoint
from qwen_mobile.errors import QwenMobileError
from qwen_mobile.export import prepare_target, write_bundle
from qwen_mobile.memory import linear, widen_unplanned, widened
from qwen_mobile.parity import float_reference, references
from qwen_mobile.quant.eager import dequantized
from qwen_mobile.quant.plan import make_plan, planned_modules, resolve_scheme, round_to_nearest


def loaded_and_planned(quant: str = "8da4w", matrices_at_rest: bool = False):
    checkpoint = open_checkpoint(None)
    loaded = load_checkpoint(checkpoint, matrices_at_rest=matrices_at_rest)
    return prepare_target(checkpoint, "executorch", quant, None), loaded, make_plan(loaded.model, resolve_scheme(quant))


def test_references_without_the_float_weights_are_the_same_references(embedded_bundle):
    """What the gate compares against, bit for bit, whether the float model is kept whole in
    float32 or held as export_bundle holds it: matrices at rest in the checkpoint's bf16
    (memory.py), the float reference made first, then the plan made releasing each float weight
    as it goes, the plan's passes computing from its integers. The plan is the same too. That
    lowering then reads no released weight is the next test, and the bundle it writes is the one
    every ExecuTorch 8da4w test checks."""
    target, kept_model, kept_plan = loaded_and_planned()
    freed_model = load_checkpoint(open_checkpoint(None), matrices_at_rest=True)
    modules = planned_modules(freed_model.model)
    assert {module.weight.dtype for module in modules.values()} == {torch.bfloat16}
    float_logits = float_reference(freed_model.model, target.lengths, EMBEDDED_MODEL)
    plan = make_plan(freed_model.model, resolve_scheme("8da4w"), release_float=True)
    assert all(modules[name].weight.is_meta for name in plan.weights)
    assert freed_model.model.lm_head.weight is freed_model.model.embed_tokens.weight  # still tied
    assert plan.weights.keys() == kept_plan.weights.keys()
    for name, weight in plan.weights.items():
        expected = kept_plan.weights[name]
        assert torch.equal(weight.qdata, expected.qdata) and torch.equal(weight.scale, expected.scale), name
        assert weight.activations == expected.activations, name
    assert plan.weights["lm_head.weight"].qdata is plan.weights["embed_tokens.weight"].qdata
    widen_unplanned(freed_model.model, plan)
    assert all(modules[name].weight.dtype == torch.float32 for name in plan.kept_float)
    kept = references(kept_model.model, target.lengths, kept_plan, tokenizer_dir=EMBEDDED_MODEL)
    freed = references(freed_model.model, target.lengths, plan, tokenizer_dir=EMBEDDED_MODEL, keep_float=False,
                       float_logits=float_logits)
    for field in ("tokens", "float_logits", "logits"):
        assert torch.equal(getattr(kept, field), getattr(freed, field)), field
    assert kept.gate == freed.gate and kept.noise_floor == freed.noise_floor and kept.noise_floor is not None
    assert not any(parameter.is_meta for parameter in kept_model.model.parameters())
    released = json.loads((embedded_bundle("executorch", "8da4w") / "manifest.json").read_text())
    assert released["parity"]["passed"] and released["parity"]["max_mean_kl"] == kept.gate.max_mean_kl


def test_an_export_makes_its_float_reference_before_the_plan_releases_the_float_weights(monkeypatch, tmp_path):
    """export_bundle's order where the lowering reads only the plan: the float reference sees every
    float weight, and by the gate's plan passes the plan has released them all (so the float
    matrices and the integers are never held whole together)."""
    import qwen_mobile.parity as parity
    from qwen_mobile.export import export_bundle

    seen = {}
    float_reference_of = parity.float_reference

    def recorded_float_reference(model, *args, **kwargs):
        seen["at the float reference"] = {module.weight.is_meta for module in planned_modules(model).values()}
        return float_reference_of(model, *args, **kwargs)

    def plan_references(model, lengths, plan, **kwargs):
        modules = planned_modules(model)
        seen["at the plan's references"] = {modules[name].weight.is_meta for name in plan.weights}
        seen["float logits"] = kwargs["float_logits"]
        raise Lowered

    monkeypatch.setattr(parity, "float_reference", recorded_float_reference)
    monkeypatch.setattr(parity, "references", plan_references)
    with pytest.raises(Lowered):
        export_bundle(None, "executorch", "8da4w", tmp_path / "bundle")
    assert seen["at the float reference"] == {False}
    assert seen["at the plan's references"] == {True}
    assert seen["float logits"] is not None and seen["float logits"].shape[0] == 100
    assert not (tmp_path / "bundle").exists()


class Lowered(QwenMobileError):
    """Stops the export where lowering begins (a QwenMobileError, so the core passes it on as is)."""


@pytest.mark.parametrize("reads_planned_weights", [False, True])
def test_lowering_sees_the_planned_float_weights_only_where_the_backend_reads_them(monkeypatch, tmp_path,
                                                                                   reads_planned_weights):
    seen = {}

    def lower(self, target, directory):
        seen.update({name: module.weight.is_meta for name, module in planned_modules(target.model).items()})
        raise Lowered

    monkeypatch.setattr(ExecuTorchBackend, "lower", lower)
    monkeypatch.setattr(ExecuTorchBackend, "lowering_reads_planned_weights", reads_planned_weights)
    target, loaded, plan = loaded_and_planned()
    with pytest.raises(Lowered):
        write_bundle(target, loaded, plan, tmp_path / "bundle", gate=False, release_float_weights=True)
    assert {name for name, meta in seen.items() if meta} == (set() if reads_planned_weights else set(plan.weights))
    assert plan.kept_float and not any(seen[name] for name in plan.kept_float)


def test_dequantized_without_the_float_weights_computes_the_same_from_the_plans_integers():
    kept, freed = (load_checkpoint(open_checkpoint(None)).model for _ in range(2))
    plan = make_plan(kept, resolve_scheme("8da4w"))
    tokens = torch.arange(9).reshape(1, 9)
    with torch.no_grad():
        with dequantized(kept, plan):
            expected, _ = kept(tokens, torch.tensor([0]), kept.init_state(16))
        with dequantized(freed, plan, keep_float=False):
            got, _ = freed(tokens, torch.tensor([0]), freed.init_state(16))
    assert torch.equal(got, expected)
    modules = planned_modules(freed)
    assert all(modules[name].weight.is_meta for name in plan.weights)  # released, and no dequantized copy held
    assert freed.lm_head.weight is freed.embed_tokens.weight
    assert not any(parameter.is_meta for parameter in kept.parameters())  # the plain path gives the float weights back
    assert kept.lm_head.weight is kept.embed_tokens.weight
    assert not any("forward" in vars(module) for module in modules.values())


@pytest.mark.parametrize("quant", ["int8", "int4", "8da4w"])
def test_the_plans_pass_is_the_one_with_its_dequantized_weights_in_place_bit_for_bit(quant):
    """What dequantized computes from the integers, against the plain way: the plan's dequantized
    float32 weights swapped into the model, every Linear through memory.linear's blocks."""
    from qwen_mobile.quant.eager import INT8_ASYMMETRIC_PER_TOKEN, quantize_per_token
    from qwen_mobile.quant.plan import replaced_weights

    model = load_checkpoint(open_checkpoint(None)).model
    plan = make_plan(model, resolve_scheme(quant))
    tokens = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(3))
    dynamic = [planned_modules(model)[name] for name, weight in plan.weights.items()
               if weight.activations == INT8_ASYMMETRIC_PER_TOKEN]
    hooks = [module.register_forward_pre_hook(lambda module, args: (quantize_per_token(args[0]),))
             for module in dynamic]
    try:
        dequantized_values = {name: weight.dequantize() for name, weight in plan.weights.items()}
        with torch.no_grad(), widened(model), replaced_weights(model, dequantized_values):
            expected, _ = model(tokens, torch.tensor([0]), model.init_state(32), all_positions=True)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad(), widened(model), dequantized(model, plan):
        got, _ = model(tokens, torch.tensor([0]), model.init_state(32), all_positions=True)
    assert torch.equal(got, expected)


def test_8bit_references_at_rest_are_the_float32_models():
    """8-bit integers times bf16 scales need more than fp16's 11 significant bits; the plan's passes
    compute them in float32 from the integers whatever dtype the float weights were held in."""
    target, wide, wide_plan = loaded_and_planned("int8")
    _, narrow, plan = loaded_and_planned("int8", matrices_at_rest=True)
    wide_refs = references(wide.model, target.lengths, wide_plan, tokenizer_dir=EMBEDDED_MODEL, keep_float=False)
    narrow_refs = references(narrow.model, target.lengths, plan, tokenizer_dir=EMBEDDED_MODEL, keep_float=False)
    for field in ("tokens", "float_logits", "logits"):
        assert torch.equal(getattr(wide_refs, field), getattr(narrow_refs, field)), field


def test_widened_leaves_the_model_as_it_was_even_when_a_call_fails():
    model = load_checkpoint(open_checkpoint(None), matrices_at_rest=True).model
    held = {name: module.weight for name, module in planned_modules(model).items()}
    with pytest.raises(RuntimeError), widened(model):
        model.layers[0].mlp.down_proj(torch.zeros(3, 5))  # the wrong width
    for name, module in planned_modules(model).items():
        assert module.weight is held[name] and "forward" not in vars(module) and not module._forward_hooks, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_widens_block_by_block_to_the_float32_sums(dtype):
    """memory.linear on a weight held in any dtype gives what it gives on the same values in
    float32, for shapes that are and are not a whole number of blocks, decode and prefill."""
    generator = torch.Generator().manual_seed(0)
    for rows, columns in [(700, 3000), (5, 40), (2048, 512)]:
        weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
        bias = torch.randn(rows, generator=generator)
        for tokens in (1, 17):
            x = torch.randn(1, tokens, columns, generator=generator)
            assert torch.equal(linear(x, weight, bias), linear(x, weight.float(), bias)), (rows, columns, tokens)
            assert torch.allclose(linear(x, weight, bias), torch.nn.functional.linear(x, weight.float(), bias),
                                  rtol=1e-5, atol=1e-6)


def test_linear_multiplies_each_sequence_of_a_batch_as_that_sequence_alone():
    # the gate's noise floor runs its samples as one batch: batching must not change their sums
    generator = torch.Generator().manual_seed(1)
    weight = (torch.randn(700, 3000, generator=generator) * 0.02).to(torch.bfloat16)
    for tokens in (1, 17):
        x = torch.randn(8, tokens, 3000, generator=generator)
        together = linear(x, weight)
        assert all(torch.equal(together[b], linear(x[b : b + 1], weight)[0]) for b in range(8)), tokens


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 64)])
def test_dequantizing_into_a_buffer_is_torchaos_dequantize_affine_bit_for_bit(bits, group_size):
    """QuantizedWeight's own dequantization (written into linear's block buffer) against torchao's,
    zero points and all, by slices and by the rows an embedding looks up; and linear from the
    integers against linear from their dequantized float32 values."""
    from torchao.quantization.quant_primitives import dequantize_affine

    from qwen_mobile.quant.plan import QuantizedWeight

    generator = torch.Generator().manual_seed(bits + group_size)
    rows, columns = 300, 128
    weight = round_to_nearest(torch.randn(rows, columns, generator=generator) * 0.02, bits, group_size, None)
    shifted = QuantizedWeight(weight.qdata, weight.scale, torch.randint(-3, 4, weight.scale.shape, generator=generator,
                              dtype=torch.int8), bits, group_size, None)
    for quantized in (weight, shifted):
        expected = dequantize_affine(quantized.qdata, quantized.block_size, quantized.scale, quantized.zero_point,
                                     torch.int8, quantized.qmin, quantized.qmax, output_dtype=torch.float32)
        assert torch.equal(quantized.dequantize(), expected)
        picked = torch.tensor([7, 0, 299, 7])
        assert torch.equal(quantized.dequantize_rows(picked), expected[picked])
        buffer = torch.full((64, columns), float("nan"))
        assert torch.equal(quantized.dequantize_rows_into(slice(280, 344), buffer), expected[280:])
        for tokens in (1, 17):
            x = torch.randn(1, tokens, columns, generator=generator)
            assert torch.equal(linear(x, quantized), linear(x, expected))
