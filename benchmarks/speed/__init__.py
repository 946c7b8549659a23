"""Our own speed and scale measurements (not part of what users run): training, sampling, evaluation
and audit timings, the simulator and the preprocessing at full MIMIC-IV scale. Figures in
``benchmarks/RESULTS.md``."""
