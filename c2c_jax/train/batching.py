"""Training examples -> static-shape two-segment batches (docs/upstream_reference.md §4.2-4.3, §8.19).

`BatchIterator`: deterministic per-epoch shuffles, per-(P, R)-bucket queues, batches of shape
[micro_batches, micro_batch_size, P] (prefix: each model's real tokens first, then padding; see
`TrainBatch`) and [.., R] (suffix, RIGHT-padded). `state()` / `restore()` resume exactly; multi-host
processes all compute the same global sequence and each materialises only its own rows.
`load_train_data`: chats from a source (`train.sources`), encoded (`c2c.prompt.PromptEncoder`),
bucketed, with a seeded train/eval split.

A training prefix holds exactly the tokens and positions of an inference prompt (`c2c.prompt`),
packed to the left; the suffix continues the prefix's receiver positions. In aligned examples, the
columns after `split` are real receiver tokens, all of them answer tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import zlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from c2c_jax.c2c.prefix import PackedRows, Prefix
from c2c_jax.c2c.prompt import PromptEncoder, SharerPositions, TrainExample, column_positions, fusion_sections
from c2c_jax.train.sources import format_counts, load_chats

logger = logging.getLogger(__name__)

TOO_LONG_FOR_BUCKETS = "too_long_for_buckets"


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
    the answer targets. Positions are those of the inference prompt (`c2c.prompt.PromptEncoder`).
    """

    prefix_tokens: np.ndarray  # int32
    prefix_valid: np.ndarray  # bool
    prefix_positions: np.ndarray  # int32
    sharer_prefix_tokens: np.ndarray  # int32
    sharer_prefix_valid: np.ndarray  # bool
    sharer_prefix_positions: np.ndarray  # int32
    sharer_columns: np.ndarray  # int32
    fuse_mask: np.ndarray  # bool
    prefix_section: np.ndarray  # int32: the pass each prefix column runs in (`c2c.prompt.fusion_sections`)
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

    def prefix(self) -> Prefix:
        """The prefixes (of one micro-batch: [B, P]) as the route's prefill and fuse phases read them
        (`c2c.prefix`): the answer runs after fusion."""
        on_receiver_columns = PackedRows(self.sharer_prefix_tokens, self.sharer_prefix_positions, self.sharer_columns,
                                         jnp.take_along_axis(self.sharer_prefix_valid, self.sharer_columns, axis=1))
        return Prefix(self.prefix_tokens, self.prefix_positions, self.prefix_valid, (on_receiver_columns,),
                      (self.fuse_mask,), self.prefix_section, self.fused_sections, packed=True)

    def prefix_with_answer(self) -> Prefix:
        """Decode-time fusion's prefixes ([B, P + R]): the prefix's fused columns and every real answer
        token fused in one pass, from the receiver's unfused pass (docs/upstream_reference.md §2.6);
        the sharer reads the receiver's ids (the same tokenizer, no alignment pads)."""
        if self.fused_sections != 1 or self.trailing_section:
            raise ValueError("decode-time fusion (fuser.include_response) trains on chats whose every prefix column "
                             "is fused, as for a sharer with the receiver's tokenizer; token-aligned pairs are not "
                             "supported")
        tokens = jnp.concatenate([self.prefix_tokens, self.suffix_tokens], axis=1)
        positions = jnp.concatenate([self.prefix_positions, self.suffix_positions], axis=1)
        valid = jnp.concatenate([self.prefix_valid, self.suffix_valid], axis=1)
        fuse_mask = jnp.concatenate([self.fuse_mask, self.suffix_valid], axis=1)
        return Prefix(tokens, positions, valid, (PackedRows.pack(tokens, positions, valid),), (fuse_mask,),
                      jnp.zeros(tokens.shape, jnp.int32))

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


