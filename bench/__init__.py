"""Benchmark tools for QwenHub (load generator, simulator speed check)."""
