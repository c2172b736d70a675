"""Train a fuser: `python -m c2c_jax.train --config=configs/qwen.py --workdir=runs/qwen`.

Every config field can be overridden, e.g. `--config.optim.lr=3e-4 --config.train.max_steps=100`.
Rerunning with the same workdir resumes from the last checkpoint.
"""

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from c2c_jax import sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/qwen.py", "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/c2c", "Directory for checkpoints, logs and the final fuser.")


def main(argv):
    del argv
    sharding.maybe_initialize_distributed()  # before anything touches a device
    from c2c_jax import trainer

    logging.set_verbosity(logging.INFO)
    py_logging.getLogger("absl").setLevel(py_logging.WARNING)  # Orbax's per-file progress lines
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if summary["history"]:
        last = summary["history"][-1]
        logging.info("done: step %d, loss %.4f; final fuser in %s/final", last["step"], last["loss"], _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
