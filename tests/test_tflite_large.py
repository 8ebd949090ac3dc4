"""Models past flatbuffers' 2 GiB: constant buffers written after the flatbuffer (TFLite's
Buffer.offset / size), forced here at the embedded model's size by a zero inline limit.

One 8da4w export without its gate (the normal layout) is laid out again outside the flatbuffer;
both files then run through the backend's runner in both runtimes, and the gate's weight check
reads the integers back from where the offsets point. Small modules cover the other stored forms.
"""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_tflite_quant import TOKENS, Small, Tied, convert, interpreters

from qwen_mobile.backends.tflite import BACKEND, lower, npu_report, quantize
from qwen_mobile.checkpoint import load
from qwen_mobile.export import export_bundle
from qwen_mobile.quant.plan import make_plan, resolve_scheme

SCHEME = "8da4w"
MUTATED = "layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def inline(tmp_path_factory) -> Path:
    """The embedded model's 8da4w bundle as export writes it (all of it in one flatbuffer)."""
    return export_bundle(None, "tflite", SCHEME, tmp_path_factory.mktemp("inline") / "bundle", max_context=64, gate=False)


@pytest.fixture(scope="module")
def manifest(inline) -> dict:
    return json.loads((inline / "manifest.json").read_text())


@pytest.fixture(scope="module")
def outside(inline, tmp_path_factory) -> Path:
    """The same bundle with its model.tflite laid out again, every constant buffer after the flatbuffer."""
    bundle = tmp_path_factory.mktemp("outside") / "bundle"
    shutil.copytree(inline, bundle)
    model = quantize.schema().ModelT.InitFromPackedBuf((inline / "model.tflite").read_bytes(), 0)
    (bundle / "model.tflite").write_bytes(quantize.serialize(model, inline_limit=0))
    return bundle


@pytest.fixture(scope="module")
def loaded():
    return load(None)


@pytest.fixture(scope="module")
def plan(loaded):
    return make_plan(loaded.model, resolve_scheme(SCHEME))


def test_the_planned_weights_lie_after_the_flatbuffer_at_aligned_offsets(inline, outside):
    written = (outside / "model.tflite").read_bytes()
    model = quantize.schema().ModelT.InitFromPackedBuf(written, 0)
    stored = quantize.read_weights((inline / "model.tflite").read_bytes())
    planned = {entry["buffer"] for entry in stored.values()}
    outside_buffers = [b for b in model.buffers if b.offset > 1]
    assert planned and all(model.buffers[i].offset > 1 for i in planned)
    assert all(b.data is None and b.size > 0 and b.offset % quantize.BUFFER_ALIGNMENT == 0 for b in outside_buffers)
    spans = sorted((b.offset, b.offset + b.size) for b in outside_buffers)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))  # no two overlap
    assert spans[-1][1] + quantize.BUFFER_ALIGNMENT <= len(written)  # zeros after the last, as XNNPACK may read on
    names = {m.name: m.buffer for m in model.metadata}
    assert bytes(model.buffers[names[quantize.BUFFER_LOCATION_METADATA]].data) == b"outside flatbuffers"
    assert model.buffers[names[b"min_runtime_version"]].offset == 0  # metadata stays in the flatbuffer
    again = quantize.read_weights(written)
    assert again.keys() == stored.keys()
    for name, entry in stored.items():
        np.testing.assert_array_equal(again[name]["qdata"], entry["qdata"])
        np.testing.assert_array_equal(again[name]["scale"], entry["scale"])


def test_litert_runs_it_bit_for_bit_as_the_normal_layout_in_both_runtimes(inline, outside, manifest, loaded):
    """Prefill then decode through the backend's runner: XNNPACK (packing the weights from the
    offsets, then again from its weight cache file) and TFLite's builtin kernels."""
    backend = BACKEND.load()
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, 20)]

    def logits(bundle: Path, runtime_name: str) -> list[np.ndarray]:
        runner = backend.open(bundle, manifest, runtime_name)
        steps = [runner.step(prompt, 0)] + [runner.step([token], len(prompt) + i) for i, token in enumerate((7, 11, 13))]
        return [step.numpy() for step in steps]

    for runtime_name in backend.runtimes:
        expected = logits(inline, runtime_name)
        assert np.abs(expected[0]).max() > 1  # the weights were read: zeros would give near-flat logits
        for _ in range(2 if runtime_name == "xnnpack" else 1):  # the second load maps the packed weights
            for got, want in zip(logits(outside, runtime_name), expected):
                np.testing.assert_array_equal(got, want)


