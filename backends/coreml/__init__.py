"""Core ML: a stateful multifunction ML Program (model.mlpackage), verified on any OS through
a CPU emulator of the saved program (and through Core ML itself on macOS).

Only the spec lives here: discovering backends must not import coremltools.
"""

from qwen_mobile.registry import BackendSpec

BACKEND = BackendSpec(
    name="coreml",
    summary="Core ML ML Program (.mlpackage, iOS 18), Core ML states, verified through a CPU emulator of the program",
    artifact="model.mlpackage",
    quant_schemes=("fp16", "fp32", "int8", "int4"),  # fp16 compute by default: what the Neural Engine runs
    exporter="qwen_mobile.backends.coreml.bundle:export",
    verifier="qwen_mobile.backends.coreml.verify:verify_bundle",
    runner="qwen_mobile.backends.coreml.runtime:load_runner",
)
