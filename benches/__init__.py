"""Benchmarks (not part of the tests): ``.venv/bin/python -m benches.bench_attacks`` and others."""
