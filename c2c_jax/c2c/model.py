"""The C2C model: a frozen receiver, frozen sharers and their fusers; prefill, fuse, finish the prompt.

For a batch of prompts, left-padded to a common width W (so every prompt ends at column W - 1):

    1. prefill_kv: receiver and every sharer run the prompt, KV only (no logits);
    2. fuse_prefix: each fuser writes its sharer's K/V into the receiver cache where `fuse_mask` is
       set, except in the last column;
    3. finish_prompt: the receiver runs the last prompt column again, on the fused cache (overwriting
       that column's K/V) -> logits of the first new token;
    4. decode on the fused cache (generated tokens are never fused).

The last prompt token is excluded from fusion so that the first new token is predicted by a query
that attends to the fused prefix (docs/upstream_reference.md §2.4).

Prompts whose fused columns are not simply every column before the last (token-aligned pairs, where
only message contents are fused) run as upstream runs them, section by section
(docs/upstream_reference.md §2.3): each fused section is fused from receiver K/V that already saw the fused
sections before it (`fuse_prefix`), and every column after the last fused one (the trailing
chat template) runs in step 3, after fusion. Steps 1-2 (`C2CModel.prompt_cache`) and
steps 3-4 (`C2CModel.finish_prompt`, then `infer.decode.decode`) are two jitted programs that the host
dispatches back to back (`infer.generator.InferencePrograms`); only the decode loop's tokens come back
to the host. Phases 1 and 2 are top-level functions of a `c2c.prefix.Prefix`, with the caches passed
in and out; the trainer's loss (`train.step.micro_batch_loss`) calls the same two on its batches,
then finishes with the answer instead of the last prompt token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from c2c_jax.c2c.controls import FusionControl, fuser_sharer_caches
from c2c_jax.c2c.fuser import Fuser, check_pair, inference_copy
from c2c_jax.c2c.prefix import PackedRows, Prefix
from c2c_jax.c2c.prompt import PromptBatch, final_width
from c2c_jax.models import Decoder, KVCache

MultiSharerMode = Literal["sequential", "parallel"]


# ------------------------------------------------------------------------------------------------
# The model bundle.


class C2CModel(nnx.Module):
    """A frozen receiver, frozen sharers and one fuser per sharer."""

    def __init__(self, receiver: Decoder, sharers: Sequence[Decoder] = (), fusers: Sequence[Fuser] = (), *,
                 multi_sharer_mode: MultiSharerMode = "sequential", include_response: bool | None = None):
        """include_response: decode-time fusion (upstream's `include_response`): the suffix and every
        generated token are fused too, the sharer decoding in lockstep (`decode_step`). None: as the
        fusers were trained; a value they were not trained with is refused."""
        if len(sharers) != len(fusers):
            raise ValueError(f"{len(sharers)} sharer(s) but {len(fusers)} fuser(s): each sharer needs its fuser")
        if multi_sharer_mode not in ("sequential", "parallel"):
            raise ValueError(f"unknown multi_sharer_mode {multi_sharer_mode!r}; choose 'sequential' or 'parallel'")
        for i, (sharer, fuser) in enumerate(zip(sharers, fusers)):
            check_pair(fuser.config, receiver.config, sharer.config, source=f"fuser {i}")
        trained = {bool(f.config.include_response) for f in fusers}
        if len(trained) > 1:
            raise ValueError("the fusers disagree on decode-time fusion (include_response): some were trained with "
                             "it, some without; they cannot run together")
        trained = trained.pop() if trained else False
        if include_response is not None and bool(include_response) != trained:
            raise ValueError(
                f"the fuser was trained {'with' if trained else 'without'} decode-time fusion (include_response) "
                f"and cannot be used {'without' if trained else 'with'} it: its fusion of generated tokens would "
                f"not be what it learned. Drop the include_response setting (the fuser's own is used), or use a "
                f"fuser trained {'without' if trained else 'with'} it")
        self.receiver = receiver
        self.sharers = nnx.List(sharers)
        self.fusers = nnx.List([inference_copy(f) for f in fusers])
        self.multi_sharer_mode = multi_sharer_mode
        self.include_response = trained

    def fuse(self, receiver_cache: KVCache, sharer_caches: Sequence[KVCache], fuse_masks: Sequence[jax.Array],
             *, noise=None, temperature=None, receiver_input: bool = True) -> KVCache:
        """Applies every fuser. sequential: each sees the cache fused by the ones before it; parallel:
        each sees the receiver's own cache and the residuals are summed (docs/upstream_reference.md §2.3)."""
        kwargs = dict(noise=noise, temperature=temperature, receiver_input=receiver_input)
        if self.multi_sharer_mode == "sequential" or len(self.fusers) == 1:
            for fuser, cache, mask in zip(self.fusers, sharer_caches, fuse_masks):
                receiver_cache = fuser(cache, receiver_cache, mask, **kwargs)
            return receiver_cache
        base = receiver_cache
        dk = dv = jnp.zeros(base.k.shape, jnp.float32)
        for fuser, cache, mask in zip(self.fusers, sharer_caches, fuse_masks):
            fused = fuser(cache, base, mask, **kwargs)
            dk += fused.k.astype(jnp.float32) - base.k.astype(jnp.float32)
            dv += fused.v.astype(jnp.float32) - base.v.astype(jnp.float32)
        return dataclasses.replace(base, k=(base.k.astype(jnp.float32) + dk).astype(base.k.dtype),
                                   v=(base.v.astype(jnp.float32) + dv).astype(base.v.dtype))

    def prefill_kv(self, prefix: Prefix, *, with_sharers: bool = True) -> tuple[KVCache, list[KVCache]]:
        """Phase 1 (`prefill_kv`): the receiver's KV-only pass and (optionally) every sharer's."""
        sharers = self.sharers if with_sharers else ()
        return prefill_kv(self.receiver, sharers, [f.config.sharer_depth for f in self.fusers], prefix)

    def prefill(self, batch: PromptBatch, capacity: int, *, fuse: bool = True, suffix_length: int = 1,
                control: FusionControl | None = None) -> tuple[jax.Array, KVCache]:
        """float32 logits [B, vocab] after the last prompt column, and the (fused) receiver cache.

        The last `suffix_length` columns run after fusion, on the fused cache, and are never fused
        themselves: 1 for generation (docs/upstream_reference.md §2.4); the answer prefix's length when scoring
        option logits after "The correct answer is" (§5.4). Receiver-only (`fuse=False`) takes the
        same route minus the sharers and fusers, so with closed gates both give bit-identical logits.
        `prompt_cache` (`prefill_kv`, `fused_prefix`) then `finish_prompt`; `infer.generator.InferencePrograms`
        runs them as two programs (see there).
        `control` (evaluation only) replaces what the fusers read (`controls.FusionControl`).
        """
        cache = self.prompt_cache(batch, fuse=fuse, suffix_length=suffix_length, control=control)
        return self.finish_prompt(batch, cache, capacity, suffix_length=suffix_length)

    def prompt_cache(self, batch: PromptBatch, *, fuse: bool = True, suffix_length: int = 1,
                     control: FusionControl | None = None) -> KVCache:
        """The receiver cache of all prompt columns but the last `suffix_length`, fused unless `fuse=False`."""
        width = batch.tokens.shape[1]
        split = width - suffix_length
        if split < 1 or suffix_length < 1:
            raise ValueError(f"cannot split a {width}-column prompt into a fused prefix and a suffix of "
                             f"{suffix_length}: the prefix needs at least one column")
        # The prefix passes run over all `width` columns, a bucketed width that suits the GPU's tiles
        # better than `split`: by causality the first `split` columns get the same K/V as from a pass
        # over them alone, and the suffix columns' K/V are never fused and are recomputed by
        # `finish_prompt`, on the fused cache, once the cache is rewound to `split`.
        if fuse and self.include_response:
            if control is not None:
                raise ValueError("evaluation controls are not supported for a fuser with decode-time fusion")
            return self.lockstep_prefix(batch, suffix_length=suffix_length)
        prefix = batch.prefix(suffix_length)
        receiver_cache, sharer_caches = self.prefill_kv(prefix, with_sharers=fuse)
        return self.fused_prefix(batch, prefix, receiver_cache, sharer_caches, suffix_length=suffix_length,
                                 control=control)

    def lockstep_prefix(self, batch: PromptBatch, *, suffix_length: int = 1) -> "LockstepCaches":
        """Decode-time fusion's prompt caches (docs/upstream_reference.md §2.6): every column of the fuse
        mask fused, the suffix's too, from the receiver's unfused pass; the unfused and sharer caches are kept, as the
        next tokens' fusion reads them. The fused cache is rewound to before the suffix, which
        `finish_prompt` runs with its fused K/V held."""
        if batch.final_section:
            raise ValueError("decode-time fusion (include_response) runs prompts whose every real column is fused, "
                             "as for a sharer with the receiver's tokenizer; token-aligned prompts are not supported")
        prefix = batch.prefix(suffix_length=0)
        receiver_cache, sharer_caches = self.prefill_kv(prefix)
        with jax.named_scope("fusion"):
            fused = fuse_prefix(self.receiver, prefix, receiver_cache, sharer_caches, self.fuse)
        fused = dataclasses.replace(fused, end=fused.end - suffix_length)
        return LockstepCaches(fused, receiver_cache, tuple(sharer_caches))

    def fused_prefix(self, batch: PromptBatch, prefix: Prefix, receiver_cache: KVCache,
                     sharer_caches: Sequence[KVCache], *, suffix_length: int = 1,
                     control: FusionControl | None = None) -> KVCache:
        """Phase 2 (`fuse_prefix`) on `prefill_kv`'s caches (no sharer caches: no fusion) of
        `batch.prefix(suffix_length)`, rewound to before the columns that run after fusion:
        `prompt_cache`'s result.

        Each fuser reads its sharer's cache as it was trained to (`FuserConfig.sharer_input`), or as
        `control` says (`controls.fuser_sharer_caches`)."""
        if sharer_caches:
            sharer_caches = fuser_sharer_caches(sharer_caches, [f.config.sharer_input for f in self.fusers],
                                                control=control, key=jax.random.key(0))
            apply_fusers = functools.partial(self.fuse, receiver_input=control is None or control.receiver_input)
            with jax.named_scope("fusion"):
                receiver_cache = fuse_prefix(self.receiver, prefix, receiver_cache, sharer_caches, apply_fusers)
        return dataclasses.replace(receiver_cache, end=receiver_cache.end - final_width(batch, suffix_length))

    def finish_prompt(self, batch: PromptBatch, cache: KVCache, capacity: int, *, suffix_length: int = 1
                      ) -> tuple[jax.Array, KVCache]:
        """The prompt's last `suffix_length` columns on `prompt_cache`'s cache, grown to `capacity`
        columns: float32 logits [B, vocab] after the prompt, and the cache to decode from."""
        width = batch.tokens.shape[1]
        lockstep = isinstance(cache, LockstepCaches)
        suffix = slice(width - final_width(batch, suffix_length), width)
        held = None
        if lockstep:  # the suffix's fused K/V are in the cache already
            held = _any(batch.fuse_mask)[:, suffix]
        elif batch.final_section and batch.fuse_mask:
            # Columns of the window that belong to earlier (fused) sections keep the K/V they have.
            held = (batch.prefix(suffix_length).section < batch.fused_sections)[:, suffix]
        fused = cache.fused if lockstep else cache
        # At batch 1 the last token's projections are vector-matrix products: run them as GEMMs
        # (`one_row_gemm`), which suits a one-off pass; the decode loop keeps XLA's choice.
        with jax.named_scope("suffix"):
            hidden, fused = self.receiver(batch.tokens[:, suffix], batch.positions[:, suffix],
                                          fused.with_capacity(capacity), batch.valid[:, suffix], output="hidden",
                                          one_row_gemm=True, held=held)
        if lockstep:
            cache = LockstepCaches(fused, cache.receiver.with_capacity(capacity),
                                   tuple(c.with_capacity(capacity) for c in cache.sharers))
        else:
            cache = fused
        return self.receiver.logits(hidden[:, -1]), cache

    def decode_step(self, batch: PromptBatch):
        """step(caches, tokens [B, 1], positions [B, 1]) -> (float32 logits [B, 1, vocab], caches): one
        decode step of decode-time fusion (docs/upstream_reference.md §2.6), for `decode`.

        The receiver extends its unfused cache and every sharer its own; the fusers map the new
        column's K/V (receiver-native and the sharers') to the fused K/V, which the receiver's
        decode step on the fused cache then attends to and keeps in every layer.
        """
        # Each sharer's positions continue from its own last prompt position.
        offsets = [p[:, -1:] - batch.positions[:, -1:] for p in batch.sharer_positions]

        def step(caches: LockstepCaches, tokens, positions):
            end = caches.fused.end
            _, unfused = self.receiver(tokens, positions, caches.receiver, output="kv")
            sharers = tuple(sharer(tokens, positions + offset, cache, output="kv")[1]
                            for sharer, cache, offset in zip(self.sharers, caches.sharers, offsets))

            def column(cache):  # the new column alone, as a one-column cache
                take = lambda a: jax.lax.dynamic_slice_in_dim(a, end, 1, axis=2)  # noqa: E731
                return KVCache(take(cache.k), take(cache.v), jnp.ones(tokens.shape, bool), jnp.ones((), jnp.int32))

            every = jnp.ones(tokens.shape, bool)
            new = self.fuse(column(unfused), [column(c) for c in sharers], [every] * len(sharers))
            fused = caches.fused
            fused = dataclasses.replace(
                fused, k=jax.lax.dynamic_update_slice_in_dim(fused.k, new.k.astype(fused.k.dtype), end, axis=2),
                v=jax.lax.dynamic_update_slice_in_dim(fused.v, new.v.astype(fused.v.dtype), end, axis=2))
            logits, fused = self.receiver(tokens, positions, fused, held=every)
            return logits, LockstepCaches(fused, unfused, sharers)

        return step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LockstepCaches:
    """Decode-time fusion's caches, column-aligned: the receiver's fused cache (the one it decodes
    from), its unfused cache (the fuser's receiver input for new tokens) and every sharer's."""

    fused: KVCache
    receiver: KVCache
    sharers: tuple


def _any(masks: Sequence[jax.Array]) -> jax.Array:
    return functools.reduce(jnp.logical_or, masks)


# ------------------------------------------------------------------------------------------------
# The phases (`c2c.prefix`), shared by `C2CModel` and the trainer's loss (`train.step.micro_batch_loss`).


def prefill_kv(receiver: Decoder, sharers: Sequence[Decoder], sharer_depths: Sequence[int], prefix: Prefix
               ) -> tuple[KVCache, list[KVCache]]:
    """Phase 1: the receiver's KV-only pass over `prefix` and every sharer's (its first
    `sharer_depths[i]` layers), each cache on the receiver's columns."""
    # Named scopes label each part's kernels in profiles (bench/profile_kernels.py's phases).
    with jax.named_scope("receiver_prefix"):
        receiver_cache = kv_pass(receiver, prefix.receiver, receiver.config.num_layers)
    sharer_caches = []
    for i, (sharer, depth, rows) in enumerate(zip(sharers, sharer_depths, prefix.sharers)):
        with jax.named_scope(f"sharer_prefix_{i}"):
            sharer_caches.append(kv_pass(sharer, rows, depth))
    return receiver_cache, sharer_caches


def fuse_prefix(receiver: Decoder, prefix: Prefix, receiver_cache: KVCache, sharer_caches: Sequence,
                apply_fusers: Callable) -> KVCache:
    """Phase 2: the receiver cache after fusing each section of `prefix` in turn (docs/upstream_reference.md §2.3).

    apply_fusers(receiver_cache, sharer_caches, fuse_masks) -> KVCache: every fuser applied where its
    mask is set (`C2CModel.fuse`; the trainer's fuser, mapped over data-parallel replicas).
    receiver_cache: `prefill_kv`'s, which pass 0 uses as is. Pass p > 0 reruns the receiver over all
    columns with the K/V of earlier passes' columns held (fused where fused), so its own columns see
    the fused sections before them, as upstream's section-by-section forward does; the columns of
    later passes it computes on the way are recomputed by their own pass. Columns of the final
    section (`prefix.section == prefix.fused_sections`) hold the last pass's K/V: the finish phase
    runs them after fusion.
    """
    cache = receiver_cache
    for p in range(prefix.fused_sections):
        if p:
            rewound = dataclasses.replace(cache, end=jnp.zeros_like(cache.end))
            _, rerun = receiver(prefix.tokens, prefix.positions, rewound, prefix.pass_mask, output="kv",
                                held=prefix.section < p)
            cache = dataclasses.replace(rerun, valid=cache.valid, end=cache.end)
        in_pass = prefix.section == p
        cache = apply_fusers(cache, sharer_caches, [m & in_pass for m in prefix.fuse_masks])
    return cache


def kv_pass(model: Decoder, rows: PackedRows, depth: int) -> KVCache:
    """A fresh cache of `depth` layers filled from `rows` (KV-only: no logits, no final norm), on the
    receiver's columns (`PackedRows.columns`).

    The pass runs on the packed rows, where causality alone hides the padding; each real token sees
    the same keys as under a padding mask. Padding columns' K/V are unspecified; `rows.valid` keeps
    them out of every later attention.
    """
    cache = model.init_cache(rows.tokens.shape[0], rows.tokens.shape[1], num_layers=depth)
    _, packed = model(rows.tokens, rows.positions, cache, output="kv")
    if rows.columns is None:
        return dataclasses.replace(packed, valid=rows.valid)
    on_columns = rows.columns[None, :, :, None, None]  # [layers, B, W, kv_heads, head_dim]
    return dataclasses.replace(packed, k=jnp.take_along_axis(packed.k, on_columns, axis=2),
                               v=jnp.take_along_axis(packed.v, on_columns, axis=2), valid=rows.valid)
