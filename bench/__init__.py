"""Benchmarks: one command each, printing baseline, ratio and target; docs/performance.md."""
