"""Core ML: a stateful multifunction ML Program (model.mlpackage), verified on any OS through
a CPU emulator of the saved program (and through Core ML itself on macOS).

Only the spec lives here: discovering backends must not import coremltools (the implementation
named below imports it, when an export, verify or run needs it).
"""

from qwen_mobile.registry import BackendSpec

BACKEND = BackendSpec(
    name="coreml",
    summary="Core ML ML Program (.mlpackage, iOS 18), Core ML states, verified through a CPU emulator of the program",
    artifact="model.mlpackage",
    quant_schemes=("fp16", "fp32", "int8", "int4"),  # fp16 compute by default: what the Neural Engine runs
    # docs/coreml.md, "Static activations": coremltools calibrates activations by running the model
    refused_schemes=(
        ("a8w8", "coremltools' linear_quantize_activations calibrates by MLModel.predict, which runs on macOS only"),
        ("a16w8", "Core ML quantizes activations to 8 bits only (coremltools OpLinearQuantizerConfig, int8/uint8)"),
    ),
    implementation="qwen_mobile.backends.coreml.backend:CoreMLBackend",
)