def prefix_layout(examples: Sequence[TrainExample]) -> dict:
    """`TrainBatch`'s static fields for a step of `examples` (upstream's sections, docs/upstream_reference.md §2.3).

    A row fuses its prefix in as many passes as it has runs of fused columns (message sections);
    columns after the last run (the chat template before the answer) run after fusion.
    """
    runs, trailing = 0, False
    for ex in examples:
        fuse = ex.fuse_mask[:ex.split]
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
        f["fuse_mask"][row, :nr] = ex.fuse_mask[:s][receiver_real]
        # Sections on the example's own columns, where a template column (even a receiver pad) parts two messages.
        f["prefix_section"][row, :nr] = fusion_sections(ex.fuse_mask[None, :s], layout["fused_sections"],
                                                        xp=np)[0, receiver_real]
        # The positions of the inference prompt (`column_positions` on the example's columns), each
        # model's taken at its real tokens; the suffix continues the receiver's.
        positions = column_positions(ex.valid[None], [0], sharer_positions)[0]
        f["prefix_positions"][row, :nr] = positions[receiver_real]
        f["sharer_prefix_positions"][row, :ns] = column_positions(ex.sharer_valid[None], [0],
                                                                  sharer_positions)[0, sharer_real]
        m = length - s
        f["suffix_tokens"][row, :m] = ex.tokens[s:]
        f["suffix_valid"][row, :m] = ex.valid[s:]
        f["suffix_positions"][row, :m] = positions[s:]
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


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training data and its batches: `config.data`, the token alignment (`config.alignment`), the
    batch sizes (`config.train`, resolved: `config.resolve_micro_batch`) and the seed; each field is
    described in `c2c_jax.config`."""

    source: str
    max_rows: int
    max_length: int | None
    eval_fraction: float
    enable_thinking: bool
    prefix_buckets: tuple[int, ...]
    suffix_buckets: tuple[int, ...]
    batch_size: int  # sequences per step, all processes and micro-batches together
    micro_batch_size: int
    seed: int
    shuffle: str = "bucketed"
    alignment: str = "auto"  # alignment.tokens
    strategy: str = "first"
    sharer_positions: SharerPositions = "shared"

    @classmethod
    def from_config(cls, config) -> "DataSettings":
        d, a, t = config.data, config.alignment, config.train
        return cls(source=d.source, max_rows=d.max_rows, max_length=d.max_length, eval_fraction=d.eval_fraction,
                   enable_thinking=d.enable_thinking, prefix_buckets=tuple(d.prefix_buckets),
                   suffix_buckets=tuple(d.suffix_buckets), batch_size=t.batch_size,
                   micro_batch_size=t.micro_batch_size, seed=config.seed, shuffle=d.get("shuffle", "bucketed"),
                   alignment=a.tokens, strategy=a.strategy, sharer_positions=a.sharer_positions)


def batch_iterator(data: DataSettings, examples: Sequence[TrainExample], *, pad_id: int, sharer_pad_id: int,
                   process_index: int = 0, process_count: int = 1, seed: int | None = None) -> BatchIterator:
    """A `BatchIterator` with `data`'s layout: batch_size sequences per step in micro-batches of
    micro_batch_size (both global), its buckets and sharer positions; seed: `data.seed` unless given."""
    if data.batch_size % data.micro_batch_size:
        raise ValueError(f"train.batch_size {data.batch_size} is not a multiple of train.micro_batch_size "
                         f"{data.micro_batch_size}")
    return BatchIterator(examples, micro_batch_size=data.micro_batch_size,
                         micro_batches=data.batch_size // data.micro_batch_size, prefix_buckets=data.prefix_buckets,
                         suffix_buckets=data.suffix_buckets, seed=data.seed if seed is None else seed, pad_id=pad_id,
                         sharer_pad_id=sharer_pad_id, sharer_positions=data.sharer_positions,
                         process_index=process_index, process_count=process_count, shuffle=data.shuffle)


def load_train_data(data: DataSettings, receiver_tokenizer, sharer_tokenizer, receiver_vocab_size: int | None,
                    sharer_vocab_size: int | None) -> tuple[list[TrainExample], list[TrainExample], dict]:
    """(train examples, eval examples, stats) of `data`.

    stats: "rows" (source rows read), "chats", "examples", "train", "eval", and "skipped/<reason>" per skip
    reason. The eval split is `data.eval_fraction` of the examples, chosen by a permutation seeded by
    `data.seed`, disjoint from train; both keep source order.
    """
    d = data
    chats, row_stats = load_chats(d.source, max_rows=d.max_rows, seed=d.seed)
    encoder = PromptEncoder(receiver_tokenizer, [] if sharer_tokenizer is None else [sharer_tokenizer],
                            alignment=d.alignment, strategy=d.strategy, sharer_positions=d.sharer_positions,
                            max_length=d.max_length, enable_thinking=d.enable_thinking,
                            receiver_vocab_size=receiver_vocab_size, sharer_vocab_size=sharer_vocab_size)
    encoded, enc_stats = encoder.encode_examples(chats)
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
                         f"({format_counts(skipped)}); check data.max_length ({d.max_length}), the buckets "
                         f"(prefix {tuple(d.prefix_buckets)}, suffix {tuple(d.suffix_buckets)}) and the chat template")
    n = len(examples)
    # At least one eval example when a fraction is asked for, and always at least one train example.
    n_eval = min(max(int(round(n * d.eval_fraction)), 1), n - 1) if d.eval_fraction > 0 else 0
    perm = np.random.default_rng(d.seed).permutation(n)
    eval_idx = set(perm[:n_eval].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    evals = [ex for i, ex in enumerate(examples) if i in eval_idx]
    stats.update(train=len(train), eval=len(evals))
    logger.debug("data %r: %s", d.source, format_counts(stats))
    return train, evals, stats
