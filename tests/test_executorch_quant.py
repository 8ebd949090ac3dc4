"""ExecuTorch 8da4w and weight-only int8: the core's plan reaches the .pte unchanged, and the runtime
matches the plan in eager."""

import json
from pathlib import Path

import pytest
import torch

from qwen_mobile.backends.executorch import BACKEND
from qwen_mobile.bundle import gate_bundle
from qwen_mobile.checkpoint import load
from qwen_mobile.parity import FLOOR_SAMPLES, top1_bar
from qwen_mobile.quant.plan import make_plan, resolve_scheme, scheme_from_manifest


@pytest.fixture(scope="module")
def exported(embedded_bundle) -> Path:
    return embedded_bundle("executorch", "8da4w")


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return json.loads((exported / "manifest.json").read_text())


@pytest.fixture(scope="module")
def plan(manifest):
    return make_plan(load(None).model, scheme_from_manifest(manifest["quant"]))


def xnnpack_int4(qdata: torch.Tensor) -> bytes:
    """XNNPACK's 4-bit weight layout: value + 8 as a nibble, even columns in the low nibble."""
    nibbles = (qdata.to(torch.int16) + 8).to(torch.uint8).reshape(-1)
    return bytes((nibbles[1::2] << 4 | nibbles[::2]).tolist())


def executorch_embedding_int4(qdata: torch.Tensor) -> bytes:
    """quantized_decomposed::embedding_4bit's layout: value + 8, even columns in the high nibble."""
    nibbles = (qdata.to(torch.int16) + 8).to(torch.uint8).reshape(-1)
    return bytes((nibbles[::2] << 4 | nibbles[1::2]).tolist())


def bf16_bytes(scale: torch.Tensor) -> bytes:
    return scale.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()


def test_the_manifest_records_the_plan(manifest, plan):
    quant = manifest["quant"]
    assert (quant["scheme"], quant["bits"], quant["group_size"], quant["embedding_bits"]) == ("8da4w", 4, 32, 4)
    assert quant["activations"] == "int8_asymmetric_per_token"
    assert set(quant["layers"]) == set(plan.weights)
    assert all(name.rsplit(".", 2)[-2] in ("in_proj_a", "in_proj_b") for name in quant["higher_precision"])


def test_the_program_matches_the_plan_in_eager_and_reports_against_float(exported, manifest):
    gate = gate_bundle(exported, manifest, BACKEND)  # measured again, on the file as written
    assert gate["passed"] and gate["reference"] == "eager model with the same quantization plan"
    # dynamic activations: the bar is the fixed 2e-2 or twice the noise floor measured on this checkpoint
    floor = gate["noise_floor"]
    assert floor["samples"] == FLOOR_SAMPLES
    assert gate["max_relative_diff"] == max(2e-2, 2 * max(floor["relative_diffs"]))
    assert gate["relative_diff"] <= gate["max_relative_diff"] and gate["top1_agreement"] >= 0.99
    assert gate["max_mean_kl"] == 2 * max(floor["mean_kls"]) and gate["mean_kl"] <= gate["max_mean_kl"]
    assert gate["max_worst_positions_kl"] == 2 * max(floor["worst_positions_kls"])
    assert gate["worst_positions_kl"] <= gate["max_worst_positions_kl"]
    assert all(worst >= mean for worst, mean in zip(floor["worst_positions_kls"], floor["mean_kls"]))
    assert gate["min_top1"] == min(0.99, top1_bar(floor["top1_agreements"], floor["positions"]))
    assert gate["weights"] == {"checked": len(json.loads((exported / "manifest.json").read_text())["quant"]["layers"]),
                               "differ": []}
    assert gate["positions_checked"] >= 100 and gate["tokens_fed"] >= 64
    # reported, not gated: how far the quantized model is from the float one
    assert 0 < gate["versus_float"]["mean_kl"] < 0.5 and 0.5 < gate["versus_float"]["top1_agreement"] <= 1


def test_the_program_holds_the_plans_integers_and_scales(exported, plan):
    data = (exported / "model.pte").read_bytes()
    linears = {name: w for name, w in plan.weights.items() if name != "embed_tokens.weight"}
    for name, weight in linears.items():
        assert xnnpack_int4(weight.qdata) in data, name
        assert bf16_bytes(weight.scale) in data, name
    embedding = plan.weights["embed_tokens.weight"]
    assert executorch_embedding_int4(embedding.qdata) in data

    # the search tells plans apart: one integer moved by one step is not in the program
    weight = plan.weights["layers.0.mlp.down_proj.weight"]
    moved = weight.qdata.clone()
    moved[0, 0] = moved[0, 0] + 1 if moved[0, 0] < 7 else moved[0, 0] - 1
    assert xnnpack_int4(moved) not in data


def test_the_program_is_a_fraction_of_the_float_weights(exported):
    parameters = sum(p.numel() for p in load(None).model.parameters())
    assert (exported / "model.pte").stat().st_size < parameters * 4 / 4