def test_the_gates_weight_check_reads_the_integers_where_the_offsets_point(outside, manifest, plan, tmp_path):
    backend = BACKEND.load()
    assert backend.missing_weights(outside, manifest, plan) == []
    written = bytearray((outside / "model.tflite").read_bytes())
    model = quantize.schema().ModelT.InitFromPackedBuf(bytes(written), 0)
    buffer = model.buffers[quantize.read_weights(bytes(written))[MUTATED]["buffer"]]
    written[buffer.offset + buffer.size // 2] ^= 0x11  # both nibbles of one byte: two int4 values
    edited = tmp_path / "bundle"
    shutil.copytree(outside, edited)
    (edited / "model.tflite").write_bytes(bytes(written))
    assert backend.missing_weights(edited, manifest, plan) == [MUTATED]


def test_a_weight_whose_signatures_hold_it_in_two_buffers_is_named(inline, manifest, plan, tmp_path):
    """The weight check reads one weight at a time (quantize.stored_weights) and takes each once,
    so a second copy in another signature is looked at for its buffer: one that is not the first's
    is not what the encoder writes, and the weight is named."""
    model = quantize.schema().ModelT.InitFromPackedBuf((inline / "model.tflite").read_bytes(), 0)
    last = model.subgraphs[-1]
    tensor = next(t for t in last.tensors if t.name.decode() == f"{MUTATED}.qdata")
    copy = quantize.schema().BufferT()
    copy.data = np.array(model.buffers[tensor.buffer].data, copy=True)
    model.buffers.append(copy)
    tensor.buffer = len(model.buffers) - 1
    edited = tmp_path / "bundle"
    shutil.copytree(inline, edited)
    (edited / "model.tflite").write_bytes(quantize.serialize(model))
    assert len(model.subgraphs) > 1
    assert BACKEND.load().missing_weights(edited, manifest, plan) == [MUTATED]


def test_every_other_reader_of_the_file_sees_the_same_model(inline, outside, manifest):
    before, after = (inline / "model.tflite").read_bytes(), (outside / "model.tflite").read_bytes()
    assert npu_report.build(outside / "model.tflite") == npu_report.build(inline / "model.tflite")
    feeds = manifest["state_feeds"]
    assert lower.in_place_state(after, feeds) == lower.in_place_state(before, feeds) == manifest["state_in_place"]
    assert quantize.static_ranges(after) == quantize.static_ranges(before)
    assert quantize.fully_connected_filters(after) == quantize.fully_connected_filters(before)
    assert quantize.embedding_lookups(after) == quantize.embedding_lookups(before)


@pytest.mark.parametrize("scheme", ["int8", "int4", "8da8w", "8da4w"])
def test_encode_lays_out_every_stored_form_outside_and_runs_as_inline(scheme):
    """Per-channel int8 (weight-only DEQUANTIZE, 8da8w's hybrid FULLY_CONNECTED), blockwise int4
    (weight-only MUL by the fp16 scales, 8da4w's blockwise FULLY_CONNECTED) and the tied lookups, each
    run from memory (Interpreter(model_content=...)), where offsets count from the buffer's start."""
    module = (Tied(width=64) if scheme.startswith("8da") else Small()).eval()
    plan = make_plan(module, resolve_scheme(scheme))
    converted = convert(module, plan)
    inline, outside = quantize.encode(converted, plan), quantize.encode(converted, plan, inline_limit=0)
    assert quantize.encode(converted, plan, inline_limit=len(inline)) == inline  # the default layout up to the limit
    model = quantize.schema().ModelT.InitFromPackedBuf(outside, 0)
    stored = quantize.read_weights(outside)
    assert stored and all(model.buffers[entry["buffer"]].offset > 1 for entry in stored.values())
    for name, entry in quantize.read_weights(inline).items():
        np.testing.assert_array_equal(stored[name]["qdata"], entry["qdata"])
    for before, after in zip(interpreters(inline), interpreters(outside)):
        np.testing.assert_array_equal(*[next(iter(r(tokens=TOKENS.numpy()).values())) for r in (before, after)])
