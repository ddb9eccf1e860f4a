"""Benchmarks of pg_kernels: one harness (harness.py) and one bench_<op>.py per op."""
