"""Backends: one subpackage per runtime (executorch/, coreml/, tflite/), installed as
`qwen_mobile.backends`.

The core finds them through `qwen_mobile.registry`: each subpackage's `__init__.py`
defines `BACKEND`, a `qwen_mobile.registry.BackendSpec`, and imports nothing heavy (the
runtime's own libraries are imported by the functions it names, when they are called).
Adding a backend means adding a folder here; no core file changes.
"""
