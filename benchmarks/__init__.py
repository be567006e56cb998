"""Benchmarks for ``make bench``: each compares two things in one run and prints their ratio.

These machines are shared and noisy, so absolute figures are reported for context only; the ratios,
measured side by side in the same run, are what to compare across runs.
"""
