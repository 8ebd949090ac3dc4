"""Quantization plans (decided here, for every backend) and their eager reference."""
