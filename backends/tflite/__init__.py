"""TFLite / LiteRT: one builtin-only .tflite with prefill and decode signatures, explicit state.

Only the spec lives here: discovering backends must not import litert-torch or the
LiteRT interpreter (the implementation named below imports them when they are needed).
"""

from qwen_mobile.registry import BackendSpec

BACKEND = BackendSpec(
    name="tflite",
    summary="TFLite/LiteRT .tflite (builtin ops only), prefill + decode signatures, verified through ai-edge-litert",
    artifact="model.tflite",
    quant_schemes=("fp32", "int8", "int4", "8da8w", "8da4w", "a8w8", "a16w8"),
    implementation="qwen_mobile.backends.tflite.backend:TFLiteBackend",
)
