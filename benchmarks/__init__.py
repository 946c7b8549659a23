"""Benchmarks: what users run (the k-fold fairness harness ``kfold`` with its ``methods``,
``downstream`` models, ``metrics``, ``stats``, ``audit`` and ``report``), and, apart in ``speed/``, the
project's own speed and scale measurements."""
