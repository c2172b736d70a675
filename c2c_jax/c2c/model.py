"""The C2C model: a frozen receiver, frozen sharers and their fusers; prefill, fuse, finish the prompt.

For a batch of prompts, left-padded to a common width W (so every prompt ends at column W - 1):

    1. receiver and every sharer run the prompt, KV only (no logits);
    2. each fuser writes its sharer's K/V into the receiver cache where `fuse_mask` is set, except in
       the last column;
    3. the receiver runs the last prompt column again, on the fused cache (overwriting that column's
       K/V) -> logits of the first new token;
    4. decode on the fused cache (generated tokens are never fused).

The last prompt token is excluded from fusion so that the first new token is predicted by a query
that attends to the fused prefix (docs/upstream_reference.md §2.4).

Prompts whose fused columns are not simply every column before the last (token-aligned pairs, where
only message contents are fused) run as upstream runs them, section by section
(docs/upstream_reference.md §2.3): each fused section is fused from receiver K/V that already saw the fused
sections before it (`fuse_in_sections`), and every column after the last fused one (the trailing
chat template) runs in step 3, after fusion. Steps 1-2 (`C2CModel.prompt_cache`) and
steps 3-4 (`C2CModel.finish_prompt`, then `infer.decode.decode`) are two jitted programs that the host
dispatches back to back (`infer.generator.InferencePrograms`); only the decode loop's tokens come back
to the host. Training's loss uses the same passes (`kv_pass`, `fuse_in_sections`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from c2c_jax.c2c.controls import FusionControl
from c2c_jax.c2c.fuser import Fuser, check_pair, inference_copy
from c2c_jax.c2c.prompt import PromptBatch, final_width, fusion_sections
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

    def prefix_caches(self, batch: PromptBatch, length: int, *, with_sharers: bool = True
                      ) -> tuple[KVCache, list[KVCache]]:
        """KV-only passes of the receiver and (optionally) every sharer over the first `length` columns."""
        columns = slice(0, length)
        # Named scopes label each part's kernels in profiles (bench/profile_kernels.py's phases).
        with jax.named_scope("receiver_prefix"):
            receiver_cache = kv_pass(self.receiver, batch.tokens[:, columns], batch.positions[:, columns],
                                      batch.valid[:, columns], self.receiver.config.num_layers)
        sharer_caches = []
        if with_sharers:
            for i, (sharer, fuser, tokens, positions, valid) in enumerate(zip(
                    self.sharers, self.fusers, batch.sharer_tokens, batch.sharer_positions, batch.sharer_valid)):
                with jax.named_scope(f"sharer_prefix_{i}"):
                    sharer_caches.append(kv_pass(sharer, tokens[:, columns], positions[:, columns],
                                                 valid[:, columns], fuser.config.sharer_depth))
        return receiver_cache, sharer_caches

    def prefill(self, batch: PromptBatch, capacity: int, *, fuse: bool = True, suffix_length: int = 1,
                control: FusionControl | None = None) -> tuple[jax.Array, KVCache]:
        """float32 logits [B, vocab] after the last prompt column, and the (fused) receiver cache.

        The last `suffix_length` columns run after fusion, on the fused cache, and are never fused
        themselves: 1 for generation (docs/upstream_reference.md §2.4); the answer prefix's length when scoring
        option logits after "The correct answer is" (§5.4). Receiver-only (`fuse=False`) takes the
        same route minus the sharers and fusers, so with closed gates both give bit-identical logits.
        `prompt_cache` then `finish_prompt`; `infer.generator.InferencePrograms` runs them as two programs (see there).
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
        receiver_cache, sharer_caches = self.prefix_caches(batch, width, with_sharers=fuse)
        if fuse and self.include_response:
            if control is not None:
                raise ValueError("evaluation controls are not supported for a fuser with decode-time fusion")
            return self.lockstep_prefix(batch, receiver_cache, sharer_caches, suffix_length=suffix_length)
        return self.fused_prefix(batch, receiver_cache, sharer_caches, suffix_length=suffix_length, control=control)

    def lockstep_prefix(self, batch: PromptBatch, receiver_cache: KVCache, sharer_caches: Sequence[KVCache], *,
                        suffix_length: int = 1) -> "LockstepCaches":
        """Decode-time fusion's prompt caches (docs/upstream_reference.md §2.6): every column of the fuse
        mask fused, the suffix's too, from the receiver's unfused pass; the unfused and sharer caches are kept, as the
        next tokens' fusion reads them. The fused cache is rewound to before the suffix, which
        `finish_prompt` runs with its fused K/V held."""
        if batch.final_section:
            raise ValueError("decode-time fusion (include_response) runs prompts whose every real column is fused, "
                             "as for a sharer with the receiver's tokenizer; token-aligned prompts are not supported")
        with jax.named_scope("fusion"):
            fused = self.fuse(receiver_cache, sharer_caches, list(batch.fuse_mask))
        fused = dataclasses.replace(fused, end=fused.end - suffix_length)
        return LockstepCaches(fused, receiver_cache, tuple(sharer_caches))

    def fused_prefix(self, batch: PromptBatch, receiver_cache: KVCache, sharer_caches: Sequence[KVCache], *,
                     suffix_length: int = 1, control: FusionControl | None = None) -> KVCache:
        """`prefix_caches`' caches (no sharer caches: no fusion) fused except in the last `suffix_length`
        columns, and rewound to before them: `prompt_cache`'s result.

        Each fuser reads its sharer's cache as it was trained to (`FuserConfig.sharer_input`), or as
        `control` says."""
        if sharer_caches:
            fuse_masks = batch.fuse_masks(suffix_length)
            if control is None:
                # A fuser trained without the sharer (the trained control) reads what it was trained on.
                sharer_caches = [FusionControl(f.config.sharer_input, key=jax.random.key(0)).sharer_cache(c, i)
                                 if f.config.sharer_input != "real" else c
                                 for i, (f, c) in enumerate(zip(self.fusers, sharer_caches))]
            else:
                sharer_caches = [control.sharer_cache(c, i) for i, c in enumerate(sharer_caches)]
            receiver_input = control is None or control.receiver_input
            with jax.named_scope("fusion"):
                if batch.final_section == 0:  # one fused section per row, ending where the suffix starts
                    receiver_cache = self.fuse(receiver_cache, sharer_caches, fuse_masks, receiver_input=receiver_input)
                else:
                    def fuse_pass(cache, in_pass):
                        return self.fuse(cache, sharer_caches, [m & in_pass for m in fuse_masks],
                                         receiver_input=receiver_input)

                    receiver_cache = fuse_in_sections(
                        self.receiver, batch.tokens, batch.positions, batch.valid, receiver_cache, fuse_pass,
                        fusion_sections(_any(fuse_masks), batch.fused_sections), batch.fused_sections)
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
            section = fusion_sections(_any(batch.fuse_masks(suffix_length)), batch.fused_sections)
            held = (section < batch.fused_sections)[:, suffix]
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
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def fuse_in_sections(receiver: Decoder, tokens, positions, valid, cache: KVCache, fuse_pass, section,
                     fused_sections: int) -> KVCache:
    """The receiver cache after fusing each section in turn (docs/upstream_reference.md §2.3).

    cache: the receiver's KV-only pass over all columns, which pass 0 uses as is. Pass p > 0 reruns
    the receiver over all columns with the K/V of earlier passes' columns held (fused where fused),
    so its own columns see the fused sections before them, as upstream's section-by-section forward
    does; the columns of later passes it computes on the way are recomputed by their own pass.
    fuse_pass(cache, in_pass): fuses the columns where bool [B, T] `in_pass` is set.
    valid: bool [B, T] or None (each row's real tokens first). Columns of the final section
    (`fusion_sections`) hold pass-(fused_sections - 1) K/V: the caller runs them after fusion.
    """
    for p in range(fused_sections):
        if p:
            _, rerun = receiver(tokens, positions, dataclasses.replace(cache, end=jnp.zeros_like(cache.end)), valid,
                                output="kv", held=section < p)
            cache = dataclasses.replace(rerun, valid=cache.valid, end=cache.end)
        cache = fuse_pass(cache, section == p)
    return cache


