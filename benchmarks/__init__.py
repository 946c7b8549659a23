"""Benchmarks: the k-fold fairness harness, the audit report, and speed/scale measurements."""
