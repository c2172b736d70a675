"""The TPU compile check (`c2c_jax.aot`): tiny-model versions of the train step and the inference
programs compiled ahead of time for a TPU slice with a data x fsdp mesh, on this CPU machine.

Needs libtpu (`pip install "jax[tpu]"`); skipped without it. Only one process may hold libtpu, so
everything that loads it is one test function (and its own xdist group)."""

import fcntl
import multiprocessing
import os

import jax
import pytest

from c2c_jax import aot
from c2c_jax.c2c.layer_map import layer_map
from c2c_jax.c2c.fuser import FuserConfig
from c2c_jax.models.architectures import architecture_of
from c2c_jax.config import resolve_micro_batch
from configs import demo, llama, qwen, qwen3_4b, tiny

pytestmark = pytest.mark.xdist_group("libtpu")  # with --dist loadgroup: one worker holds libtpu


def test_tiny_programs_compile_for_a_tpu_slice_with_tpu_kernels_and_a_sharded_optimizer():
    pytest.importorskip("libtpu", reason='libtpu is not installed (pip install "jax[tpu]"): no TPU compile check')
    config = tiny.get_config()
    config.mesh.update(data=2, fsdp=4)
    config.train.update(micro_batch_size=8, batch_size=16)
    config.receiver.dtype = config.sharer.dtype = "bfloat16"
    config.eval.batch_size = 8
    serve_limits = dict(slots=4, max_prompt_tokens=100, max_tokens=20, max_prefill_batch=2, decode_steps=2)
    # conftest asks for float32 matmuls everywhere; Mosaic cannot give a bfloat16 kernel that precision.
    with jax.default_matmul_precision("default"):
        reports = {r.name: r for r in aot.run(config, aot.topology_named("v5e-8"), serve_limits=serve_limits,
                                              log=lambda *_: None)}
    assert set(reports) == set(aot.PROGRAMS)
    for name, report in reports.items():
        assert report.fits, (name, report.error)
        assert not report.gpu_only_calls, name
        if name in ("serve_compact", "serve_move_row"):  # move cache columns or rows: no attention
            assert not report.attention_routes and report.mosaic_calls == 0
            continue
        # Every attention call takes a Pallas TPU kernel (tiny shapes tile), none a GPU route.
        assert report.attention_routes and all(r.endswith(":mosaic") for r in report.attention_routes), \
            (name, report.attention_routes)
        assert report.mosaic_calls > 0, name
    # The server's programs run on one chip: no collectives. Its decode call is the receiver's one
    # token over the cached slots, in a loop of `decode_steps`; its prefill fuses the sharer's cache
    # (two prefills) and admits the prompts' last token over the fused cache.
    for name in aot.SERVE_PROGRAMS:
        assert not reports[name].collectives, (name, reports[name].collectives)
    assert reports["serve_decode"].attention_routes == {"cache:mosaic": 1}
    assert reports["serve_prefill"].attention_routes.get("prefill:mosaic") == 2
    train = reports["train"]
    # Prefills of receiver and sharer, the suffix pass and its two backward kernels.
    assert train.attention_routes == {"prefill:mosaic": 2, "prefix:mosaic": 1} and train.mosaic_calls == 5
    # FSDP: the fuser's parameters and Adam moments are split over the 4 fsdp chips (the gate logits
    # and a few tiny vectors stay whole), and the step gathers them.
    assert train.state_bytes_per_chip < 0.3 * train.state_bytes
    assert train.collectives.get("all-gather", 0) > 0


