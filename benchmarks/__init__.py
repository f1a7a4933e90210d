"""Timing scripts, run as modules: python -m benchmarks.<name>."""
