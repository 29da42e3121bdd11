"""Benchmarks of fedkd's simulation engine (run with ``python -m benchmarks.run``)."""
