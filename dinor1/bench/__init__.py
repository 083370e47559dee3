"""Benchmarks: each prints figures and the ratios measured in the same run."""
