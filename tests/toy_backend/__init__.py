"""A complete fourth backend, as a newcomer would write one: this folder dropped under backends/
is all it takes (tests/test_registry.py drops it in from a temporary folder). The runtime is
the core's own eager model; the artifact is its weights, as the plan has them, in a .pt file."""

from qwen_mobile.registry import BackendSpec

BACKEND = BackendSpec(
    name="toyrt",
    summary="the eager model behind the backend interface (a test backend)",
    artifact="model.pt",
    quant_schemes=("fp32", "int8"),
    implementation="qwen_mobile.backends.toyrt.backend:ToyBackend",
)
