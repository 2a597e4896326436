"""Benchmark scripts; run each as `python benchmarks/NAME.py`. A package only so that tests import their helpers."""
