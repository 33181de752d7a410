"""Benchmark scripts (``python benchmarks/<name>.py``); a package so that tests import them as ``benchmarks.<name>``."""
