"""Benchmark scripts run by make targets (never by the test suite): `python -m globalcom2.benchmarks.<name>`."""
