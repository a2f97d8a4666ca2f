"""Benchmarks that measure what the adapter learned (``python -m gill.bench.grounding``)."""
