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
