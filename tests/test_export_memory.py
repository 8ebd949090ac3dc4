"""A single-plan export frees the float weights it no longer needs (export.write_bundle's
release_float_weights, parity.references' keep_float): the gate's references are the same, and
lowering reads no weight that was released."""

import json

import pytest
import torch

from qwen_mobile.backends.executorch.backend import ExecuTorchBackend
from qwen_mobile.checkpoint import EMBEDDED_MODEL, load_checkpoint, open_checkpoint
from qwen_mobile.export import prepare_target, write_bundle
from qwen_mobile.parity import references
from qwen_mobile.quant.eager import dequantize_in_place, dequantized
from qwen_mobile.quant.plan import make_plan, planned_modules, resolve_scheme


def loaded_and_planned(quant: str = "8da4w"):
    checkpoint = open_checkpoint(None)
    loaded = load_checkpoint(checkpoint)
    return prepare_target(checkpoint, "executorch", quant, None), loaded, make_plan(loaded.model, resolve_scheme(quant))


def test_references_without_the_float_weights_are_the_same_references(embedded_bundle):
    """What the gate compares against, bit for bit, whether the float model is kept or released
    (the released path is export_bundle's); that lowering then reads no released weight is the
    next test, and the bundle it writes is the one every ExecuTorch 8da4w test checks."""
    target, kept_model, plan = loaded_and_planned()
    _, freed_model, _ = loaded_and_planned()
    kept = references(kept_model.model, target.lengths, plan, tokenizer_dir=EMBEDDED_MODEL)
    freed = references(freed_model.model, target.lengths, plan, tokenizer_dir=EMBEDDED_MODEL, keep_float=False)
    for field in ("tokens", "float_logits", "logits"):
        assert torch.equal(getattr(kept, field), getattr(freed, field)), field
    assert kept.gate == freed.gate and kept.noise_floor == freed.noise_floor and kept.noise_floor is not None
    assert not any(parameter.is_meta for parameter in kept_model.model.parameters())
    released = json.loads((embedded_bundle("executorch", "8da4w") / "manifest.json").read_text())
    assert released["parity"]["passed"] and released["parity"]["max_mean_kl"] == kept.gate.max_mean_kl


class Lowered(Exception):
    pass


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


def test_dequantized_without_the_float_weights_computes_the_same_and_keeps_the_dequantized_ones():
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
    for name, weight in plan.weights.items():
        assert torch.equal(modules[name].weight, weight.dequantize())
    # asked again (each noise-floor pass asks), nothing is made anew
    held = {name: modules[name].weight for name in plan.weights}
    dequantize_in_place(freed, plan)
    assert all(planned_modules(freed)[name].weight is held[name] for name in plan.weights)
    assert freed.lm_head.weight is freed.embed_tokens.weight
    assert kept.lm_head.weight is kept.embed_tokens.weight  # the plain path gives the float weights back
