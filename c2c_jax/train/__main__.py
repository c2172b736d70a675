"""Train a fuser: `python -m c2c_jax.train --config=configs/qwen.py --workdir=runs/qwen`.

Every config field can be overridden, e.g. `--config.optim.lr=3e-4 --config.train.max_steps=100`.
Rerunning with the same workdir resumes from the last checkpoint.
"""


def main() -> None:
    from c2c_jax import cli

    cli.starting("train")
    import logging as py_logging

    from absl import flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", "runs/c2c", "Checkpoints, logs and the final fuser go here.")
    flags.mark_flags_as_required(["config"])

    def run():
        from c2c_jax import sharding

        sharding.maybe_initialize_distributed()  # before anything touches a device
        from c2c_jax.train.loop import train_and_evaluate

        logging.set_verbosity(logging.INFO)
        py_logging.getLogger("absl").setLevel(py_logging.WARNING)  # Orbax's per-file progress lines
        summary = train_and_evaluate(config_flag.value, workdir_flag.value)
        if summary["history"]:
            loss = summary["history"][-1]["loss"]
            steps = summary.get("stopped_at") or summary["steps"]
            best = summary.get("best")
            kept = (f" (the fuser of step {best['step']}, held-out loss {best['eval_loss']:.4f})"
                    if best and config_flag.value.train.patience else "")
            print(f"done: step {steps}, loss {loss:.4f}; fuser in {workdir_flag.value}/final{kept}")

    cli.run(run)


if __name__ == "__main__":
    main()
