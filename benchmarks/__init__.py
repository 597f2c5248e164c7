"""Benchmarks of s2s_jax against a PyTorch reference (`python -m benchmarks.compare`).

Benchmark-only: needs `pip install -r benchmarks/requirements.txt` (PyTorch, CPU build);
nothing in s2s_jax imports this package, and the tests that need PyTorch skip without it.
"""
