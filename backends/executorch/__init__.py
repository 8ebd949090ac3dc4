"""ExecuTorch: one `.pte` program, XNNPACK-delegated, with the model state held in mutable buffers.

Only the spec lives here: discovering backends must not import executorch (the
implementation named below imports it, when an export, verify, run or bench needs it).
"""

from qwen_mobile.registry import BackendSpec

BACKEND = BackendSpec(
    name="executorch",
    summary="ExecuTorch .pte (XNNPACK), state in mutable buffers, verified through the ExecuTorch runtime",
    artifact="model.pte",
    quant_schemes=("fp32", "int8", "8da4w"),
    refused_schemes=(
        ("a8w8", "static activation ranges are for NPU targets, exported through the tflite backend (-b tflite)"),
        ("a16w8", "static activation ranges are for NPU targets, exported through the tflite backend (-b tflite)"),
    ),
    implementation="qwen_mobile.backends.executorch.backend:ExecuTorchBackend",
)
