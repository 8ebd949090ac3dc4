"""Whether LiteRT reads a .tflite past flatbuffers' 2 GiB as the tflite backend writes it.

An int8 embedding table of ROWS x 4096 (2.4 GB, past 2**31 bytes), converted as the backend
converts planned weights (a signature input, then quantize.encode's per-channel INT8 constant
taken by the hybrid EMBEDDING_LOOKUP), is written by quantize.serialize at its default
inline limit, so its bytes lie after the flatbuffer. The table is a sparse file mapped in
(numpy.memmap): only the rows looked up hold integers, so the probe needs the file's 2.4 GB
once in memory (the bytes serialize returns), not the table's float32. It then looks up
rows at both ends of the table, the last ones past 2**31 bytes into the file, through the
classic Interpreter (which verifies the flatbuffer) and CompiledModel with XNNPACK and with
TFLite's builtin kernels, and reads the integers back as the gate does:
`python scripts/tflite_past_2gib.py [DIRECTORY]` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import mmap
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwen_mobile.backends.tflite import lower, quantize, runtime
from qwen_mobile.quant.plan import make_plan, resolve_scheme

COLUMNS = 4096
ROWS = 2**19 + 2**16  # 589,824 rows of 4096 int8: 2.42 GB
SAMPLE_ROWS = 64  # the converted table: its values never reach the file
LOOKED_UP = [0, 1, ROWS // 2, ROWS - 2, ROWS - 1]


class Lookup(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(SAMPLE_ROWS, COLUMNS)

    def forward(self, tokens):
        return self.embed_tokens(tokens)


class WeightsAsInputs(nn.Module):
    def __init__(self, model, inputs: dict[str, str]):
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, tokens, **weights):
        return lower.call_with_weights(self.model, self.inputs, weights, tokens)


def converted_with_plan() -> tuple[bytes, object]:
    """As lower.convert does: the planned table a signature input, then quantize.encode (in memory, small)."""
    import litert_torch

    module = Lookup().eval()
    plan = make_plan(module, resolve_scheme("int8"))
    inputs = lower.weight_inputs(module, plan)
    parameters = dict(module.named_parameters())
    sample = {"tokens": torch.zeros(1, len(LOOKED_UP), dtype=torch.int32),
              **{key: parameters[name].detach() for key, name in inputs.items()}}
    converted = bytes(litert_torch.convert(WeightsAsInputs(module, inputs).eval(), (), sample_kwargs=sample).model_content())
    return converted, plan


def row_values(row: int) -> np.ndarray:
    return ((np.arange(COLUMNS) * 7 + row * 13) % 255 - 127).astype(np.int8)


def grown(small: bytes, table: np.ndarray, scales: np.ndarray):
    """The encoded model with its table tensor made [ROWS, COLUMNS] over `table`, one scale per row."""
    model = quantize.schema().ModelT.InitFromPackedBuf(small, 0)
    (tensor,) = [t for t in model.subgraphs[0].tensors if t.name.decode() == "embed_tokens.weight.qdata"]
    tensor.shape = np.array([ROWS, COLUMNS], np.int32)
    tensor.quantization.scale, tensor.quantization.zeroPoint = scales, np.zeros(ROWS, np.int64)
    model.buffers[tensor.buffer].data = table
    return model


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(directory: Path) -> None:
    converted, plan = converted_with_plan()
    encoded = quantize.encode(converted, plan)
    table_path = directory / "table.bin"
    with open(table_path, "wb") as file:  # sparse: ROWS * COLUMNS bytes, all holes but the rows looked up
        file.truncate(ROWS * COLUMNS)
    table = np.memmap(table_path, np.uint8, "r+", shape=(ROWS * COLUMNS,))
    for row in LOOKED_UP:
        table[row * COLUMNS:(row + 1) * COLUMNS] = row_values(row).view(np.uint8)
    table.flush()
    scales = (np.arange(ROWS, dtype=np.float32) % 97 + 1) / 1024
    started = time.perf_counter()
    written = quantize.serialize(grown(encoded, table, scales))
    artifact = directory / "model.tflite"
    artifact.write_bytes(written)
    print(f"written {len(written):,} bytes in {time.perf_counter() - started:.1f} s; peak resident {peak_gib():.2f} GiB")
    del written, table
    table_path.unlink()

    tokens = np.array([LOOKED_UP], np.int32)
    expected = np.stack([row_values(row).astype(np.float32) * scales[row] for row in LOOKED_UP])[None]
    lib = runtime.interpreter_module()
    for name, options in (("Interpreter (default delegates)", {}),
                          ("Interpreter (builtin kernels)", {"experimental_op_resolver_type": lib.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES})):
        runner = lib.Interpreter(model_path=str(artifact), **options).get_signature_runner()
        (got,) = runner(tokens=tokens).values()
        print(f"{name}: rows {LOOKED_UP} {'equal' if np.array_equal(got, expected) else 'DIFFER'}")
        del runner
    compiled = runtime.litert()
    for name, cpu in (("CompiledModel XNNPACK", {}), ("CompiledModel builtin kernels", {"kernel_mode": compiled.CpuKernelMode.BUILTIN})):
        options = compiled.Options(hardware_accelerators=compiled.HardwareAccelerator.CPU, cpu_options=compiled.CpuOptions(**cpu))
        model = compiled.CompiledModel.from_file(str(artifact), options=options)
        inputs, outputs = model.create_input_buffers(0), model.create_output_buffers(0)
        inputs[0].write(tokens)
        model.run_by_index(0, inputs, outputs)
        got = outputs[0].read(expected.size, np.float32).reshape(expected.shape)
        print(f"{name}: rows {LOOKED_UP} {'equal' if np.array_equal(got, expected) else 'DIFFER'}; "
              f"peak resident {peak_gib():.2f} GiB")
        del model, inputs, outputs
    # as the gate reads it (the file mapped rather than read, to keep one copy of the table in memory)
    with open(artifact, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        model = quantize.schema().ModelT.InitFromPackedBuf(mapped, 0)
        (tensor,) = [t for t in model.subgraphs[0].tensors if t.name.decode() == "embed_tokens.weight.qdata"]
        buffer = model.buffers[tensor.buffer]
        print(f"table buffer: data {buffer.data}, offset {buffer.offset:,}, size {buffer.size:,}; row {ROWS - 1} "
              f"starts {buffer.offset + (ROWS - 1) * COLUMNS:,} bytes into the file (2**31 = {2**31:,})")
        del model, tensor, buffer
        entry = quantize.read_weights(mapped)["embed_tokens.weight"]
        back = all(np.array_equal(entry["qdata"][row], row_values(row)) for row in LOOKED_UP)
        same_scales = np.array_equal(entry["scale"], scales)
        shape = entry["qdata"].shape
        del entry
    print(f"read_weights: {shape} integers, looked-up rows {'equal' if back else 'DIFFER'}, "
          f"scales {'equal' if same_scales else 'DIFFER'}; peak resident {peak_gib():.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", type=Path, help="where the 2.4 GB file goes [default: a temporary directory]")
    args = parser.parse_args()
    if args.directory:
        args.directory.mkdir(parents=True, exist_ok=True)
        run(args.directory)
    else:
        with tempfile.TemporaryDirectory() as directory:
            run(Path(directory))


if __name__ == "__main__":
    main()
