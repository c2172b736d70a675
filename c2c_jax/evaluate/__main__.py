"""`python -m c2c_jax.evaluate --config=configs/qwen.py --config.eval.fuser=PATH [--workdir=DIR]`
(`c2c_jax.evaluate.run`)."""


def main() -> None:
    from absl import flags
    from ml_collections import config_flags

    from c2c_jax import cli
    from c2c_jax.config import use_inference_xla_flags
    from c2c_jax.evaluate.report import results_markdown
    from c2c_jax.evaluate.run import evaluate

    cli.starting("evaluate")  # after this module's own imports (jax), before transformers'
    use_inference_xla_flags()

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", "", "Run directory; outputs go to <workdir>/eval unless "
                                       "eval.output_dir is set.")
    flags.mark_flags_as_required(["config"])

    def run():
        from c2c_jax import sharding

        sharding.maybe_initialize_distributed()
        summary = evaluate(config_flag.value, workdir_flag.value)
        print(results_markdown(summary))  # ends with the verdict line

    cli.run(run)


if __name__ == "__main__":
    main()
