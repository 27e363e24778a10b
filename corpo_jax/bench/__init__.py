"""Benchmarks that measure this code on the machine at hand (results go to docs/)."""