def kv_pass(model: Decoder, tokens, positions, valid, depth: int) -> KVCache:
    """A fresh cache of `depth` layers filled from `tokens` (KV-only: no logits, no final norm).

    valid: bool [B, T] real tokens, or None when every row's real tokens come first (padding only
    after them: causality alone then hides it, and the cache marks every column valid).

    With `valid`, the pass runs on each row's real tokens moved to its front (in order, padding
    after them), where causality alone hides the padding, and moves the K/V columns back. Each real
    token sees the same keys as under a padding mask, but the attention needs no mask, which cuDNN
    would read as a [T, T] bias in every layer (docs/performance.md). Padding columns' K/V are
    unspecified; `valid` keeps them out of every later attention.
    """
    cache = model.init_cache(tokens.shape[0], tokens.shape[1], num_layers=depth)
    if valid is None:
        return model(tokens, positions, cache, output="kv")[1]
    # packed_column[b, c]: where column c goes; real columns first, then padding, each in order.
    real_before = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - valid
    pads_before = jnp.arange(valid.shape[1], dtype=jnp.int32) - real_before
    packed_column = jnp.where(valid, real_before, valid.sum(axis=1, keepdims=True, dtype=jnp.int32) + pads_before)
    rows = jnp.arange(valid.shape[0])[:, None]

    def pack(a):
        return jnp.zeros_like(a).at[rows, packed_column].set(a, unique_indices=True)

    _, packed = model(pack(tokens), pack(positions), cache, output="kv")

    def unpack(kv):  # [layers, B, T, kv_heads, head_dim]: column c from packed column packed_column[b, c]
        return jnp.take_along_axis(kv, packed_column[None, :, :, None, None], axis=2)

    return dataclasses.replace(packed, k=unpack(packed.k), v=unpack(packed.v), valid=valid)


