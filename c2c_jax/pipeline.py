"""Fused inference: prefill receiver and sharers, fuse, decode.

For a batch of prompts, left-padded to a common width W (so every prompt ends at column W - 1):

    1. receiver and every sharer run the prompt, KV only (no logits);
    2. each fuser writes its sharer's K/V into the receiver cache where `fuse_mask` is set, except in
       the last column;
    3. the receiver runs the last prompt column again, on the fused cache (overwriting that column's
       K/V) -> logits of the first new token;
    4. decode on the fused cache (generated tokens are never fused).

The last prompt token is excluded from fusion so that the first new token is predicted by a query
that attends to the fused prefix (c2c_reference.md §2.4).

Prompts whose fused columns are not simply every column before the last (token-aligned pairs, where
only message contents are fused) run as upstream runs them, section by section
(c2c_reference.md §2.3): each fused section is fused from receiver K/V that already saw the fused
sections before it (`fuse_in_sections`), and every column after the last fused one (the trailing
chat template) runs in step 3, after fusion. Steps 1-2 (`C2CModel.prompt_cache`) and
steps 3-4 (`C2CModel.finish_prompt`, then `decode`) are two jitted programs that the host dispatches
back to back (`InferencePrograms`); only the decode loop's tokens come back to the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from typing import Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import io_callback

from c2c_jax.alignment import TokenAligner, own_positions, pad_id_of, tokenizers_compatible
from c2c_jax.controls import FusionControl
from c2c_jax.fuser import Fuser
from c2c_jax.models import Decoder, KVCache
from c2c_jax.models.kv_cache import decode_capacity

MultiSharerMode = Literal["sequential", "parallel"]
SharerPositions = Literal["shared", "own"]


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
            check_fuser_fits(fuser, receiver, sharer, name=f"fuser {i}")
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
        each sees the receiver's own cache and the residuals are summed (c2c_reference.md §2.3)."""
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

    def prefix_caches(self, batch: "PromptBatch", length: int, *, with_sharers: bool = True
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

    def prefill(self, batch: "PromptBatch", capacity: int, *, fuse: bool = True, suffix_length: int = 1,
                control: FusionControl | None = None) -> tuple[jax.Array, KVCache]:
        """float32 logits [B, vocab] after the last prompt column, and the (fused) receiver cache.

        The last `suffix_length` columns run after fusion, on the fused cache, and are never fused
        themselves: 1 for generation (c2c_reference.md §2.4); the answer prefix's length when scoring
        option logits after "The correct answer is" (§5.4). Receiver-only (`fuse=False`) takes the
        same route minus the sharers and fusers, so with closed gates both give bit-identical logits.
        `prompt_cache` then `finish_prompt`; `InferencePrograms` runs them as two programs (see there).
        `control` (evaluation only) replaces what the fusers read (`controls.FusionControl`).
        """
        cache = self.prompt_cache(batch, fuse=fuse, suffix_length=suffix_length, control=control)
        return self.finish_prompt(batch, cache, capacity, suffix_length=suffix_length)

    def prompt_cache(self, batch: "PromptBatch", *, fuse: bool = True, suffix_length: int = 1,
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

    def lockstep_prefix(self, batch: "PromptBatch", receiver_cache: KVCache, sharer_caches: Sequence[KVCache], *,
                        suffix_length: int = 1) -> "LockstepCaches":
        """Decode-time fusion's prompt caches (c2c_reference.md §2.6): every fusable column fused, the
        suffix's too, from the receiver's unfused pass; the unfused and sharer caches are kept, as the
        next tokens' fusion reads them. The fused cache is rewound to before the suffix, which
        `finish_prompt` runs with its fused K/V held."""
        if batch.final_section:
            raise ValueError("decode-time fusion (include_response) runs prompts whose every real column is fused, "
                             "as for a sharer with the receiver's tokenizer; token-aligned prompts are not supported")
        with jax.named_scope("fusion"):
            fused = self.fuse(receiver_cache, sharer_caches, list(batch.fuse_mask))
        fused = dataclasses.replace(fused, end=fused.end - suffix_length)
        return LockstepCaches(fused, receiver_cache, tuple(sharer_caches))

    def fused_prefix(self, batch: "PromptBatch", receiver_cache: KVCache, sharer_caches: Sequence[KVCache], *,
                     suffix_length: int = 1, control: FusionControl | None = None) -> KVCache:
        """`prefix_caches`' caches (no sharer caches: no fusion) fused except in the last `suffix_length`
        columns, and rewound to before them: `prompt_cache`'s result.

        Each fuser reads its sharer's cache as it was trained to (`FuserConfig.sharer_input`), or as
        `control` says."""
        if sharer_caches:
            fuse_masks = prompt_fuse_masks(batch, suffix_length)
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

    def finish_prompt(self, batch: "PromptBatch", cache: KVCache, capacity: int, *, suffix_length: int = 1
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
            section = fusion_sections(_any(prompt_fuse_masks(batch, suffix_length)), batch.fused_sections)
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

    def decode_step(self, batch: "PromptBatch"):
        """step(caches, tokens [B, 1], positions [B, 1]) -> (float32 logits [B, 1, vocab], caches): one
        decode step of decode-time fusion (c2c_reference.md §2.6), for `decode`.

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


def prompt_fuse_masks(batch: "PromptBatch", suffix_length: int) -> list[jax.Array]:
    """Each sharer's fuse mask [B, W] with the last `suffix_length` columns left unfused."""
    split = batch.tokens.shape[1] - suffix_length
    return [m.at[:, split:].set(False) for m in batch.fuse_mask]


def _any(masks: Sequence[jax.Array]) -> jax.Array:
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def final_width(batch: "PromptBatch", suffix_length: int) -> int:
    """Static width of the window that runs after fusion: the suffix for the usual layout; else
    the widest final section (every column after a row's last fused one), or the whole prompt when
    the batch cannot tell it (a suffix of more than one column)."""
    if batch.final_section == 0:
        return suffix_length
    return batch.final_section if suffix_length == 1 else batch.tokens.shape[1]


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


def fuse_in_sections(receiver: Decoder, tokens, positions, valid, cache: KVCache, fuse_pass, section,
                     fused_sections: int) -> KVCache:
    """The receiver cache after fusing each section in turn (c2c_reference.md §2.3).

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


def inference_copy(fuser: Fuser) -> Fuser:
    """The fuser with parameters stored in its compute dtype.

    Training keeps float32 master weights; at inference, casting ~0.5B parameters to bfloat16 on
    every call would cost more memory traffic than the fusion's matmuls themselves.
    """
    graphdef, state = nnx.split(fuser)
    dtype = jnp.dtype(fuser.config.dtype)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))


def check_fuser_fits(fuser: Fuser, receiver: Decoder, sharer: Decoder, name: str = "fuser") -> None:
    from c2c_jax.checkpoint import check_pair

    check_pair(fuser.config, receiver.config, sharer.config, source=name)


# ------------------------------------------------------------------------------------------------
# Batched prompts.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts for the receiver and, column-aligned, for every sharer. All [B, W]."""

    tokens: jax.Array  # int32 receiver ids
    valid: jax.Array  # bool: real receiver token
    positions: jax.Array  # int32 receiver positions
    sharer_tokens: tuple
    sharer_valid: tuple
    sharer_positions: tuple
    fuse_mask: tuple  # per sharer, bool: fuse this column
    # Static layout (see `fusion_sections`, `final_width`); the defaults are the usual layout, where
    # each row fuses every real column (but the suffix) in one section.
    fused_sections: int = dataclasses.field(default=1, metadata=dict(static=True))
    final_section: int = dataclasses.field(default=0, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt before batching: receiver ids plus, per sharer, ids, validity and fusable columns."""

    tokens: np.ndarray
    valid: np.ndarray
    sharer_tokens: tuple
    sharer_valid: tuple
    fusable: tuple


class PromptEncoder:
    """Turns chats (or raw text) into `PromptBatch`es for a receiver and its sharers.

    Sharers whose tokenizer matches the receiver's read the receiver's ids directly and every
    prompt token but the last is fused. Others go through `TokenAligner`: each model renders its
    own chat template, only message-content tokens are fused.
    """

    def __init__(self, receiver_tokenizer, sharer_tokenizers: Sequence = (), *, alignment: str = "auto",
                 strategy: str = "first", sharer_positions: SharerPositions = "shared", pad_to: int = 64,
                 enable_thinking: bool = False):
        if alignment not in ("auto", "on", "off"):
            raise ValueError(f"alignment must be 'auto', 'on' or 'off', not {alignment!r}")
        if sharer_positions not in ("shared", "own"):
            raise ValueError(f"sharer_positions must be 'shared' or 'own', not {sharer_positions!r}")
        self.receiver_tokenizer = receiver_tokenizer
        self.aligners = []
        for tok in sharer_tokenizers:
            needed = alignment == "on" or (alignment == "auto" and not tokenizers_compatible(receiver_tokenizer, tok))
            self.aligners.append(TokenAligner(receiver_tokenizer, tok, strategy) if needed else None)
        if sum(a is not None for a in self.aligners) and len(self.aligners) > 1:
            raise ValueError("token alignment is supported for a single sharer; with several sharers all must "
                             "share the receiver's tokenizer")
        self.sharer_positions = sharer_positions
        self.pad_to = pad_to
        self.enable_thinking = enable_thinking
        self.pad_id = pad_id_of(receiver_tokenizer)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> EncodedPrompt:
        aligner = next((a for a in self.aligners if a is not None), None)
        if aligner is not None:
            chat = aligner.align_chat(messages, add_generation_prompt=add_generation_prompt,
                                      enable_thinking=self.enable_thinking,
                                      continue_final_message=continue_final_message)
            # Trailing columns without a receiver token carry only sharer template tokens that no
            # fused position can see: drop them so every prompt ends with a real receiver token.
            n = int(np.flatnonzero(chat.receiver_valid)[-1]) + 1
            fusable = chat.message_mask[:n] & chat.receiver_valid[:n] & chat.sharer_valid[:n]
            return EncodedPrompt(chat.receiver_ids[:n], chat.receiver_valid[:n], (chat.sharer_ids[:n],),
                                 (chat.sharer_valid[:n],), (fusable,))
        text = self.receiver_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, enable_thinking=self.enable_thinking)
        return self.encode_text(text)

    def encode_text(self, text: str) -> EncodedPrompt:
        ids = np.asarray(self.receiver_tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
        return self.encode_ids(ids)

    def encode_ids(self, ids: np.ndarray) -> EncodedPrompt:
        ids = np.asarray(ids, np.int32)
        valid = np.ones(ids.shape, bool)
        sharer_tokens = tuple(ids if a is None else a.map_ids(ids) for a in self.aligners)
        return EncodedPrompt(ids, valid, sharer_tokens, tuple(valid for _ in self.aligners),
                             tuple(valid for _ in self.aligners))

    def batch(self, prompts: Sequence[EncodedPrompt], *, width: int | None = None) -> PromptBatch:
        """Left-pads to a common width (a multiple of `pad_to`, or `width`)."""
        longest = max(len(p.tokens) for p in prompts)
        if width is None:
            width = -(-longest // self.pad_to) * self.pad_to
        if longest > width:
            raise ValueError(f"a prompt of {longest} tokens does not fit the batch width {width}")
        b, n_sharers = len(prompts), len(self.aligners)

        def left_pad(rows, fill, dtype):
            out = np.full((b, width), fill, dtype)
            for r, row in enumerate(rows):
                out[r, width - len(row):] = row
            return out

        tokens = left_pad([p.tokens for p in prompts], self.pad_id, np.int32)
        valid = left_pad([p.valid for p in prompts], False, bool)
        starts = np.array([width - len(p.tokens) for p in prompts])[:, None]
        shared = np.maximum(np.arange(width)[None] - starts, 0).astype(np.int32)
        sharer_tokens, sharer_valid, sharer_positions, fuse_mask = [], [], [], []
        for j in range(n_sharers):
            sharer_tokens.append(left_pad([p.sharer_tokens[j] for p in prompts], self.pad_id, np.int32))
            s_valid = left_pad([p.sharer_valid[j] for p in prompts], False, bool)
            sharer_valid.append(s_valid)
            sharer_positions.append(shared if self.sharer_positions == "shared" else own_positions(s_valid))
            fuse_mask.append(left_pad([p.fusable[j] for p in prompts], False, bool))
        positions = shared if self.sharer_positions == "shared" else own_positions(valid)
        return PromptBatch(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(positions),
                           tuple(map(jnp.asarray, sharer_tokens)), tuple(map(jnp.asarray, sharer_valid)),
                           tuple(map(jnp.asarray, sharer_positions)), tuple(map(jnp.asarray, fuse_mask)),
                           **section_layout(valid, fuse_mask))


def section_layout(valid: np.ndarray, fuse_masks: Sequence[np.ndarray]) -> dict:
    """`PromptBatch`'s static layout fields for left-padded [B, W] masks.

    The usual layout (every real column fused, as for a sharer with the receiver's tokenizer) keeps
    the defaults. Otherwise: the most fused runs of a row and the widest final section, with the
    last column left unfused (as generation leaves it).
    """
    if not fuse_masks or all(np.array_equal(m, valid) for m in fuse_masks):
        return {}
    fuse = np.logical_or.reduce([np.asarray(m, bool) for m in fuse_masks])
    fuse[:, -1] = False
    width = fuse.shape[1]
    runs = (fuse & ~np.concatenate([fuse[:, 1:], np.zeros_like(fuse[:, :1])], axis=1)).sum(axis=1)
    last_fused = np.where(fuse.any(axis=1), width - 1 - np.argmax(fuse[:, ::-1], axis=1), -1)
    return dict(fused_sections=max(int(runs.max()), 1), final_section=int((width - 1 - last_fused).max()))


# ------------------------------------------------------------------------------------------------
# Sampling and decoding.


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """int32 [B] from float32 logits [B, vocab]."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # Keep the sorted prefix whose cumulative probability is <= top_p, and always the top token.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        keep = (cumulative <= sampling.top_p).at[:, 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: jax.Array  # int32 [B, max_new_tokens], `pad_id` after a row's end
    lengths: jax.Array  # int32 [B]: new tokens per row, EOS included


def decode(receiver: Decoder, first_logits, cache: KVCache, next_positions, key, sampling: SamplingConfig,
           eos_ids: tuple[int, ...], pad_id: int, *, step=None, on_token=None) -> Generation:
    """Samples up to `max_new_tokens` tokens with a `lax.while_loop`; stops when every row hit EOS.

    step: None (the receiver's decode step on `cache`), or `C2CModel.decode_step`'s (decode-time
    fusion; `cache` then its `LockstepCaches`).
    on_token: None, or a host function on_token(tokens [B], new [B]) called, in order, with each
      step's tokens as they are sampled (new: the row had not ended before): streaming.
    """
    def emit(token, new):  # new: a function, so the non-streaming program computes nothing for it
        if on_token is not None:
            io_callback(on_token, None, token, new(), ordered=True)

    decode_one = step or (lambda cache, tokens, positions: receiver(tokens, positions, cache))
    b = first_logits.shape[0]
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    first_key, key = jax.random.split(key)
    first = sample_tokens(first_logits, first_key, sampling)
    tokens = jnp.full((b, sampling.max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    finished = jnp.isin(first, eos)
    lengths = jnp.ones((b,), jnp.int32)
    emit(first, lambda: jnp.ones((b,), bool))

    def cond(state):
        step, _, _, finished, _, _ = state
        return (step < sampling.max_new_tokens) & ~jnp.all(finished)

    def body(state):
        step, cache, tokens, finished, lengths, key = state
        key, step_key = jax.random.split(key)
        previous = tokens[:, step - 1]
        logits, cache = decode_one(cache, previous[:, None], (next_positions + step - 1)[:, None])
        token = jnp.where(finished, pad_id, sample_tokens(logits[:, 0], step_key, sampling))
        emit(token, lambda: ~finished)
        tokens = tokens.at[:, step].set(token)
        lengths = lengths + (~finished).astype(jnp.int32)
        finished = finished | jnp.isin(token, eos)
        return step + 1, cache, tokens, finished, lengths, key

    state = (jnp.asarray(1, jnp.int32), cache, tokens, finished, lengths, key)
    _, _, tokens, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    return Generation(tokens, lengths)


class InferencePrograms:
    """Fused inference's jitted programs for one `C2CModel` structure (its graphdef); each call takes its state.

    The programs close over the model's graphdef instead of taking it as a static argument, which
    every call would hash and compare: 0.16 ms per program for Qwen3-0.6B <- Qwen2.5-0.5B on a
    2-core CPU host, against a time to first token of a few milliseconds.

    Every route is two programs: the prompt's cache (`C2CModel.prompt_cache`, fused unless
    `fuse=False`), then the last prompt token (`finish_prompt`) and any decoding. C2C's last token
    waits for the fusion of every layer anyway, and on a GPU the host starts the second program's
    CUDA graph while the GPU still runs the first: on an H200 that took a 512-token C2C time to
    first token from 7.23 to 6.57 ms. Receiver-only takes the same cut, so that with closed gates
    both routes compile the last token alike and give bit-identical logits (in one program XLA may
    round it differently); the cut costs it nothing measurable (4.46 ms against 4.58 ms as one
    program, same H200).
    """

    def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None):
        """graphdef: `nnx.split(c2c_model)[0]`.

        mesh: None (one device), or the devices that share each batch (its rows split over the
        mesh's batch axes, weights replicated): the programs trace under it, so the attention
        kernels run per device, and the logits and generations come back replicated, which every
        process of a multi-host slice can read.
        """
        self.graphdef = graphdef
        self.mesh = mesh
        replicated = {} if mesh is None else dict(out_shardings=NamedSharding(mesh, P()))
        self._prompt_cache = jax.jit(self._prompt_cache_program, static_argnames=("fuse", "suffix_length"))
        # Controls are pytrees (their kind static), so each kind compiles once.
        self._logits = jax.jit(self._logits_program, static_argnames=("suffix_length",), **replicated)
        self._generate = jax.jit(self._generate_program, static_argnames=("sampling", "eos_ids", "pad_id", "stream"),
                                 **replicated)
        self._sink = None  # where a streaming program's tokens go (`stream`)
        self._streaming = threading.Lock()
        self._variants = jax.jit(self._variants_program, static_argnames=("suffix_length", "receiver_only"),
                                 **replicated)

    def _under_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.sharding.use_abstract_mesh(
            self.mesh.abstract_mesh)

    def variant_logits(self, state, batch: PromptBatch, controls: tuple, *, suffix_length: int,
                       receiver_only: bool) -> jax.Array:
        """float32 [variants, B, vocab]: the receiver alone (first, if `receiver_only`), then one fused
        route per entry of `controls` (None: the fusers' own inputs), all from one pass of the receiver
        and the sharers over the prompt. Evaluation compares them on the same items at this cost."""
        return self._variants(state, batch, controls, suffix_length=suffix_length, receiver_only=receiver_only)

    def _variants_program(self, state, batch, controls, *, suffix_length, receiver_only):
        with self._under_mesh():
            model = nnx.merge(self.graphdef, state)
            width = batch.tokens.shape[1]
            receiver_cache, sharer_caches = model.prefix_caches(batch, width)
            caches = [model.fused_prefix(batch, receiver_cache, [], suffix_length=suffix_length)] if receiver_only else []
            caches += [model.fused_prefix(batch, receiver_cache, sharer_caches, suffix_length=suffix_length, control=c)
                       for c in controls]
            return jnp.stack([model.finish_prompt(batch, cache, width, suffix_length=suffix_length)[0]
                              for cache in caches])

    def next_token_logits(self, state, batch: PromptBatch, *, fuse: bool = True, suffix_length: int = 1,
                          control: FusionControl | None = None) -> jax.Array:
        """float32 [B, vocab] logits after each prompt (the time to first token's work)."""
        cache = self._prompt_cache(state, batch, control, fuse=fuse, suffix_length=suffix_length)
        return self._logits(state, batch, cache, suffix_length=suffix_length)

    def generate(self, state, batch: PromptBatch, key, *, sampling: SamplingConfig, eos_ids: tuple[int, ...],
                 pad_id: int, fuse: bool = True, control: FusionControl | None = None) -> Generation:
        cache = self._prompt_cache(state, batch, control, fuse=fuse, suffix_length=1)
        return self._generate(state, batch, cache, key, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                              stream=False)

    def stream(self, state, batch: PromptBatch, key, *, sampling: SamplingConfig, eos_ids: tuple[int, ...],
               pad_id: int, fuse: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`generate`'s tokens as the device samples them: (tokens [B], new [B]) per step.

        A program of its own, with a host callback per step; `generate`'s has none, so streaming
        costs the non-streaming route nothing. One stream at a time per `InferencePrograms`.
        """
        if not self._streaming.acquire(blocking=False):
            raise RuntimeError("another stream of these inference programs is still running; finish it first")
        steps: queue.Queue = queue.Queue()
        out = None
        try:
            self._sink = lambda tokens, new: steps.put((np.asarray(tokens), np.asarray(new)))
            cache = self._prompt_cache(state, batch, None, fuse=fuse, suffix_length=1)
            out = self._generate(state, batch, cache, key, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                                 stream=True)
            while True:  # the program runs on while the host reads its steps
                try:
                    yield steps.get(timeout=0.005)
                except queue.Empty:
                    if out.lengths.is_ready() and steps.empty():  # every callback has returned
                        break
            jax.block_until_ready(out)  # raises what the program raised
        finally:
            if out is not None:  # a reader that stopped early: let the program finish into this stream's queue
                jax.block_until_ready(out)
            self._sink = None
            self._streaming.release()

    def _emit(self, tokens, new):
        self._sink(tokens, new)

    def _prompt_cache_program(self, state, batch, control, *, fuse, suffix_length):
        with self._under_mesh():
            return nnx.merge(self.graphdef, state).prompt_cache(batch, fuse=fuse, suffix_length=suffix_length,
                                                                control=control)

    def _logits_program(self, state, batch, cache, *, suffix_length):
        with self._under_mesh():
            logits, _ = nnx.merge(self.graphdef, state).finish_prompt(batch, cache, batch.tokens.shape[1],
                                                                       suffix_length=suffix_length)
        return logits

    def _generate_program(self, state, batch, cache, key, *, sampling, eos_ids, pad_id, stream):
        with self._under_mesh():
            model = nnx.merge(self.graphdef, state)
            capacity = decode_capacity(batch.tokens.shape[1] + sampling.max_new_tokens, model.receiver.platform)
            logits, cache = model.finish_prompt(batch, cache, capacity)
            step = model.decode_step(batch) if isinstance(cache, LockstepCaches) else None
            return decode(model.receiver, logits, cache, batch.positions[:, -1] + 1, key, sampling, eos_ids, pad_id,
                          step=step, on_token=self._emit if stream else None)


class Generator:
    """Text in, text out: receiver-only or C2C generation over batches of chats."""

    def __init__(self, model: C2CModel, encoder: PromptEncoder, *, eos_ids: Sequence[int] | None = None,
                 mesh: jax.sharding.Mesh | None = None):
        """mesh: None (one device), or the devices (of every process) that share each batch: the
        weights are replicated on all of them and a batch's rows split over them (a batch is
        filled up to a multiple of the mesh's size with copies of its last row)."""
        self.model = model
        self.encoder = encoder
        self.mesh = mesh
        graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = jax.device_put(self.state, NamedSharding(mesh, P()))
        self.programs = InferencePrograms(graphdef, mesh)
        tok = encoder.receiver_tokenizer
        if eos_ids is None:
            eos_ids = set(model.receiver.config.eos_token_ids)
            eos_ids.update(i for i in (tok.eos_token_id,) if i is not None)
            im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
            eos_ids.update(i for i in (im_end,) if i is not None)
        self.eos_ids = tuple(sorted(int(i) for i in eos_ids))

    def generate_batch(self, batch: PromptBatch, sampling: SamplingConfig, *, fuse: bool = True,
                       seed: int = 0, control: FusionControl | None = None) -> Generation:
        self._check_fits(batch, sampling)
        return self.programs.generate(self.state, self.placed(batch), jax.random.key(seed), sampling=sampling,
                                      eos_ids=self.eos_ids, pad_id=self.encoder.pad_id, fuse=fuse, control=control)

    def _check_fits(self, batch: PromptBatch, sampling: SamplingConfig) -> None:
        max_len = self.model.receiver.config.max_position_embeddings
        if batch.tokens.shape[1] + sampling.max_new_tokens > max_len:
            raise ValueError(f"prompt width {batch.tokens.shape[1]} + max_new_tokens {sampling.max_new_tokens} "
                             f"exceeds the receiver's context of {max_len} tokens")

    def next_token_logits(self, batch: PromptBatch, *, fuse: bool = True, suffix_length: int = 1,
                          control: FusionControl | None = None) -> jax.Array:
        """float32 [B, vocab] logits after each prompt: the first-token prediction (time to first token).
        `control`: an evaluation control for the fusers' inputs (`controls.FusionControl`)."""
        return self.programs.next_token_logits(self.state, self.placed(batch), fuse=fuse, suffix_length=suffix_length,
                                               control=control)

    def variant_logits(self, batch: PromptBatch, controls: Sequence[FusionControl | None], *, suffix_length: int = 1,
                       receiver_only: bool = False) -> jax.Array:
        """float32 [variants, B, vocab]: `InferencePrograms.variant_logits` (receiver alone and fused
        variants from one prefill)."""
        return self.programs.variant_logits(self.state, self.placed(batch), tuple(controls),
                                            suffix_length=suffix_length, receiver_only=receiver_only)

    def placed(self, batch: PromptBatch) -> PromptBatch:
        """The batch on the mesh, its rows split over all its devices (rows past the batch's own are
        copies of its last, so that every device gets whole rows); unchanged without a mesh."""
        if self.mesh is None:
            return batch
        rows = batch.tokens.shape[0]
        filled = -(-rows // self.mesh.size) * self.mesh.size
        from c2c_jax.sharding import batch_sharding

        def put(x):
            x = np.asarray(x)
            x = np.concatenate([x, np.repeat(x[-1:], filled - rows, axis=0)]) if filled > rows else x
            # Every process holds the same batch; each device takes its rows from it.
            return jax.make_array_from_callback(x.shape, batch_sharding(self.mesh, x.ndim, 0), lambda index: x[index])

        return jax.tree.map(put, batch)

    def stream_chat(self, conversations: Sequence[list[dict]], sampling: SamplingConfig = SamplingConfig(), *,
                    fuse: bool = True, seed: int = 0) -> Iterator[list[str]]:
        """`chat`'s answers as they decode: per step, one new piece of text per conversation ("" when
        a row has nothing new). Joined, a row's pieces are its `chat` answer before stripping."""
        batch = self.encoder.batch([self.encoder.encode_chat(c) for c in conversations])
        self._check_fits(batch, sampling)
        texts = [IncrementalText(self.encoder.receiver_tokenizer) for _ in conversations]
        for tokens, new in self.programs.stream(self.state, self.placed(batch), jax.random.key(seed), sampling=sampling,
                                                eos_ids=self.eos_ids, pad_id=self.encoder.pad_id, fuse=fuse):
            yield [text.add(int(t)) if n else "" for text, t, n in zip(texts, tokens, new)]
        tail = [text.flush() for text in texts]
        if any(tail):
            yield tail

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingConfig = SamplingConfig(), *,
             fuse: bool = True, seed: int = 0) -> list[str]:
        """One answer per conversation (a list of {"role", "content"} messages)."""
        batch = self.encoder.batch([self.encoder.encode_chat(c) for c in conversations])
        out = jax.device_get(self.generate_batch(batch, sampling, fuse=fuse, seed=seed))
        tok = self.encoder.receiver_tokenizer
        return [tok.decode(out.tokens[r, : out.lengths[r]], skip_special_tokens=True).strip()
                for r in range(len(conversations))]


class IncrementalText:
    """One row's text, token by token: each `add` returns the text the new token completes.

    Decoding the whole row each time keeps tokenizers' merging of pieces (spaces, byte-level
    tokens) exact; text ending in an incomplete character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.shown = text[self.shown:], len(text)
        return piece
