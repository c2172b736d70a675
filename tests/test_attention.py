"""`prefix_attention` (two mask-free parts merged by their logsumexp, with its own VJP) against one
masked softmax differentiated by jax, on the XLA implementation (the cuDNN one shares the merge and
is checked against it on the GPU by bench/bench_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2c_jax.models.attention import prefix_attention


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
