"""The decoder's attention: over a KV cache, and over a prefix cache followed by new tokens.

`cache_attention` serves prefill and decode: the new tokens' queries over a cache with a per-column
validity mask. A fresh prefill goes through `jax.nn.dot_product_attention` (cuDNN on GPU). New
tokens after a cache (decode, the last prompt token) attend to the cache and to themselves as two
parts of one softmax, so the layer's cache slice is only read (see `_cache_then_new_attention`); on
a GPU one new token per row goes to a Pallas kernel that reads the stacked cache in place
(`decode_attention`, inference only: it has no VJP).

On a TPU ("mosaic", chosen by the target platform: `Decoder.platform`), Pallas TPU kernels take
the same places: splash attention (`jax.experimental.pallas.ops.tpu`) for a fresh causal prefill
and for the training suffix pass (with its backward), and `tpu_decode_attention` for one new token
over the stacked cache. Sequence lengths must be multiples of TPU_BLOCK; other shapes take XLA.
Under a mesh (`jax.sharding.use_abstract_mesh`) the kernels run per device over its rows
(`shard_map` over the batch axes), since XLA cannot split a custom call itself.

`prefix_attention` serves the training suffix pass (`Decoder.extend`): new tokens (a receiver's
answer) over a whole prefix cache (the fused prompt) and causally over themselves. In one
softmax that needs a mask, which cuDNN reads as a bias over the full T x (P + T) rectangle (25 % of
the attention's time on an H200, docs/performance.md). Here it is two mask-free parts, merged
through their softmax statistics:

    prefix part:  queries over the prefix keys, the first `prefix_lengths[b]` of row b real
                  (cuDNN's native key-length mask);
    causal part:  queries over the new keys, top-left causal (cuDNN's native causal mask);
    out = (exp(lse_p) o_p + exp(lse_c) o_c) / (exp(lse_p) + exp(lse_c)).

jax's cuDNN VJP ignores the cotangent of the statistics it returns, so the merge has its own VJP:
each part's backward runs with the merged output and statistics, which gives exactly the gradient
of the one softmax (as in ring attention). Both parts have an XLA and a cuDNN implementation.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

AttentionImpl = Literal["auto", "xla", "cudnn", "pallas", "mosaic"]
_MASKED = -1e30  # score of a hidden key: exp(_MASKED - lse) == 0 in float32, and never NaN
DECODE_BLOCK = 64  # cached keys per program of the Pallas decode kernel (at most)
TPU_BLOCK = 128  # splash attention's smallest tile: its sequence lengths must be multiples of it


def check_implementation(setting: str) -> None:
    choices = get_args(AttentionImpl)
    if setting not in choices:
        raise ValueError(f"unknown attention implementation {setting!r}; choose one of {', '.join(choices)}")


_recorded_routes: list[collections.Counter] = []


@contextlib.contextmanager
def recorded_routes():
    """Counts, per attention call traced inside, its pass and implementation ("prefill:cudnn",
    "cache:pallas", "prefix:xla"): which kernels a compiled program uses (`c2c_jax.aot` reports it)."""
    routes = collections.Counter()
    _recorded_routes.append(routes)
    try:
        yield routes
    finally:
        _recorded_routes.remove(routes)


def _record(kind: str, implementation: str) -> None:
    for routes in _recorded_routes:
        routes[f"{kind}:{implementation}"] += 1


def resolve_implementation(setting: AttentionImpl, q: jax.Array, num_new: int, cache_k: jax.Array | None = None,
                           *, platform: str | None = None, num_keys: int | None = None
                           ) -> Literal["xla", "cudnn", "pallas", "mosaic"]:
    """The kernel for an attention call, by the target platform ("tpu", "gpu", "cpu"; default
    `jax.default_backend()`, which during a deviceless TPU compile says "cpu": pass the mesh's).

    GPU: cuDNN flash attention for prefill, the Pallas kernel `decode_attention` for one new token
    after a cache (decode, the last prompt token). TPU: "mosaic", splash attention over `num_keys`
    keys (prefill, training) and `tpu_decode_attention` after a cache, where their shapes allow.
    XLA elsewhere. "pallas" and "mosaic" ask for those kernels wherever they apply (XLA otherwise);
    off their platform they run in Pallas' interpreter (for tests).
    """
    check_implementation(setting)
    platform = platform or jax.default_backend()
    if cache_k is not None:
        fits = {"pallas": _pallas_decode_fits(q, num_new, cache_k), "mosaic": _tpu_decode_fits(q, num_new, cache_k)}
    else:
        fits = {"pallas": False, "mosaic": num_keys is not None and _splash_fits(num_new, num_keys)}
    if setting in ("pallas", "mosaic"):
        return setting if fits[setting] else "xla"
    if setting != "auto":
        return setting
    if platform == "tpu":
        return "mosaic" if fits["mosaic"] else "xla"
    if platform == "gpu" and fits["pallas"]:
        return "pallas"
    return "cudnn" if platform == "gpu" and num_new > 1 and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"


def cache_attention(q, k_new, v_new, cache_k=None, cache_v=None, layer=None, *, mask, end,
                    implementation: AttentionImpl, platform: str | None = None):
    """Queries q [B, T, heads, head_dim] over layer `layer` of a cache, the new K/V belonging at column `end`.

    cache_k, cache_v: the whole stacked cache [layers, B, S, kv_heads, head_dim] and `layer` an int
    (or a traced int32 in a scan); or None for a fresh prefill (the new tokens fill the whole
    cache): attention then reads the new K/V directly and is causal from column 0, which lets cuDNN
    skip the blocks above the diagonal (a mask, if given, already implies causality). The cache is
    only read: the caller writes the new K/V.
    mask: bool [B, 1, T, S] over the whole cache, new tokens at columns [end, end + T)
    (`models.decoder.attention_mask`); required after a cache.
    """
    fresh = cache_k is None
    # Splash attention takes a fresh prefill's causality alone (the pipeline's passes need no mask).
    impl = resolve_implementation(implementation, q, q.shape[1], cache_k, platform=platform,
                                  num_keys=k_new.shape[1] if fresh and mask is None else None)
    _record("prefill" if fresh else "cache", impl)
    if fresh and impl == "mosaic":
        return splash_attention(q, k_new, v_new, prefix_length=0, platform=platform).astype(q.dtype)
    if fresh:
        return jax.nn.dot_product_attention(q.astype(k_new.dtype), k_new, v_new, mask=mask, is_causal=True,
                                            implementation=impl)
    if mask is None:  # the cache's columns from `end` on are not keys yet: only a mask says so
        raise ValueError("attention after a cache needs its mask (see models.decoder.attention_mask)")
    if impl in ("pallas", "mosaic"):
        # A new token sees itself and the cached columns before `end` that its mask shows.
        cached_visible = mask[:, 0, 0, :] & (jnp.arange(cache_k.shape[2]) < end)
        if impl == "pallas":
            return decode_attention(q, k_new, v_new, cache_k, cache_v, layer, cached_visible, platform=platform)
        return tpu_decode_attention(q, k_new, v_new, cache_k, cache_v, layer, cached_visible, platform=platform)
    cached_k, cached_v = cache_k[layer], cache_v[layer]
    if impl == "xla":
        return _cache_then_new_attention(q, k_new, v_new, cached_k, cached_v, mask, end)
    keys = jax.lax.dynamic_update_slice(cached_k, k_new.astype(cached_k.dtype), (0, end, 0, 0))
    values = jax.lax.dynamic_update_slice(cached_v, v_new.astype(cached_v.dtype), (0, end, 0, 0))
    return jax.nn.dot_product_attention(q.astype(keys.dtype), keys, values, mask=mask, implementation=impl)


def _cache_then_new_attention(q, k_new, v_new, cached_k, cached_v, mask, end):
    """XLA attention of T new tokens over the cache's columns before `end` and over their own K/V
    (which belong at columns [end, end + T)), as two parts of one softmax.

    Writing the new K/V into the layer's cache slice first, as one attention over the slice needs,
    makes XLA copy every layer's slice out of the stacked cache before the layers run: 0.13 ms of a
    512-token prompt's last token on an H200 (docs/performance.md). Here the slice is only read, and
    the caller writes the new K/V into the stacked cache once. Same arithmetic as
    `jax.nn.dot_product_attention`'s XLA route: float32 scores and softmax, probabilities in the
    cache's dtype.
    """
    b, t, n, d = q.shape
    s, kv_heads = cached_k.shape[1], cached_k.shape[2]
    dtype = cached_k.dtype
    grouped_q = _grouped(q.astype(dtype), kv_heads)  # [B, T, kv_heads, group, D]
    # mask [B, 1, T, S] covers the whole cache with the new tokens at [end, end + T): columns from
    # `end` on hold nothing yet (or stale K/V), so the cached part stops before them.
    cached_visible = (mask & (jnp.arange(s) < end))[:, :, None]
    new_visible = jax.lax.dynamic_slice_in_dim(mask, end, t, axis=3)[:, :, None]

    def scores(keys, visible):
        raw = jnp.einsum("btkgd,bskd->bkgts", grouped_q, keys.astype(dtype), preferred_element_type=jnp.float32)
        return jnp.where(visible, raw * np.float32(1 / np.sqrt(d)), _MASKED)

    cached_scores, new_scores = scores(cached_k, cached_visible), scores(k_new, new_visible)
    top = jnp.maximum(cached_scores.max(-1, keepdims=True), new_scores.max(-1, keepdims=True))
    cached_p, new_p = jnp.exp(cached_scores - top), jnp.exp(new_scores - top)
    total = cached_p.sum(-1, keepdims=True) + new_p.sum(-1, keepdims=True)  # >= 1: each query sees itself

    def weighted(p, values):
        return jnp.einsum("bkgts,bskd->btkgd", (p / total).astype(dtype), values.astype(dtype),
                          preferred_element_type=jnp.float32)

    out = weighted(cached_p, cached_v) + weighted(new_p, v_new)
    return out.reshape(b, t, n, d).astype(q.dtype)


def _pallas_decode_fits(q, num_new, cache_k) -> bool:
    """The decode kernel's constraints: one new token, power-of-two head_dim (Triton's blocks), and
    a cache capacity that key blocks of 16 or more tile (`kv_cache.decode_capacity` rounds up to
    DECODE_BLOCK)."""
    head_dim, capacity = q.shape[-1], cache_k.shape[2]
    return (num_new == 1 and head_dim & (head_dim - 1) == 0 and capacity % 16 == 0
            and q.shape[2] % cache_k.shape[3] == 0)


def decode_attention(q, k_new, v_new, cache_k, cache_v, layer, cached_visible, *, platform: str | None = None):
    """One new token per row over layer `layer` of the stacked cache and over its own K/V:
    `_cache_then_new_attention` for T = 1, as a Pallas (Triton) kernel and one XLA reduction.

    q [B, 1, heads, D]; k_new, v_new [B, 1, kv_heads, D]; cache_k, cache_v [layers, B, S, kv_heads, D],
    read in place (a custom call's operand that is a slice of the stack would be copied first);
    cached_visible: bool [B, S]. The kernel runs one program per row, query head and block of
    cached keys, each a softmax over its block (the first block's also over the new key); the
    blocks are then merged by their maxima and sums (flash-decoding). One program per row and head
    looping over the blocks was latency-bound: slower than XLA at batch 1 (docs/performance.md).
    A block whose cached keys are all hidden loads none of them: a row sees only the columns from
    its prompt's start to the cache's end, and a server's slots span the whole capacity.
    platform: the target ("gpu" compiles the kernel; elsewhere it runs in Pallas' interpreter).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pallas_triton

    b, _, n, d = q.shape
    _, _, s, kv_heads, _ = cache_k.shape
    group = n // kv_heads
    block = min(s & -s, DECODE_BLOCK)
    # Hidden cached keys get _MASKED added to their score; the new key is always seen.
    bias = jnp.where(cached_visible, np.float32(0), np.float32(_MASKED))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    scale = float(1 / np.sqrt(d))

    def kernel(q_ref, k_new_ref, v_new_ref, k_ref, v_ref, layer_ref, bias_ref, acc_ref, stats_ref):
        row, head, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        kv_head, index, keys = head // group, layer_ref[0], pl.ds(part * block, block)
        query = q_ref[...].astype(jnp.float32)
        bias, v_new = bias_ref[keys], v_new_ref[...].astype(jnp.float32)
        # The new key joins the first block only.
        new_score = jnp.sum(query * k_new_ref[...].astype(jnp.float32)) * scale
        new_score = jnp.where(part == 0, new_score, np.float32(_MASKED))

        def cached_and_new():
            k = k_ref[index, row, keys, kv_head, :].astype(jnp.float32)
            scores = jnp.sum(k * query[None, :], axis=1) * scale + bias
            top = jnp.maximum(jnp.max(scores), new_score)
            p, p_new = jnp.exp(scores - top), jnp.exp(new_score - top)
            v = v_ref[index, row, keys, kv_head, :].astype(jnp.float32)
            return jnp.sum(p[:, None] * v, axis=0) + p_new * v_new, top, jnp.sum(p) + p_new

        def new_only():  # what the other branch computes when every cached key is hidden (p = 0)
            p_new = jnp.exp(new_score - new_score)  # 1, as a value: a literal cannot leave a Triton branch
            return p_new * v_new, new_score, p_new

        acc, top, total = jax.lax.cond(jnp.max(bias) > _MASKED / 2, cached_and_new, new_only)
        acc_ref[...] = acc
        stats_ref[...] = jnp.where(jnp.arange(2) == 0, top, total)  # max, sum of exponentials

    def vector(index_map):
        return pl.BlockSpec((pl.squeezed, pl.squeezed, d), index_map)

    whole = pl.BlockSpec(cache_k.shape, lambda i, h, j: (0,) * 5)
    parts = s // block
    acc, stats = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b, n, parts, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, n, parts, 2), jnp.float32)],
        grid=(b, n, parts),
        in_specs=[vector(lambda i, h, j: (i, h, 0)), vector(lambda i, h, j: (i, h // group, 0)),
                  vector(lambda i, h, j: (i, h // group, 0)), whole, whole,
                  pl.BlockSpec((1,), lambda i, h, j: (0,)), pl.BlockSpec((pl.squeezed, s), lambda i, h, j: (i, 0))],
        out_specs=[pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, d), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, 2), lambda i, h, j: (i, h, j, 0))],
        compiler_params=pallas_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=_interpret(platform, "gpu"),  # Pallas' interpreter: for tests off the GPU
    )(q[:, 0], k_new[:, 0].astype(cache_k.dtype), v_new[:, 0].astype(cache_v.dtype), cache_k, cache_v, layer, bias)
    return merge_decode_blocks(acc, stats).astype(q.dtype)


