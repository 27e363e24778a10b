"""Benchmarks: python -m corpo_jax.bench {rollout,...}."""
