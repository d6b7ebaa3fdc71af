"""Benchmarks: each compares Maestro's path with a baseline in the same run and prints ratios."""
