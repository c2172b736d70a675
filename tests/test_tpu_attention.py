"""The TPU (Mosaic) attention kernels, run in Pallas' TPU interpreter on the CPU, against the XLA
route: splash attention for a fresh causal prefill and for the training suffix pass (forward and
gradients), and `tpu_decode_attention` for one new token over the stacked cache. Which kernel
each call takes is decided by the target platform, never by the host's backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2c_jax.models.attention import cache_attention, prefix_attention, recorded_routes, resolve_implementation
from c2c_jax.models.decoder import attention_mask


def normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_splash_prefill_equals_the_xla_route(heads, kv_heads):
    b, t, d = 2, 256, 32
    keys = jax.random.split(jax.random.key(0), 3)
    q = normal(keys[0], (b, t, heads, d))
    k, v = normal(keys[1], (b, t, kv_heads, d)), normal(keys[2], (b, t, kv_heads, d))
    with recorded_routes() as routes:
        ours = cache_attention(q, k, v, mask=None, end=0, implementation="mosaic")
    assert routes == {"prefill:mosaic": 1}
    reference = cache_attention(q, k, v, mask=None, end=0, implementation="xla")
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=0)


def test_splash_training_pass_and_its_gradients_equal_the_xla_route():
    b, p, t, heads, kv_heads, d = 3, 128, 128, 4, 2, 32
    keys = jax.random.split(jax.random.key(1), 6)
    q = normal(keys[0], (b, t, heads, d))
    prefix_k, prefix_v = (normal(k, (b, p, kv_heads, d)) for k in keys[1:3])
    new_k, new_v = (normal(k, (b, t, kv_heads, d)) for k in keys[3:5])
    d_out = normal(keys[5], (b, t, heads, d))
    prefix_lengths = jnp.array([128, 37, 0])  # a full prefix, a padded one, none at all

    def route(implementation):
        return lambda *a: prefix_attention(*a[:3], prefix_lengths, *a[3:], implementation=implementation)

    args = (q, prefix_k, prefix_v, new_k, new_v)
    with recorded_routes() as routes:
        out, vjp = jax.vjp(route("mosaic"), *args)
    assert routes == {"prefix:mosaic": 1}
    ref_out, ref_vjp = jax.vjp(route("xla"), *args)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    for name, grad, ref_grad in zip(("q", "prefix_k", "prefix_v", "new_k", "new_v"), vjp(d_out), ref_vjp(d_out)):
        np.testing.assert_allclose(grad, ref_grad, atol=5e-5, rtol=0, err_msg=name)
    assert not np.asarray(vjp(d_out)[1][1, 37:]).any()  # padding keys get no gradient


def test_tpu_decode_kernel_equals_numpy_over_the_written_cache():
    """One new token after a cache with left padding, a hole and stale columns from `end` on."""
    layers, layer, b, s, heads, kv_heads, d, end = 3, 2, 2, 256, 4, 2, 32, 150
    rng = np.random.default_rng(0)
    q = rng.normal(size=(b, 1, heads, d)).astype(np.float32)
    cache_k, cache_v = (rng.normal(size=(layers, b, s, kv_heads, d)).astype(np.float32) for _ in range(2))
    new_k, new_v = (rng.normal(size=(b, 1, kv_heads, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, s), bool)
    valid[0, :140] = False  # left padding reaching into the second key block
    valid[1, 4] = False  # a hole
    mask = attention_mask(jnp.asarray(valid), end, 1)
    with recorded_routes() as routes:
        ours = cache_attention(q, new_k, new_v, cache_k, cache_v, layer, mask=mask, end=jnp.asarray(end, jnp.int32),
                               implementation="mosaic")
    assert routes == {"cache:mosaic": 1}

    keys, values = cache_k[layer].copy(), cache_v[layer].copy()
    keys[:, end], values[:, end] = new_k[:, 0], new_v[:, 0]
    keys, values = np.repeat(keys, heads // kv_heads, axis=2), np.repeat(values, heads // kv_heads, axis=2)
    scores = np.where(np.asarray(mask), np.einsum("btnd,bsnd->bnts", q, keys) / np.sqrt(d), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    reference = np.einsum("bnts,bsnd->btnd", weights / weights.sum(-1, keepdims=True), values)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


def test_the_target_platform_picks_the_kernels():
    q = jnp.zeros((1, 128, 4, 32), jnp.bfloat16)
    cache = jnp.zeros((2, 1, 256, 2, 32), jnp.bfloat16)
    assert resolve_implementation("auto", q, 128, platform="tpu", num_keys=128) == "mosaic"
    assert resolve_implementation("auto", q[:, :1], 1, cache, platform="tpu") == "mosaic"
    assert resolve_implementation("auto", q, 128, platform="gpu", num_keys=128) == "cudnn"
    assert resolve_implementation("auto", q[:, :1], 1, cache, platform="gpu") == "pallas"
    # Shapes the TPU kernels do not tile take XLA; so does the CPU.
    assert resolve_implementation("auto", q[:, :96], 96, platform="tpu", num_keys=96) == "xla"
    assert resolve_implementation("auto", q[:, :1], 1, cache[:, :, :200], platform="tpu") == "xla"
    assert resolve_implementation("auto", q, 128, platform="cpu", num_keys=128) == "xla"


def test_inference_split_over_a_mesh_with_the_tpu_kernels_equals_one_device_on_xla():
    """`Generator(mesh=...)`: rows split over 4 devices (a batch of 3 filled to 4), the TPU kernels run
    per device through shard_map (interpreted here); the same logits and tokens as one device on XLA."""
    import ml_collections
    from flax import nnx

    from c2c_jax import sharding
    from c2c_jax.c2c.fuser import Fuser, FuserConfig
    from c2c_jax.c2c.layer_map import layer_map
    from c2c_jax.c2c.model import C2CModel
    from c2c_jax.c2c.prompt import PromptEncoder
    from c2c_jax.infer.decode import SamplingConfig
    from c2c_jax.infer.generator import Generator
    from c2c_jax.models import load_model
    from c2c_jax.models.tiny import byte_tokenizer

    fuser = Fuser(FuserConfig(receiver_layers=4, receiver_kv_heads=2, receiver_head_dim=32, sharer_kv_heads=1,
                              sharer_head_dim=16, layer_map=layer_map("terminal", 4, 3), hidden_dim=32,
                              intermediate_dim=48, dtype="float32"), rngs=nnx.Rngs(0))
    fuser.projectors.gate_logit[...] = jnp.ones((4, 2))  # every gate open

    def generator(implementation, mesh):
        receiver, sharer = (load_model(f"random:{family}", dtype=jnp.float32, attention_impl=implementation)
                            for family in ("qwen3", "qwen2"))
        tokenizer = byte_tokenizer()
        return Generator(C2CModel(receiver, [sharer], [fuser]), PromptEncoder(tokenizer, [tokenizer], pad_to=128),
                         mesh=mesh)

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2)), jax.devices()[:4])
    split, alone = generator("mosaic", mesh), generator("xla", None)
    chats = [[{"role": "user", "content": text}] for text in ("what is the capital of france ?", "hi", "one two")]
    batch = alone.encoder.batch([alone.encoder.encode_chat(c) for c in chats])
    with recorded_routes() as routes:
        logits = jax.device_get(split.next_token_logits(batch))
    assert routes["prefill:mosaic"] == 2 and routes["cache:mosaic"] == 1
    assert logits.shape[0] == 4  # filled to the mesh's size
    np.testing.assert_allclose(logits[:3], jax.device_get(alone.next_token_logits(batch)), atol=1e-4, rtol=0)
    sampling = SamplingConfig(max_new_tokens=4)
    ours, reference = (jax.device_get(g.generate_batch(batch, sampling)) for g in (split, alone))
    np.testing.assert_array_equal(ours.tokens[:3], reference.tokens)
