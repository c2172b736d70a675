"""Prompts as the receiver and its sharers read them: tokens, positions and the fuse mask.

One encoder (`PromptEncoder`) for inference, evaluation and training. A prompt's columns are shared by
the receiver and every sharer (column i of one model <-> column i of the others); sharers with the
receiver's tokenizer read the receiver's ids, others go through `TokenAligner` (each model renders its
own chat template, only message-content tokens are fused).

The fuse mask (`fuse_mask`, per sharer, bool per column) says which receiver columns a fuser writes. It
is made here, once per prompt (`PromptEncoder.encode_chat`, `PromptEncoder.encode_example`), and read by
`C2CModel` (`PromptBatch.fuse_masks`) and the trainer's batches (`train.batching.collate`). Positions
too are computed here, once (`column_positions`): "shared" counts columns from the prompt's first one
(alignment pads counted, as upstream), "own" counts each model's own real tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from c2c_jax.c2c.prefix import PackedRows, Prefix, fusion_sections
from c2c_jax.c2c.token_alignment import AlignedChat, TokenAligner, pad_id_of, tokenizers_compatible

SharerPositions = Literal["shared", "own"]

# Why a chat yields no training example (`PromptEncoder.encode_example`).
TEMPLATE_ERROR = "template_error"
ALIGNMENT_ERROR = "alignment_error"
ALIGNMENT_SECTIONS = "alignment_sections"  # message sections do not match the messages
PREFIX_MISMATCH = "prefix_mismatch"  # instruction tokens are not a prefix of the full chat's tokens
EMPTY_ANSWER = "empty_answer"
NO_PREFIX = "no_prefix"  # nothing before the last instruction token to fuse
TOO_LONG = "too_long"  # more than data.max_length receiver tokens


def own_positions(valid: np.ndarray) -> np.ndarray:
    """Positions that count only a model's own real tokens (no gaps at padding), per row."""
    return np.maximum(np.cumsum(valid, axis=-1) - 1, 0).astype(np.int32)


def column_positions(valid: np.ndarray, starts: np.ndarray, sharer_positions: SharerPositions) -> np.ndarray:
    """int32 [B, W] positions of one model's columns, for rows whose prompt starts at column `starts`
    [B] (left padding before it).

    "shared": the column's index from its row's start, the same for every model (alignment pads
    counted, as upstream); "own": the number of the model's own real tokens before the column. Every
    prompt and training example gets its positions here, so training sees the positions inference uses.
    """
    if sharer_positions == "shared":
        columns = np.arange(np.shape(valid)[-1])[None]
        return np.maximum(columns - np.asarray(starts).reshape(-1, 1), 0).astype(np.int32)
    return own_positions(valid)


