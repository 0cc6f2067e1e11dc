"""Benchmarks of spotrun, run as ``python -m bench NAME``. See docs/benchmarks.md."""
