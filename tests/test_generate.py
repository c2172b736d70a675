"""The side-by-side CLI helpers: both answers per prompt, two conversations that grow turn by turn."""

import subprocess
import sys
from pathlib import Path

from c2c_jax import build
from c2c_jax.generate import answer_prompts, chat_loop
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.fuser_io import save_fuser
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_answers_and_chat_show_both_models(tmp_path):
    config = tiny.get_config()
    receiver, _, sharer, _ = build.load_pair(config)
    fuser = build.new_fuser(config, receiver, sharer)
    fuser.projectors.gate_logit[...] = 1.0 + 0 * fuser.projectors.gate_logit[...]
    save_fuser(fuser, tmp_path / "fuser")
    generator = build.load_generator(config, str(tmp_path / "fuser"))
    sampling = SamplingConfig(max_new_tokens=4)

    blocks = answer_prompts(generator, ["what is 2+2?", "hi"], sampling)
    assert len(blocks) == 2 and all("receiver alone:" in b and "receiver + C2C:" in b for b in blocks)
    alone = generator.chat([[{"role": "user", "content": "hi"}]], sampling, fuse=False)[0]
    assert alone in blocks[1]

    script = iter(["first question", "second question", "/reset", "third", ""])
    shown = []
    seen_lengths = []
    original_chat = generator.chat

    def spy(conversations, *args, **kwargs):
        seen_lengths.append(len(conversations[0]))
        return original_chat(conversations, *args, **kwargs)

    generator.chat = spy
    chat_loop(generator, sampling, read=lambda _: next(script), write=shown.append)
    # Turn 1: one user message; turn 2: user, assistant, user; after /reset: one again. Each for both models.
    assert seen_lengths == [1, 1, 3, 3, 1, 1]
    assert sum("> second question" in s for s in shown) == 1


def test_cli_requires_a_fuser():
    result = subprocess.run([sys.executable, "-m", "c2c_jax.generate", "--config=configs/tiny.py", "--prompt=hi"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "config.generate.fuser" in result.stderr


def test_inference_xla_flags_go_first_on_a_gpu_and_a_users_own_setting_wins():
    from c2c_jax.config import GPU_INFERENCE_XLA_FLAGS, use_inference_xla_flags

    env = {}
    assert use_inference_xla_flags(env, gpu=True) == " ".join(GPU_INFERENCE_XLA_FLAGS)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/hlo"}
    assert use_inference_xla_flags(env, gpu=True) == " ".join(GPU_INFERENCE_XLA_FLAGS) + " --xla_dump_to=/tmp/hlo"
    # A user who sets the scheduling mode keeps theirs, alone.
    env = {"XLA_FLAGS": "--xla_gpu_command_buffer_scheduling_mode=SERIALIZE"}
    assert use_inference_xla_flags(env, gpu=True) == "--xla_gpu_command_buffer_scheduling_mode=SERIALIZE"
    # Without a CUDA build of jax nothing changes (a TPU's XLA need not know GPU flags).
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/hlo"}
    assert use_inference_xla_flags(env, gpu=False) == "--xla_dump_to=/tmp/hlo"
    assert use_inference_xla_flags({}, gpu=False) == ""


def test_inference_xla_flags_are_known_to_the_installed_jaxlib():
    import os
    import subprocess
    import sys

    from c2c_jax.config import GPU_INFERENCE_XLA_FLAGS

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(GPU_INFERENCE_XLA_FLAGS))
    result = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "2.0" in result.stdout, result.stderr[-2000:]