def aligned_fuse_mask(chat: AlignedChat) -> np.ndarray:
    """bool [N]: the columns of a token-aligned chat that C2C fuses: message-content tokens that both
    models have (never a template token, never a pad)."""
    return chat.message_mask & chat.receiver_valid & chat.sharer_valid


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

    def fuse_masks(self, suffix_length: int) -> list[jax.Array]:
        """Each sharer's fuse mask with the last `suffix_length` columns left unfused: they run after
        fusion (docs/upstream_reference.md §2.4)."""
        split = self.tokens.shape[1] - suffix_length
        return [m.at[:, split:].set(False) for m in self.fuse_mask]

    def prefix(self, suffix_length: int = 1) -> Prefix:
        """The prompts as the route's prefill and fuse phases read them (`c2c.prefix`), the last
        `suffix_length` columns left unfused (0: every column of the fuse mask fused, as decode-time
        fusion fuses the suffix too)."""
        fuse_masks = tuple(self.fuse_masks(suffix_length))
        if self.final_section and fuse_masks:
            section = fusion_sections(functools.reduce(jnp.logical_or, fuse_masks), self.fused_sections)
        else:  # the usual layout: one pass fuses every column of the masks
            section = jnp.zeros(self.tokens.shape, jnp.int32)
        return Prefix(self.tokens, self.positions, self.valid,
                      tuple(map(PackedRows.pack, self.sharer_tokens, self.sharer_positions, self.sharer_valid)),
                      fuse_masks, section, self.fused_sections)


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt before batching: receiver ids plus, per sharer, ids, validity and the fuse mask."""

    tokens: np.ndarray
    valid: np.ndarray
    sharer_tokens: tuple
    sharer_valid: tuple
    fuse_mask: tuple  # per sharer, bool: the columns its fuser writes


class PromptEncoder:
    """Turns chats (or raw text) into prompts (`encode_chat`, `batch`: `PromptBatch`es) and chats with
    their answer into training examples (`encode_examples`), for a receiver and its sharers.

    Sharers whose tokenizer matches the receiver's read the receiver's ids directly and every
    prompt token but the last is fused. Others go through `TokenAligner`: each model renders its
    own chat template, only message-content tokens are fused.

    alignment: "auto" (align only when the tokenizers differ), "on", "off".
    max_length: training examples of more receiver tokens are skipped (None: no limit).
    receiver_vocab_size / sharer_vocab_size: embedding rows of each model; a training example with an
    id outside them is an error (a wrong tokenizer/model pairing), raised at the first offending chat.
    """

    def __init__(self, receiver_tokenizer, sharer_tokenizers: Sequence = (), *, alignment: str = "auto",
                 strategy: str = "first", sharer_positions: SharerPositions = "shared", pad_to: int = 64,
                 enable_thinking: bool = False, max_length: int | None = None,
                 receiver_vocab_size: int | None = None, sharer_vocab_size: int | None = None):
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
        self.enable_thinking = bool(enable_thinking)
        self.pad_id = pad_id_of(receiver_tokenizer)
        self.max_length = max_length
        self.receiver_vocab_size = receiver_vocab_size
        self.sharer_vocab_size = sharer_vocab_size
        # Training examples' sharer: the one sharer (or the receiver's own ids, without one).
        self._aligner = self.aligners[0] if len(self.aligners) == 1 else None
        self.sharer_pad_id = pad_id_of(sharer_tokenizers[0]) if self._aligner is not None else self.pad_id
        self._check_ids(np.asarray([self.pad_id]), np.asarray([self.sharer_pad_id]), what="the pad id")

    @property
    def aligned(self) -> bool:
        """Whether training examples are token-aligned (their sharer has another tokenizer)."""
        return self._aligner is not None

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
            return EncodedPrompt(chat.receiver_ids[:n], chat.receiver_valid[:n], (chat.sharer_ids[:n],),
                                 (chat.sharer_valid[:n],), (aligned_fuse_mask(chat)[:n],))
        return self.encode_text(self.render(messages, add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message))

    def render(self, messages, *, add_generation_prompt: bool, continue_final_message: bool = False):
        """The receiver's chat template applied to one chat (or to a list of chats: a list of texts)."""
        return self.receiver_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, enable_thinking=self.enable_thinking)

    def encode_text(self, text: str) -> EncodedPrompt:
        ids = np.asarray(self.receiver_tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
        return self.encode_ids(ids)

    def encode_ids(self, ids: np.ndarray) -> EncodedPrompt:
        ids = np.asarray(ids, np.int32)
        valid = np.ones(ids.shape, bool)
        sharer_tokens = tuple(ids if a is None else a.map_ids(ids) for a in self.aligners)
        return EncodedPrompt(ids, valid, sharer_tokens, tuple(valid for _ in self.aligners),
                             tuple(valid for _ in self.aligners))

    # -------------------------------------------------------------- training examples
    def encode_example(self, messages: list[dict]) -> TrainExample | str:
        """A training example of a chat whose last message is the answer, or the reason it is skipped."""
        (example,), stats = self.encode_examples([messages])
        return example if example is not None else next(iter(stats))

    def encode_examples(self, chats: Sequence[list[dict]], *, chunk_size: int = 2048
                        ) -> tuple[list[TrainExample | None], collections.Counter]:
        """One training example per chat (None where skipped) and the skip counts per reason.

        The instruction (every message but the last, with the generation prompt) is the prompt
        `encode_chat` makes; the last message, with its trailing template tokens, is the answer. The
        tokenizer is called once per chunk of chats (fast tokenizers batch in Rust).
        """
        if len(self.aligners) > 1:
            raise ValueError(f"training examples are for one sharer; this encoder has {len(self.aligners)}")
        out: list[TrainExample | None] = []
        stats: collections.Counter = collections.Counter()
        for start in range(0, len(chats), chunk_size):
            for result in self._encode_chunk(chats[start:start + chunk_size], start):
                if isinstance(result, str):
                    stats[result] += 1
                    out.append(None)
                else:
                    out.append(result)
        return out, stats

    def _render_chunk(self, chats) -> list[list[str] | None]:
        """Per chat [instruction text] (+ [full text] when not aligned), or None if the template fails."""
        try:  # one batched call per chunk; per chat only when some chat makes the template raise
            instructions = self.render([m[:-1] for m in chats], add_generation_prompt=True)
            full = () if self.aligned else (self.render(list(chats), add_generation_prompt=False),)
            out = [list(t) for t in zip(instructions, *full)]
            if len(out) == len(chats) and all(isinstance(x, str) for t in out for x in t):
                return out
        except ImportError:  # the template engine itself is missing: no chat can be rendered
            raise
        except Exception:  # noqa: BLE001
            pass
        out = []
        for messages in chats:
            try:
                rendered = [self.render(messages[:-1], add_generation_prompt=True)]
                if not self.aligned:
                    rendered.append(self.render(messages, add_generation_prompt=False))
                out.append(rendered)
            except ImportError:
                raise
            except Exception:  # noqa: BLE001 - a template that rejects this chat: skip it
                out.append(None)
        return out

    def _encode_chunk(self, chats, offset: int) -> list[TrainExample | str]:
        texts, owners, results = [], [], [None] * len(chats)
        for i, rendered in enumerate(self._render_chunk(chats)):
            if rendered is None:
                results[i] = TEMPLATE_ERROR
                continue
            texts += rendered
            owners.append(i)
        ids = self.receiver_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        step = 1 if self.aligned else 2
        for k, i in enumerate(owners):
            instruction = ids[step * k]
            if self.aligned:
                results[i] = self._aligned(chats[i], instruction)
            else:
                results[i] = self._plain(instruction, ids[step * k + 1])
            if isinstance(results[i], TrainExample):
                self._check_ids(results[i].tokens, results[i].sharer_tokens, what=f"chat {offset + i}")
        return results

    def _plain(self, instruction: list, full: list) -> TrainExample | str:
        n_instr = len(instruction)
        if full[:n_instr] != instruction:
            return PREFIX_MISMATCH
        if self.max_length is not None and len(full) > self.max_length:
            return TOO_LONG
        if len(full) == n_instr:
            return EMPTY_ANSWER
        if n_instr < 2:
            return NO_PREFIX
        tokens = np.asarray(full, np.int32)
        valid = np.broadcast_to(np.True_, tokens.shape)  # read-only, no memory (500k chats add up)
        return TrainExample(tokens, valid, tokens, valid, valid, n_instr - 1)

    def _aligned(self, messages, instruction: list) -> TrainExample | str:
        try:
            chat = self._aligner.align_chat(messages, add_generation_prompt=False,
                                           enable_thinking=self.enable_thinking)
        except ValueError:
            return ALIGNMENT_ERROR
        message_sections = [s for s in chat.sections if s[2] == "message"]
        if len(message_sections) != len(messages):  # every message content is non-blank (load_chats)
            return ALIGNMENT_SECTIONS
        answer_start = message_sections[-1][0]  # labels start at the last message section
        r_valid = chat.receiver_valid
        if chat.receiver_ids[:answer_start][r_valid[:answer_start]].tolist() != list(instruction):
            return PREFIX_MISMATCH  # training would see a prefix the inference prompt does not have
        if self.max_length is not None and int(r_valid.sum()) > self.max_length:
            return TOO_LONG
        before = np.flatnonzero(r_valid[:answer_start])
        if before.size < 2:
            return NO_PREFIX
        split = int(before[-1])  # the last real receiver token before the answer
        columns = np.arange(r_valid.shape[0])
        keep = (columns <= split) | r_valid  # drop receiver pads after the split (suffix is receiver-only)
        if not (keep & (columns > split)).any():
            return EMPTY_ANSWER
        return TrainExample(chat.receiver_ids[keep], r_valid[keep], chat.sharer_ids[keep],
                            chat.sharer_valid[keep], aligned_fuse_mask(chat)[keep], split)

    def _check_ids(self, tokens: np.ndarray, sharer_tokens: np.ndarray, *, what: str) -> None:
        for side, ids, size in (("receiver", tokens, self.receiver_vocab_size),
                                ("sharer", sharer_tokens, self.sharer_vocab_size)):
            if size is not None and ids.size and (int(ids.max()) >= size or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= size else int(ids.min())
                raise ValueError(
                    f"{what}: {side} token id {bad} is outside the {side} model's vocabulary of {size} rows; "
                    f"the {side} tokenizer does not belong to the {side} model (check receiver/sharer paths"
                    + (" and alignment.tokens: 'off' feeds receiver ids to the sharer" if side == "sharer" else "")
                    + ")")

    def padded_width(self, tokens: int) -> int:
        """The batch width of a prompt of `tokens` tokens: the next multiple of `pad_to`."""
        return -(-tokens // self.pad_to) * self.pad_to

    def batch(self, prompts: Sequence[EncodedPrompt], *, width: int | None = None) -> PromptBatch:
        """Left-pads to a common width (`padded_width` of the longest, or `width`)."""
        longest = max(len(p.tokens) for p in prompts)
        if width is None:
            width = self.padded_width(longest)
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
        starts = np.array([width - len(p.tokens) for p in prompts])
        sharer_tokens, sharer_valid, sharer_positions, fuse_mask = [], [], [], []
        for j in range(n_sharers):
            sharer_tokens.append(left_pad([p.sharer_tokens[j] for p in prompts], self.pad_id, np.int32))
            s_valid = left_pad([p.sharer_valid[j] for p in prompts], False, bool)
            sharer_valid.append(s_valid)
            sharer_positions.append(column_positions(s_valid, starts, self.sharer_positions))
            fuse_mask.append(left_pad([p.fuse_mask[j] for p in prompts], False, bool))
        positions = column_positions(valid, starts, self.sharer_positions)
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


def final_width(batch: PromptBatch, suffix_length: int) -> int:
    """Static width of the window that runs after fusion: the suffix for the usual layout; else
    the widest final section (every column after a row's last fused one), or the whole prompt when
    the batch cannot tell it (a suffix of more than one column)."""
    if batch.final_section == 0:
        return suffix_length
    return batch.final_section if suffix_length == 1 else batch.tokens.shape[1]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity equality (array fields)
class TrainExample:
    """One chat as columns shared by the receiver and the sharer (identical length N).

    Columns [0, split) are the fused prefix (the instruction minus its last token); column `split` is the
    last instruction token, which starts the unfused suffix; columns (split, N) are the answer: real
    receiver tokens, all loss targets (next-token prediction from the column before).
    """

    tokens: np.ndarray  # int32 [N] receiver ids
    valid: np.ndarray  # bool [N] real receiver token (False only at alignment pads, all before split)
    sharer_tokens: np.ndarray  # int32 [N]
    sharer_valid: np.ndarray  # bool [N]
    fuse_mask: np.ndarray  # bool [N] the prompt's fuse mask (as `encode_chat` makes it); training reads [:split]
    split: int  # first suffix column = instruction length - 1

    def __post_init__(self):
        # The fused columns are where both models have a token (`aligned_fuse_mask`): the batches
        # (`train.batching.collate`) move each model's real tokens to the front and read the mask there.
        s = self.split
        stray = np.flatnonzero(self.fuse_mask[:s] & ~(self.valid[:s] & self.sharer_valid[:s]))
        if stray.size:
            raise ValueError(f"the fuse mask is set at column {int(stray[0])}, where a model has no token (a pad)")

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def answer(self) -> np.ndarray:
        """The receiver ids that are loss targets."""
        return self.tokens[self.split + 1:]


