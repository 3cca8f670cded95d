"""Benchmarks: `python -m benchmarks.NAME`; results are kept in benchmarks/results/."""
