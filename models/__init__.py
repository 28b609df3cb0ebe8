"""Fixture models and data for tests, README examples and benchmarks."""