@pytest.mark.parametrize("platform, devices, configured, resolved", [
    ("gpu", 1, (256, 0), (256, 16)),  # 0 off a TPU: 16 rows per forward/backward
    ("gpu", 2, (256, 0), (256, 16)),
    ("cpu", 1, (8, 0), (8, 8)),  # ... at most the batch
    ("tpu", 8, (256, 0), (256, 8)),  # 0 on a TPU: one row per chip
    ("tpu", 16, (256, 0), (256, 16)),
    ("tpu", 4, (256, 0), (256, 4)),  # v4-8, v5p-8: four chips
    ("tpu", 16, (8, 0), (16, 16)),  # a batch smaller than the slice grows to one row per chip
    ("tpu", 8, (8, 4), (16, 8)),  # a given micro-batch grows to whole rows per chip, the batch with it
    ("gpu", 1, (8, 4), (8, 4)),  # ... and is kept where it has them
    ("tpu", 8, (256, 16), (256, 16)),
])
def test_micro_batch_is_one_row_per_chip_on_a_tpu_and_always_whole_rows_per_device(platform, devices, configured,
                                                                                   resolved):
    config = tiny.get_config()
    config.train.batch_size, config.train.micro_batch_size = configured
    out = resolve_micro_batch(config, devices, platform)
    assert (out.train.batch_size, out.train.micro_batch_size) == resolved
    assert out.train.batch_size % out.train.micro_batch_size == 0 and out.train.micro_batch_size % devices == 0
    assert (config.train.batch_size, config.train.micro_batch_size) == configured  # a copy


def test_every_config_leaves_the_micro_batch_to_the_rule_or_gives_one():
    """configs/*.py with defaults give whole rows per chip on every slice `aot` is asked for by the launch scripts."""
    for module in (demo, llama, qwen, qwen3_4b, tiny):
        config = module.get_config()
        for devices in (1, 4, 8, 16):
            out = resolve_micro_batch(config, devices, "tpu")
            assert out.train.micro_batch_size % devices == 0 and out.train.batch_size % out.train.micro_batch_size == 0
    assert resolve_micro_batch(qwen.get_config(), 8, "tpu").train.micro_batch_size == 8


def test_topologies_name_the_slices_the_launch_scripts_offer():
    for name in ("v4-8", "v5p-8", "v5e-8", "v5e-16", "v6e-8", "v6e-16"):
        assert aot.topology_named(name).name == name
    assert aot.topology_named("v5e:4x4").name == "v5e-16"
    assert aot.topology_named("v6e:8x8").hbm_gib == 31.25
    with pytest.raises(ValueError, match="unknown TPU topology 'v7x-8'"):
        aot.topology_named("v7x-8")


def test_a_program_over_the_chips_memory_or_with_a_gpu_call_does_not_fit():
    assert aot.ProgramReport("train", 1.0, hbm_bytes=100, peak_bytes=100).fits
    assert not aot.ProgramReport("train", 1.0, hbm_bytes=100, peak_bytes=101).fits
    assert not aot.ProgramReport("train", 1.0, hbm_bytes=100, error="RESOURCE_EXHAUSTED: Ran out of memory").fits
    assert not aot.ProgramReport("train", 1.0, hbm_bytes=100, gpu_only_calls=["__cudnn$fmhaSoftmax"]).fits


def _hold_lock(path, ready, release):
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # libtpu's kind of lock
    ready.set()
    release.wait(60)


def test_a_held_libtpu_lock_names_its_process(tmp_path):
    lockfile = str(tmp_path / "libtpu_lockfile")
    open(lockfile, "w").close()
    assert aot.libtpu_holder(lockfile) is None
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(lockfile, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert aot.libtpu_holder(lockfile) == holder.pid
    finally:
        release.set()
        holder.join()


def test_pinned_architectures_give_the_published_fuser_sizes():
    """docs/upstream_reference.md §1.7: the fuser of each pair (h = m = 1024, 3 layers) has the size the paper's
    checkpoints have, which the architectures' layer counts, kv heads and head dims decide."""
    def fuser_params(receiver, sharer):
        r, s = architecture_of(receiver), architecture_of(sharer)
        return FuserConfig(receiver_layers=r.num_layers, receiver_kv_heads=r.num_kv_heads,
                           receiver_head_dim=r.head_dim, sharer_kv_heads=s.num_kv_heads, sharer_head_dim=s.head_dim,
                           layer_map=layer_map("terminal", r.num_layers, s.num_layers)).num_params()

    assert fuser_params("Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-0.5B-Instruct") == 477_848_056
    assert round(fuser_params("Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B-Base") / 1e5) == 5292
    assert round(fuser_params("Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B-Instruct") / 1e5) == 4999
    with pytest.raises(ValueError, match="no architecture known offline for model 'org/unknown'"):
        architecture_of("org/unknown")
