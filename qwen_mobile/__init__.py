"""Export Alibaba's Qwen3.5 small models to on-device runtimes (ExecuTorch, Core ML, TFLite)."""
