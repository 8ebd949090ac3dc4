"""ExecuTorch: one `.pte` program, XNNPACK-delegated, with the model state held in mutable buffers.

Only the spec lives here: discovering backends must not import executorch (its
modules are imported by the exporter named below, when an export runs).
"""

from qwen_mobile.registry import BackendSpec

BACKEND = BackendSpec(
    name="executorch",
    summary="ExecuTorch .pte (XNNPACK), state in mutable buffers, verified through the ExecuTorch runtime",
    artifact="model.pte",
    quant_schemes=("fp32", "int8", "8da4w"),
    exporter="qwen_mobile.backends.executorch.bundle:export",
    verifier="qwen_mobile.backends.executorch.verify:verify_bundle",
    runner="qwen_mobile.backends.executorch.runtime:load_runner",
)
