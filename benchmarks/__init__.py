"""Benchmark scripts, each run from the repository root as ``python -m benchmarks.<name>``; what they share is in
``benchmarks.harness``. Results (JSON with the exact command, markdown, figures) are under ``benchmarks/results``."""