def merge_decode_blocks(acc, stats):
    """float32 [B, 1, heads, D] from the decode kernel's per-block outputs: acc [B, heads, blocks, D]
    (probability-weighted values) and stats [B, heads, blocks, 2] (each block's maximum score and sum
    of exponentials), merged by their maxima (flash-decoding)."""
    # Blocks whose keys are all hidden have a top of _MASKED and weigh exp(_MASKED - top) = 0.
    tops, sums = stats[..., 0], stats[..., 1]
    weights = jnp.exp(tops - tops.max(axis=-1, keepdims=True))
    out = jnp.einsum("bnj,bnjd->bnd", weights, acc) / jnp.einsum("bnj,bnj->bn", weights, sums)[..., None]
    return out[:, None]


# ------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels.


def _splash_fits(num_queries: int, num_keys: int) -> bool:
    return num_queries % TPU_BLOCK == 0 and num_keys % TPU_BLOCK == 0


def _tpu_block(length: int, largest: int = 512) -> int:
    """The largest power-of-two tile of at most `largest` (and at least TPU_BLOCK) that divides `length`."""
    block = largest
    while length % block:
        block //= 2
    return block


def _per_device_rows(fn, args, batch_axes, out_batch_axes=0):
    """fn(*args), whose arguments have their batch at `batch_axes` (None: not batched), under a mesh
    (`jax.sharding.use_abstract_mesh`) as a `shard_map` over the mesh's batch axes, so that each
    device runs the kernel on its own rows (XLA cannot split a Pallas custom call itself). Without a
    mesh, or for a batch that the batch axes do not divide, fn itself."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    rows = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    batch = next(x.shape[a] for x, a in zip(args, batch_axes) if a is not None)
    if not axes or batch % rows:
        return fn(*args)

    def spec(axis):
        return P() if axis is None else P(*([None] * axis + [axes]))

    out_specs = jax.tree.map(spec, out_batch_axes)
    return jax.shard_map(fn, in_specs=tuple(map(spec, batch_axes)), out_specs=out_specs, check_vma=False)(*args)


def _interpret(platform: str | None, kernel_platform: str = "tpu") -> bool:
    """Whether a Pallas kernel for `kernel_platform` runs in Pallas' interpreter: when it is not compiled
    for that platform (`platform`, default `jax.default_backend()`)."""
    return (platform or jax.default_backend()) != kernel_platform


def splash_attention(q, k, v, *, prefix_length: int, prefix_lengths=None, platform: str | None = None):
    """Splash attention (Pallas TPU) of q [B, T, heads, D] over k, v [B, S, kv_heads, D] (GQA).

    Query t sees keys [0, prefix_length + t]: a causal prefill for prefix_length=0 (S = T), the
    training suffix pass over [prefix, new tokens] for S = prefix_length + T. prefix_lengths [B]:
    row b's real prefix keys are its first prefix_lengths[b]; the rest are hidden (segment ids).
    Off the TPU (`platform`, default `jax.default_backend()`) it runs in Pallas' interpreter.
    Returns [B, T, heads, D] in k's dtype.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, d = q.shape
    s = k.shape[1]
    block_q, block_kv = _tpu_block(t), _tpu_block(s)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    mask = masks.MultiHeadMask([masks.CausalMask((t, s), offset=prefix_length)] * n)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=_interpret(platform))
    # Splash does not scale the scores; q is scaled in float32 and cast once.
    q = (q.astype(jnp.float32) * np.float32(1 / np.sqrt(d))).astype(k.dtype)
    if prefix_lengths is None:
        prefix_lengths = jnp.zeros((b,), jnp.int32)

    def rows(q, k, v, prefix_lengths):
        def one(q, k, v, length):  # [heads, T, D], [kv_heads, S, D]
            # Segment 1 marks the prefix's padding keys; every query and every other key is segment 0.
            columns = jnp.arange(s)
            segments = splash.SegmentIds(q=jnp.zeros((t,), jnp.int32),
                                         kv=((columns >= length) & (columns < prefix_length)).astype(jnp.int32))
            return kernel(q, k, v, segments)

        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), prefix_lengths)
        return heads_first(out)

    return _per_device_rows(rows, (q, k, v, prefix_lengths), (0, 0, 0, 0))


