"""Benchmarks P1-P9 (``python -m benchmarks --help``): each figure a ratio against a baseline run
in the same process; the README lists the results."""
