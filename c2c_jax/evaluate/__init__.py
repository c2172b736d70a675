"""Multiple-choice evaluation: benchmarks, scoring, methods, statistics, report; `python -m c2c_jax.evaluate`."""
