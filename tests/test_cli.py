"""The commands at their edge: one-line errors found before any model loads, --help, configs from anywhere."""

import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from c2c_jax import build
from c2c_jax.c2c.fuser import Fuser
from c2c_jax.infer.fuser_io import save_fuser
from c2c_jax.models import load_model
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]


def command(module, *args, cwd):
    return subprocess.run([sys.executable, "-m", f"c2c_jax.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def error_line(result) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def tiny_pair_fuser(tmp_path_factory):
    """A fuser saved for configs/tiny.py's pair (receiver random:qwen3, sharer random:qwen2)."""
    config = tiny.get_config()
    receiver, sharer = load_model(config.receiver.path), load_model(config.sharer.path)
    directory = tmp_path_factory.mktemp("fuser")
    save_fuser(Fuser(build.fuser_config(config, receiver, sharer), rngs=nnx.Rngs(0)), directory)
    return directory


def test_missing_fuser_and_fuser_for_another_pair_fail_in_one_line_before_loading(tmp_path, tiny_pair_fuser):
    missing = command("generate", "--config=configs/tiny.py", f"--config.generate.fuser={tmp_path / 'nope'}",
                      "--prompt=hi", cwd=tmp_path)
    assert error_line(missing) == f"error: fuser directory {tmp_path / 'nope'} does not exist"
    assert "loading random:" not in missing.stderr  # no model was loaded first

    not_a_fuser = command("generate", "--config=configs/tiny.py", f"--config.generate.fuser={tmp_path}",
                          "--prompt=hi", cwd=tmp_path)
    assert "is not a fuser directory" in error_line(not_a_fuser)

    # The same fuser with a sharer of another shape (random:llama has 2 KV heads of 16, qwen2 ...).
    other_pair = command("evaluate", "--config=configs/tiny.py", "--config.sharer.path=random:llama",
                         f"--config.eval.fuser={tiny_pair_fuser}", "--config.eval.methods=c2c",
                         f"--workdir={tmp_path}", cwd=tmp_path)
    line = error_line(other_pair)
    assert "belongs to another model pair" in line and str(tiny_pair_fuser) in line
    assert "loading random:" not in other_pair.stderr

    with_traceback = command("generate", "--config=configs/tiny.py", f"--config.generate.fuser={tmp_path / 'nope'}",
                             "--prompt=hi", "--verbose", cwd=tmp_path)
    assert with_traceback.returncode != 0 and "Traceback" in with_traceback.stderr


def test_config_is_found_from_any_directory_and_a_missing_one_is_named(tmp_path):
    missing = command("train", "--config=configs/nope.py", f"--workdir={tmp_path}", cwd=tmp_path)
    line = error_line(missing)
    assert "config file 'configs/nope.py' does not exist" in line and "configs/tiny.py" in line

    # configs/tiny.py does not exist under tmp_path: it is found in the project folder, and the run
    # gets as far as the data check (a missing chat file), which also fails in one line.
    found = command("train", "--config=configs/tiny.py", "--config.data.source=missing.jsonl", "--config.mesh.data=1",
                    f"--workdir={tmp_path}", cwd=tmp_path)
    assert "data.source 'missing.jsonl' is neither one of" in error_line(found)
    assert "loading random:" not in found.stderr


def test_serve_refuses_a_bad_limit_and_a_missing_fuser_in_one_line_before_loading(tmp_path):
    bad_limit = command("serve", "--config=configs/tiny.py", "--decode_steps=0", cwd=tmp_path)
    assert error_line(bad_limit) == "error: flag --decode_steps=0: 0 is not a positive integer"
    bad_lengths = command("serve", "--config=configs/tiny.py", "--warm_up=256,long", cwd=tmp_path)
    assert "--warm_up takes prompt lengths in tokens" in error_line(bad_lengths)
    for fuser_flag in (f"--config.generate.fuser={tmp_path / 'nope'}", f"--route=other={tmp_path / 'nope'}"):
        missing = command("serve", "--config=configs/tiny.py", fuser_flag, cwd=tmp_path)
        assert error_line(missing) == f"error: fuser directory {tmp_path / 'nope'} does not exist"
        assert "loading random:" not in missing.stderr


@pytest.mark.parametrize("module", ["train", "evaluate", "generate", "demo", "serve"])
def test_help_exits_zero_and_lists_the_flags(module, tmp_path):
    result = command(module, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config" in result.stdout and "--[no]verbose" in result.stdout