def _tpu_decode_fits(q, num_new, cache_k) -> bool:
    """One new token, and a cache capacity that TPU_BLOCK-key blocks tile (`kv_cache.decode_capacity`)."""
    return num_new == 1 and cache_k.shape[2] % TPU_BLOCK == 0 and q.shape[2] % cache_k.shape[3] == 0


def tpu_decode_attention(q, k_new, v_new, cache_k, cache_v, layer, cached_visible, *, platform: str | None = None):
    """`decode_attention` for the TPU: one new token per row over layer `layer` of the stacked cache
    and over its own K/V, as a Pallas TPU (Mosaic) kernel and one XLA reduction.

    One program per row and block of TPU_BLOCK cached keys, all heads at once: it reads a
    [block, kv_heads, head_dim] tile of the stacked cache in place (the layer is a scalar-prefetched
    index: no layer slice is copied out of the stack), scores each kv head's query group on the
    MXU, and returns the block's softmax statistics, which `merge_decode_blocks` merges
    (flash-decoding). The new key joins block 0. Off the TPU (`platform`) it runs in Pallas'
    interpreter.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    b, _, n, d = q.shape
    _, _, s, kv_heads, _ = cache_k.shape
    group = n // kv_heads
    block = TPU_BLOCK
    parts = s // block
    scale = np.float32(1 / np.sqrt(d))
    contract_last = (((1,), (1,)), ((), ()))

    def kernel(layer_ref, q_ref, k_new_ref, v_new_ref, k_ref, v_ref, bias_ref, acc_ref, stats_ref):
        del layer_ref  # used by the cache's index map
        first_block = pl.program_id(1) == 0
        bias = bias_ref[...]  # [1, block]: 0, or _MASKED for a hidden key
        for g in range(kv_heads):
            query = q_ref[g].astype(jnp.float32)  # [group, D]
            keys = k_ref[:, g, :].astype(jnp.float32)  # [block, D]
            scores = jax.lax.dot_general(query, keys, contract_last, preferred_element_type=jnp.float32)
            scores = scores * scale + bias  # [group, block]
            new_score = jnp.sum(query * k_new_ref[g].astype(jnp.float32), axis=-1, keepdims=True) * scale
            new_score = jnp.where(first_block, new_score, np.float32(_MASKED))  # [group, 1]
            top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), new_score)
            p, p_new = jnp.exp(scores - top), jnp.exp(new_score - top)
            values = v_ref[:, g, :].astype(jnp.float32)
            acc_ref[g] = jnp.dot(p, values, preferred_element_type=jnp.float32) + p_new * v_new_ref[g].astype(
                jnp.float32)
            stats_ref[g] = jnp.concatenate([top, jnp.sum(p, axis=-1, keepdims=True) + p_new], axis=-1)

    def rows(layer, grouped_q, k_new, v_new, cache_k, cache_v, bias):
        rows_here = grouped_q.shape[0]
        per_row = lambda *tail: pl.BlockSpec(  # noqa: E731
            (pl.squeezed,) + tail, lambda i, j, layer: (i,) + (0,) * len(tail))
        cache_block = pl.BlockSpec((pl.squeezed, pl.squeezed, block, kv_heads, d),
                                   lambda i, j, layer: (layer[0], i, j, 0, 0))
        per_block = lambda width: pl.BlockSpec(  # noqa: E731
            (pl.squeezed, pl.squeezed, kv_heads, group, width), lambda i, j, layer: (i, j, 0, 0, 0))
        return pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct((rows_here, parts, kv_heads, group, d), jnp.float32),
                       jax.ShapeDtypeStruct((rows_here, parts, kv_heads, group, 2), jnp.float32)),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(rows_here, parts),
                in_specs=[per_row(kv_heads, group, d), per_row(kv_heads, 1, d), per_row(kv_heads, 1, d),
                          cache_block, cache_block,
                          pl.BlockSpec((pl.squeezed, 1, block), lambda i, j, layer: (i, 0, j))],
                out_specs=(per_block(d), per_block(2))),
            interpret=_interpret(platform),  # Pallas' interpreter: for tests off the TPU
        )(layer, grouped_q, k_new, v_new, cache_k, cache_v, bias)

    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    grouped_q = q[:, 0].reshape(b, kv_heads, group, d).astype(cache_k.dtype)  # head = kv_head * group + j
    k_new, v_new = (jnp.swapaxes(x, 1, 2).astype(cache_k.dtype) for x in (k_new, v_new))  # [B, kv_heads, 1, D]
    bias = jnp.where(cached_visible, np.float32(0), np.float32(_MASKED))[:, None, :]  # [B, 1, S]
    acc, stats = _per_device_rows(rows, (layer, grouped_q, k_new, v_new, cache_k, cache_v, bias),
                                  (None, 0, 0, 0, 1, 1, 0), out_batch_axes=(0, 0))
    # [B, parts, kv_heads, group, *] -> [B, heads, parts, *]
    to_heads = lambda x: jnp.moveaxis(x.reshape(b, parts, n, x.shape[-1]), 1, 2)  # noqa: E731
    return merge_decode_blocks(to_heads(acc), to_heads(stats)).astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# Prefix + causal attention, two mask-free parts merged by their logsumexp.


class _Part(NamedTuple):
    """One attention part: forward -> (out [B, T, N, D], lse float32 [B, N, T]), and its backward
    given the merged output and statistics -> (dq, dk, dv)."""

    forward: Callable
    backward: Callable


def _grouped(q, num_kv_heads):
    b, t, n, d = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, d)


def _xla_scores(q, k, kv_lengths, causal):
    """float32 scaled scores [B, kv_heads, group, T, S], hidden keys at _MASKED."""
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    scores = jnp.einsum("btkgd,bskd->bkgts", _grouped(q, k.shape[2]), k,
                        preferred_element_type=jnp.float32) * np.float32(1 / np.sqrt(d))
    visible = jnp.ones((1, 1, 1, t, s), bool)
    if causal:
        visible = visible & jnp.tril(jnp.ones((t, s), bool))
    if kv_lengths is not None:
        visible = visible & (jnp.arange(s) < kv_lengths[:, None, None, None, None])
    return jnp.where(visible, scores, _MASKED)


def _xla_forward(q, k, v, kv_lengths, causal):
    b, t, n, d = q.shape
    scores = _xla_scores(q, k, kv_lengths, causal)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, n, d).astype(q.dtype), lse.reshape(b, n, t)


def _xla_backward(q, k, v, kv_lengths, causal, out, lse, d_out):
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    scores = _xla_scores(q, k, kv_lengths, causal)
    probs = jnp.exp(scores - lse.reshape(b, kv_heads, n // kv_heads, t)[..., None])
    d_out = _grouped(d_out, kv_heads).astype(jnp.float32)
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out, _grouped(out, kv_heads).astype(jnp.float32))
    dv = jnp.einsum("bkgts,btkgd->bskd", probs, d_out)
    d_scores = probs * (jnp.einsum("btkgd,bskd->bkgts", d_out, v.astype(jnp.float32)) - delta[..., None])
    d_scores = d_scores * np.float32(1 / np.sqrt(d))
    dq = jnp.einsum("bkgts,bskd->btkgd", d_scores, k.astype(jnp.float32)).reshape(b, t, n, d)
    dk = jnp.einsum("bkgts,btkgd->bskd", d_scores, _grouped(q, kv_heads).astype(jnp.float32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _cudnn_mask(q, kv_lengths, causal):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    if kv_lengths is None:
        return dict(mask_type=fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK)
    assert not causal, "prefix_attention never combines key lengths with causality"
    b, t = q.shape[:2]
    return dict(mask_type=fa.MaskType.PADDING, q_seqlen=jnp.full((b,), t, jnp.int32),
                kv_seqlen=kv_lengths.astype(jnp.int32))


def _cudnn_forward(q, k, v, kv_lengths, causal):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    return fa.dot_product_attention(q, k, v, scale=1 / np.sqrt(q.shape[-1]), qkv_layout="BTNH",
                                    return_residual=True, **_cudnn_mask(q, kv_lengths, causal))


def _cudnn_backward(q, k, v, kv_lengths, causal, out, lse, d_out):
    # jax's own cuDNN VJP binds this primitive with the forward's output and statistics; here they
    # are the merged ones. Private jax API (jax/_src/cudnn), the same in jax 0.10 and 0.11.
    from jax._src.cudnn import fused_attention_stablehlo as fa

    mask = _cudnn_mask(q, kv_lengths, causal)
    unused = jnp.zeros(0, q.dtype)
    grads = fa._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, unused, mask.get("q_seqlen", unused), mask.get("kv_seqlen", unused), unused, unused, unused,
        unused, lse, out, d_out, scale=1 / np.sqrt(q.shape[-1]), seed=42, dropout_rate=0.0,
        variadic_args=(False, False), mask_type=mask["mask_type"], layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=None)
    return tuple(grads[:3])


_PARTS = {"xla": _Part(_xla_forward, _xla_backward), "cudnn": _Part(_cudnn_forward, _cudnn_backward)}


def _merge(o_prefix, lse_prefix, o_causal, lse_causal, has_prefix):
    """The one softmax's output and statistics from its two parts'."""
    lse_prefix = jnp.where(has_prefix[:, None, None], lse_prefix, -jnp.inf)
    lse = jnp.logaddexp(lse_prefix, lse_causal)  # finite: every query sees itself in the causal part

    def weighted(o, part_lse):
        return jnp.swapaxes(jnp.exp(part_lse - lse), 1, 2)[..., None] * o.astype(jnp.float32)

    # `where`, not a zero weight: a part over no keys may hold NaN.
    out = jnp.where(has_prefix[:, None, None, None], weighted(o_prefix, lse_prefix), 0) + weighted(o_causal, lse_causal)
    return out.astype(o_causal.dtype), lse


def _prefix_attention_fwd(q, prefix_k, prefix_v, prefix_lengths, new_k, new_v, implementation):
    part = _PARTS[implementation]
    has_prefix = prefix_lengths > 0
    lengths = jnp.maximum(prefix_lengths, 1)  # a row with no prefix computes over one key; _merge drops it
    o_prefix, lse_prefix = part.forward(q, prefix_k, prefix_v, lengths, False)
    o_causal, lse_causal = part.forward(q, new_k, new_v, None, True)
    out, lse = _merge(o_prefix, lse_prefix, o_causal, lse_causal, has_prefix)
    return out, (q, prefix_k, prefix_v, prefix_lengths, new_k, new_v, out, lse)


def _prefix_attention_bwd(implementation, residuals, d_out):
    q, prefix_k, prefix_v, prefix_lengths, new_k, new_v, out, lse = residuals
    part = _PARTS[implementation]
    has_prefix = prefix_lengths > 0
    dq_p, dk_p, dv_p = part.backward(q, prefix_k, prefix_v, jnp.maximum(prefix_lengths, 1), False, out, lse, d_out)
    dq_c, dk_c, dv_c = part.backward(q, new_k, new_v, None, True, out, lse, d_out)
    keep = has_prefix[:, None, None, None]
    dq = jnp.where(keep, dq_p.astype(jnp.float32), 0) + dq_c.astype(jnp.float32)
    return (dq.astype(q.dtype), jnp.where(keep, dk_p, 0).astype(prefix_k.dtype),
            jnp.where(keep, dv_p, 0).astype(prefix_v.dtype), None, dk_c, dv_c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _prefix_attention(q, prefix_k, prefix_v, prefix_lengths, new_k, new_v, implementation):
    return _prefix_attention_fwd(q, prefix_k, prefix_v, prefix_lengths, new_k, new_v, implementation)[0]


_prefix_attention.defvjp(_prefix_attention_fwd, _prefix_attention_bwd)


def prefix_attention(q, prefix_k, prefix_v, prefix_lengths, new_k, new_v, *, implementation: AttentionImpl,
                     platform: str | None = None):
    """Attention of new tokens over a prefix and, causally, over themselves, with no mask.

    q [B, T, heads, head_dim]; new_k, new_v [B, T, kv_heads, head_dim], the new tokens' own K/V;
    prefix_k, prefix_v [B, P, kv_heads, head_dim] with the real keys of row b in its first
    `prefix_lengths[b]` columns (order among them does not matter: every new token sees all of them).
    New token t sees the real prefix keys and new tokens 0..t, so padding among the new tokens must
    come after each row's real ones. Returns [B, T, heads, head_dim] in q's dtype.
    """
    impl = resolve_implementation(implementation, q, q.shape[1], platform=platform, num_keys=prefix_k.shape[1])
    _record("prefix", impl)
    dtype = prefix_k.dtype
    if impl == "mosaic":
        # One softmax over [prefix keys, new keys]: splash's own backward differentiates it.
        keys = jnp.concatenate([prefix_k, new_k.astype(dtype)], axis=1)
        values = jnp.concatenate([prefix_v, new_v.astype(dtype)], axis=1)
        return splash_attention(q, keys, values, prefix_length=prefix_k.shape[1],
                                prefix_lengths=prefix_lengths.astype(jnp.int32), platform=platform).astype(q.dtype)
    return _prefix_attention(q.astype(dtype), prefix_k, prefix_v, prefix_lengths.astype(jnp.int32),
                             new_k.astype(dtype), new_v.astype(dtype), impl).astype(q.dtype)
