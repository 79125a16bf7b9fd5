"""Benchmarks: each ``benchmarks/<name>.py`` runs as ``python -m benchmarks.<name> [--quick]``."""