def test_verify_rebuilds_the_plan_and_passes(exported):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    result = CliRunner().invoke(app, ["verify", str(exported), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    # each step of the gate is reported on stderr as it ends, with its duration
    for step in ("rebuilding the quantization plan", "eager reference: 8da4w plan, 100 calls", "artifact: 2 passes"):
        assert step in result.stderr, result.stderr


def test_run_generates_text_through_the_quantized_program(exported):
    from typer.testing import CliRunner

    from qwen_mobile.cli import app

    result = CliRunner().invoke(app, ["run", str(exported), "-p", "ROMEO:\n", "-n", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


@pytest.fixture(scope="module")
def exported_int8(embedded_bundle) -> Path:
    return embedded_bundle("executorch", "int8")


def test_weight_only_int8_holds_the_plans_integers_and_float_scales(exported_int8):
    manifest = json.loads((exported_int8 / "manifest.json").read_text())
    assert (manifest["quant"]["scheme"], manifest["quant"]["bits"], manifest["quant"]["group_size"]) == ("int8", 8, 0)
    assert manifest["quant"]["activations"] is None
    plan = make_plan(load(None).model, scheme_from_manifest(manifest["quant"]))
    data = (exported_int8 / "model.pte").read_bytes()
    for name, weight in plan.weights.items():  # XNNPACK's channelwise int8 filter and embedding_byte keep rows as they are
        assert weight.qdata.numpy().tobytes() in data, name
        assert weight.scale.reshape(-1).numpy().tobytes() in data, name
    moved = plan.weights["layers.0.mlp.down_proj.weight"].qdata.clone()
    moved[0, 0] = moved[0, 0] + 1 if moved[0, 0] < 127 else moved[0, 0] - 1
    assert moved.numpy().tobytes() not in data


def test_weight_only_int8_passes_the_gate_and_reports_against_float(exported_int8):
    gate = gate_bundle(exported_int8, json.loads((exported_int8 / "manifest.json").read_text()), BACKEND)
    assert gate["passed"] and gate["reference"] == "eager model with the same quantization plan"
    assert gate["relative_diff"] <= gate["max_relative_diff"] == 2e-2 and gate["top1_agreement"] >= 0.99
    assert 0 < gate["versus_float"]["mean_kl"] < 0.5
    assert (exported_int8 / "model.pte").stat().st_size < sum(p.numel() for p in load(None).model.parameters()) * 4 / 3


def test_a_weight_only_int8_linear_is_delegated_and_exact():
    """The partitioner claims dequantize(int8 weight) -> linear with a float input; the stock
    one sends it to a decomposed mm that drops the per-channel scales."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from qwen_mobile.backends.executorch.partition import xnnpack_partitioner
    from qwen_mobile.backends.executorch.quantize import planned_weights

    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(256, 96, bias=False)})
    plan = make_plan(holder, resolve_scheme("int8"))
    x = torch.randn(3, 256)
    expected = x @ plan.weights["proj.weight"].dequantize().T
    with planned_weights(holder, plan):
        program = torch.export.export(holder["proj"], (x,))
    edge = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()])
    leftover = {n.target.__name__ for n in edge.exported_program().graph.nodes if n.op == "call_function"}
    assert not any("dequantize" in name or "mm" in name for name in leftover), leftover
    method = Runtime.get().load_program(edge.to_executorch().buffer).load_method("forward")
    assert torch.allclose(method.execute([x])[0], expected, atol=1e-5, rtol=1e-5)


def test_group_size_flag_reaches_the_plan():
    assert resolve_scheme("8da4w", group_size=64).group_size == 64


def test_packed_weights_kept_on_disk_during_lowering_give_the_same_program(exported, monkeypatch, tmp_path):
    """lower.named_data_on_disk: every packed blob spilled to a file (a threshold of one byte, where
    exports spill those of 1 MiB or more) writes the program byte for byte, and leaves no blob file
    in the bundle."""
    from executorch.exir._serialize._cord import FileBackedData

    from qwen_mobile.backends.executorch import lower
    from qwen_mobile.export import export_bundle

    spilled = []
    init = FileBackedData.__init__

    def recorded(self, path, *args, **kwargs):
        spilled.append(Path(path))
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(lower, "SPILLED_BLOB_BYTES", 1)
    monkeypatch.setattr(FileBackedData, "__init__", recorded)
    again = export_bundle(None, "executorch", "8da4w", tmp_path / "bundle", gate=False)
    assert (again / "model.pte").read_bytes() == (exported / "model.pte").read_bytes()
    assert sorted(path.name for path in again.iterdir()) == sorted(path.name for path in exported.iterdir())
    assert len(spilled) > 50 and not any(path.exists() for path in spilled)


def test_a_partitions_copy_for_preprocess_shares_its_weights_and_nothing_else():
    """lower.copy_sharing_weights: the program's tensors are the original's (no second copy of every
    delegated weight), its graph a copy of its own (what ExecuTorch's deepcopy is there for)."""
    from qwen_mobile.backends.executorch.lower import copy_sharing_weights

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)
            self.register_buffer("offset", torch.ones(4))

        def forward(self, x):
            return self.linear(x) + self.offset

    program = torch.export.export(Scaled(), (torch.ones(2, 8),))
    copied = copy_sharing_weights(program)
    assert copied.state_dict.keys() == program.state_dict.keys() and copied.state_dict
    assert all(copied.state_dict[name] is tensor for name, tensor in program.state_dict.items())
    assert copied.graph_module is not program.graph_module and copied.graph is not program.graph
    node = next(node for node in copied.graph.nodes if node.op == "call_function")
    node.name = "renamed"
    assert "renamed" not in {node.name for node in program.graph.nodes}
    assert torch.equal(copied.module()(torch.ones(2, 8)), program.module()(torch.ones(2, 8)))
