"""The fused prefix as the route's first two phases read it: the same for inference and training.

The C2C route is three phases, with the caches passed in and out (`c2c.model`):

    prefill_kv   the receiver and every sharer run the prefix, KV only: a receiver cache and sharer
                 caches, all on the receiver's columns
    fuse_prefix  the fusers write the sharers' K/V into the receiver cache where the fuse mask is
                 set, section by section (docs/upstream_reference.md §2.3)
    finish       the receiver runs what follows the prefix on the fused cache: the prompt's last
                 token and decoding (`C2CModel.finish_prompt`), or the answer of a training example

A `Prefix` is everything the first two read. Inference builds it from left-padded prompts
(`c2c.prompt.PromptBatch.prefix`), training from its batches, where each model's real tokens come
first in its row (`train.batching.TrainBatch.prefix`); the phases do not know which.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedRows:
    """One model's rows as its KV-only pass reads them, and where the receiver's columns are in them.

    Each row's real tokens come first, in order, padding after them: causality alone then keeps real
    tokens from padding, and the attention needs no mask, which cuDNN would read as a [T, T] bias in
    every layer (docs/performance.md). A sharer's row may hold tokens the receiver has no column for
    (alignment pads of the receiver): they are in its pass, not in its cache on the receiver's columns.
    """

    tokens: jax.Array  # int32 [B, T]
    positions: jax.Array  # int32 [B, T]
    columns: jax.Array | None  # int32 [B, W]: receiver column c reads packed column columns[b, c]; None: c itself
    valid: jax.Array  # bool [B, W]: the model has a real token at receiver column c

    @classmethod
    def pack(cls, tokens: jax.Array, positions: jax.Array, valid: jax.Array | None = None) -> "PackedRows":
        """Rows on the receiver's columns [B, W] with real tokens anywhere (`valid`; None: all real),
        packed on the device."""
        if valid is None:
            return cls(tokens, positions, None, jnp.ones(tokens.shape, bool))
        # columns[b, c]: where column c goes; real columns first, then padding, each in order.
        real_before = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - valid
        pads_before = jnp.arange(valid.shape[1], dtype=jnp.int32) - real_before
        columns = jnp.where(valid, real_before, valid.sum(axis=1, keepdims=True, dtype=jnp.int32) + pads_before)
        rows = jnp.arange(valid.shape[0])[:, None]

        def pack(a):
            return jnp.zeros_like(a).at[rows, columns].set(a, unique_indices=True)

        return cls(pack(tokens), pack(positions), columns, valid)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
    """A batch's fused prefixes on the receiver's columns [B, W].

    tokens, positions, valid: the receiver's rows on its own columns; the section passes rerun them.
    packed (static): each row's real tokens come first (training's layout): the receiver's passes
      then need no mask; otherwise (left-padded prompts) they are packed on the device.
    sharers: each sharer's `PackedRows`, mapped onto the receiver's columns.
    fuse_masks: per sharer, bool [B, W]: the columns its fuser writes.
    section: int32 [B, W], the pass each column runs in (`fusion_sections`), of `fused_sections` (static);
      all 0 when one pass fuses every column of the masks.
    """

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array
    sharers: tuple
    fuse_masks: tuple
    section: jax.Array
    fused_sections: int = dataclasses.field(default=1, metadata=dict(static=True))
    packed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def receiver(self) -> PackedRows:
        """The receiver's rows as its KV-only pass reads them."""
        if self.packed:
            return PackedRows(self.tokens, self.positions, None, self.valid)
        return PackedRows.pack(self.tokens, self.positions, self.valid)

    @property
    def pass_mask(self) -> jax.Array | None:
        """The token mask of a receiver pass over these columns: None when the rows need none."""
        return None if self.packed else self.valid


def fusion_sections(fuse: jax.Array, fused_sections: int, xp=jnp):
    """int32 [B, T]: the pass in which each column runs, for a fuse mask [B, T] of at most
    `fused_sections` runs of fused columns per row.

    Pass p < fused_sections ends with the fusion of a row's p-th fused run (counted so that every
    row's last run is fused in the last of them) and holds the unfused columns before that run;
    columns after a row's last fused one get `fused_sections`: the final section, never fused.
    """
    fuse = xp.asarray(fuse, bool)
    following = xp.concatenate([fuse[:, 1:], xp.zeros_like(fuse[:, :1])], axis=1)
    run_ends = (fuse & ~following).astype(np.int32)
    ended_before = xp.cumsum(run_ends, axis=1) - run_ends
    return (ended_before + fused_sections - run_ends.sum(axis=1, keepdims=True)).astype(np.int32)
