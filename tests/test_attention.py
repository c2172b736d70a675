"""`prefix_attention` (two mask-free parts merged by their logsumexp, with its own VJP) against one
masked softmax differentiated by jax, on the XLA implementation (the cuDNN one shares the merge);
`cache_attention` after a cache
(the cache and the new tokens as two parts of one softmax) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2c_jax.models.attention import (DECODE_BLOCK, cache_attention, decode_attention, prefix_attention,
                                      resolve_implementation)
from c2c_jax.models.decoder import attention_mask


def masked_softmax_attention(q, prefix_k, prefix_v, prefix_lengths, new_k, new_v):
    """One softmax over [prefix keys, new keys] with the visibility written out as a mask."""
    b, t, n, d = q.shape
    p, kv = prefix_k.shape[1], prefix_k.shape[2]
    keys = jnp.repeat(jnp.concatenate([prefix_k, new_k], axis=1), n // kv, axis=2)
    values = jnp.repeat(jnp.concatenate([prefix_v, new_v], axis=1), n // kv, axis=2)
    scores = jnp.einsum("btnd,bsnd->bnts", q, keys) / np.sqrt(d)
    column = jnp.arange(p + t)
    visible = jnp.where(column < p, column[None, :] < prefix_lengths[:, None], True)[:, None, None, :]
    visible = visible & (column[None, :] - p <= jnp.arange(t)[:, None])[None, None]
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnd->btnd", weights, values)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
def test_prefix_attention_and_its_gradients_equal_one_masked_softmax(heads, kv_heads):
    b, p, t, d = 4, 7, 5, 8
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (b, t, heads, d))
    prefix_k, prefix_v = (jax.random.normal(k, (b, p, kv_heads, d)) for k in keys[1:3])
    new_k, new_v = (jax.random.normal(k, (b, t, kv_heads, d)) for k in keys[3:5])
    d_out = jax.random.normal(keys[5], (b, t, heads, d))
    prefix_lengths = jnp.array([7, 3, 0, 1])  # a full prefix, a short one, none at all, one key

    ours = lambda *a: prefix_attention(*a[:3], prefix_lengths, *a[3:], implementation="xla")  # noqa: E731
    reference = lambda *a: masked_softmax_attention(*a[:3], prefix_lengths, *a[3:])  # noqa: E731
    args = (q, prefix_k, prefix_v, new_k, new_v)
    out, vjp = jax.vjp(ours, *args)
    ref_out, ref_vjp = jax.vjp(reference, *args)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=0)
    for name, grad, ref_grad in zip(("q", "prefix_k", "prefix_v", "new_k", "new_v"), vjp(d_out), ref_vjp(d_out)):
        np.testing.assert_allclose(grad, ref_grad, atol=1e-5, rtol=0, err_msg=name)
    # Keys past a row's prefix length are invisible: no gradient reaches them.
    grads = vjp(d_out)
    assert not np.asarray(grads[1][1, 3:]).any() and not np.asarray(grads[2][2]).any()


def test_prefix_attention_under_jit_and_grad_of_a_scalar():
    b, p, t, h, d = 2, 6, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(keys[0], (b, t, h, d))
    pk, pv = (jax.random.normal(k, (b, p, h, d)) for k in keys[1:3])
    nk, nv = (jax.random.normal(k, (b, t, h, d)) for k in keys[3:5])
    lengths = jnp.array([6, 2])

    def loss(fn, q, pk, pv, nk, nv):
        return jnp.sum(jnp.tanh(fn(q, pk, pv, lengths, nk, nv)))

    ours = jax.jit(jax.grad(lambda *a: loss(lambda *x: prefix_attention(*x, implementation="xla"), *a),
                            argnums=(0, 1, 2, 3, 4)))
    ref = jax.grad(lambda *a: loss(masked_softmax_attention, *a), argnums=(0, 1, 2, 3, 4))
    for got, want in zip(ours(q, pk, pv, nk, nv), ref(q, pk, pv, nk, nv)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# (cache columns, end, hidden cached columns per row): one block of keys for the Pallas kernel; and
# several (blocks of 64), where it skips whole blocks: before a row's start, from the end on, and all
# of them for a row that sees only its new token (a free server slot).
CACHES = {"one block": (16, 7, [slice(0, 3), slice(4, 5)]),
          "four blocks": (256, 150, [slice(0, 70), slice(100, 101), slice(0, 150)])}


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("num_new", [1, 3])
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (2, 2)])  # query heads per kv head: 2, 3, 1
def test_cache_attention_after_a_cache_equals_numpy_over_the_written_cache(cache, num_new, implementation, heads,
                                                                           kv_heads):
    """New tokens at columns [end, end + T) of a cache whose columns from `end` on hold stale K/V (as
    after the pipeline rewinds a prompt cache) and with padding among the cached columns: the same
    as NumPy softmax attention over the cache with the new K/V written in, under the decoder's mask.
    "pallas" is the Pallas decode kernel (in Pallas' interpreter here) for one new token."""
    s, end, hidden = CACHES[cache]
    layers, layer, b, d = 3, 1, len(hidden), 8
    rng = np.random.default_rng(0)
    q = rng.normal(size=(b, num_new, heads, d)).astype(np.float32)
    cache_k, cache_v = (rng.normal(size=(layers, b, s, kv_heads, d)).astype(np.float32) for _ in range(2))
    new_k, new_v = (rng.normal(size=(b, num_new, kv_heads, d)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, s), bool)
    for row, columns in enumerate(hidden):  # left padding, a pad inside the row, or every cached column
        valid[row, columns] = False
    new_valid = np.ones((b, num_new), bool)
    valid[:, end:end + num_new] = new_valid
    mask = attention_mask(jnp.asarray(valid), end, num_new)
    expected_route = "pallas" if implementation == "pallas" and num_new == 1 else "xla"
    assert resolve_implementation(implementation, jnp.asarray(q), num_new, cache_k) == expected_route
    ours = cache_attention(q, new_k, new_v, cache_k, cache_v, layer, mask=mask, end=jnp.asarray(end, jnp.int32),
                           implementation=implementation)

    cached_k, cached_v = cache_k[layer], cache_v[layer]
    keys, values = cached_k.copy(), cached_v.copy()
    keys[:, end:end + num_new], values[:, end:end + num_new] = new_k, new_v
    keys, values = np.repeat(keys, heads // kv_heads, axis=2), np.repeat(values, heads // kv_heads, axis=2)
    scores = np.einsum("btnd,bsnd->bnts", q, keys) / np.sqrt(d)
    scores = np.where(np.asarray(mask), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    reference = np.einsum("bnts,bsnd->btnd", weights, values)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


def test_the_pallas_decode_kernel_reads_no_block_whose_cached_keys_are_all_hidden():
    """NaN K/V in the blocks a row cannot see (before its start, from the cache's end on) leave its
    output as it was: the kernel loads no block of DECODE_BLOCK keys that are all hidden."""
    layers, layer, b, heads, kv_heads, d = 2, 1, 2, 4, 2, 8
    s, end, start = 4 * DECODE_BLOCK, 2 * DECODE_BLOCK + 22, DECODE_BLOCK + 6
    rng = np.random.default_rng(0)
    q = rng.normal(size=(b, 1, heads, d)).astype(np.float32)
    new_k, new_v = (rng.normal(size=(b, 1, kv_heads, d)).astype(np.float32) for _ in range(2))
    cache_k, cache_v = (rng.normal(size=(layers, b, s, kv_heads, d)).astype(np.float32) for _ in range(2))
    visible = np.zeros((b, s), bool)
    visible[0, start:end] = True  # row 0: a prompt that starts in the second block
    visible[1, :end] = True
    clean = decode_attention(q, new_k, new_v, cache_k, cache_v, layer, jnp.asarray(visible))
    for cache in (cache_k, cache_v):
        cache[layer, 0, :DECODE_BLOCK] = np.nan  # row 0's first block
        cache[layer, :, 3 * DECODE_BLOCK:] = np.nan  # every row's last block, past the end
    poisoned = decode_attention(q, new_k, new_v, cache_k, cache_v, layer, jnp.asarray(visible))
    assert np.isfinite(np.asarray(clean)).all()
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))


def test_the_pallas_decode_kernel_lowers_to_triton_for_a_gpu():
    """The kernel as a GPU compile sees it, lowered on this machine (`jax.export` for CUDA) at a
    server's decode shapes (Qwen3-0.6B, 256 slots of 384 columns): Pallas turns it into one Triton
    call over a grid of rows x query heads x key blocks, so a construct that Pallas cannot lower to
    Triton fails here, not first on a GPU (compiling the Triton code itself needs one)."""
    layers, b, s, heads, kv_heads, d = 28, 256, 384, 16, 8, 128
    spec = jax.ShapeDtypeStruct
    args = (spec((b, 1, heads, d), jnp.bfloat16), spec((b, 1, kv_heads, d), jnp.bfloat16),
            spec((b, 1, kv_heads, d), jnp.bfloat16), spec((layers, b, s, kv_heads, d), jnp.bfloat16),
            spec((layers, b, s, kv_heads, d), jnp.bfloat16), spec((), jnp.int32), spec((b, s), jnp.bool_))
    kernel = lambda *a: decode_attention(*a, platform="gpu")  # noqa: E731
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(jax.jit(kernel), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(*args)
    module = exported.mlir_module()
    assert module.count(f"stablehlo.custom_call @{triton}") == 1
    assert f"grid_x = {b} : i32, grid_y = {heads} : i32, grid_z = {s // DECODE_BLOCK} : i32" in module


def test_cache_attention_after_a_cache_without_a_mask_is_an_error():
    q, k = jnp.zeros((1, 1, 2, 4)), jnp.zeros((1, 1, 2, 4))
    cached = jnp.zeros((2, 1, 16, 2, 4))
    for implementation in ("xla", "pallas"):
        with pytest.raises(ValueError, match="needs its mask"):
            cache_attention(q, k, k, cached, cached, 1, mask=None, end=3, implementation=implementation)
    with pytest.raises(ValueError, match="unknown attention implementation 'triton'; choose one of auto, xla, cudnn"):
        cache_attention(q, k, k, cached, cached, 1, mask=None, end=3, implementation="triton")
