"""What every command (`train`, `evaluate`, `generate`, `demo`, `serve`) shares at its edge.

* A user's mistake (a file that is not there, a fuser for another model pair, a bad config value)
  ends the command with one line, `error: ...`, and exit status 1; `--verbose` shows the traceback.
  Anything else is a bug and keeps its traceback.
* `--config=configs/demo.py` is found from any working directory: a relative path that does not exist
  where the command runs is looked up in the project folder (the one holding `c2c_jax/` and `configs/`).
* `--help` prints the flags and exits 0.
* `phase(...)` prints what the command is doing, with the time since it started, so no step of a
  long run (imports, downloads, loading, compiling) is silent.

This module imports nothing heavy: the entry points call `starting()` before JAX is imported.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_START = time.monotonic()
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")
# What a user can cause and fix: missing or unreadable files, bad values, failed downloads, a device
# out of memory. Other exception types are programming errors and keep their traceback.
USER_ERRORS = (OSError, ValueError, RuntimeError)


def phase(message: str) -> None:
    """One status line on stderr, `[  12.3s] message`, printed above any progress bar."""
    line = f"[{time.monotonic() - _START:7.1f}s] {message}"
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def starting(command: str) -> None:
    """The first line of every command, before the imports that take several seconds."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # "PyTorch was not found ..." on a torch-free install
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not any(a in HELP_FLAGS for a in sys.argv[1:]):
        phase(f"c2c-jax {command}: starting (importing JAX and the models' libraries)")


def resolve_config_path(value: str) -> str:
    """`--config`'s value with its file found (cwd first, then the project folder); `:overrides` kept."""
    file, sep, rest = value.partition(":")
    path = Path(file).expanduser()
    if path.is_file():
        return value
    if not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        return str(PROJECT_ROOT / path) + sep + rest
    configs = sorted(p.name for p in (PROJECT_ROOT / "configs").glob("*.py")) if (PROJECT_ROOT / "configs").is_dir() else []
    raise FileNotFoundError(
        f"config file {file!r} does not exist (looked in {Path.cwd()} and {PROJECT_ROOT})"
        + (f"; the project's configs are configs/{', configs/'.join(configs)}" if configs else ""))


def with_resolved_config(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg[len("--config="):])
        out.append(arg)
    return out


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def run(main: Callable[[], None]) -> None:
    """Runs an absl `main` (flags already defined) with the behaviour described above."""
    from absl import app, flags

    argv = sys.argv
    if "verbose" not in flags.FLAGS:  # listed with the command's own flags in --help
        flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.", module_name=argv[0])
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    verbose = "--verbose" in argv

    def fail(error: BaseException):
        if verbose:
            raise error
        print(f"error: {one_line(error)}", file=sys.stderr)
        if not isinstance(error, app.UsageError):
            print("(run again with --verbose for the traceback)", file=sys.stderr)
        sys.exit(1)

    def parse(args: list[str]) -> list[str]:
        from c2c_jax.config import parse_flags

        try:
            return parse_flags(with_resolved_config(args))
        except flags.Error as error:  # an unknown flag, a missing --config, an unparsable value
            fail(app.UsageError(str(error)))
        except USER_ERRORS as error:  # the config file itself failed to load
            fail(error)

    def guarded(argv_left: list[str]) -> None:
        import logging

        # jax reports at INFO level every platform it could not start ("Unable to initialize backend
        # 'tpu'" on every CPU machine); the commands' own INFO lines stay.
        logging.getLogger("jax").setLevel(logging.WARNING)
        if len(argv_left) > 1:
            fail(app.UsageError(f"unexpected argument(s): {' '.join(argv_left[1:])} (flags look like --name=value)"))
        try:
            main()
        except app.UsageError as error:
            fail(error)
        except USER_ERRORS as error:
            fail(error)

    app.run(guarded, argv=argv, flags_parser=parse)
