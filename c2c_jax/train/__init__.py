"""Training the fuser: chat sources, batches, the step, the loop, checkpoints; `python -m c2c_jax.train`."""
