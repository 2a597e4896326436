"""Benchmark scripts; run each as `python benchmarks/NAME.py`, and the low-label benchmark (a package) as
`python -m benchmarks.low_label`. A package so that tests import their helpers."""
