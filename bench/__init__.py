"""Benchmarks: figures and ratios measured side by side (gpu_bench.py on a GPU; bench_*.py on any device)."""
