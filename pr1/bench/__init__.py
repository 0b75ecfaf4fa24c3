"""Benchmarks: `python -m pr1.bench.<name>`."""
