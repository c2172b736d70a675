"""Multiple-choice items and benchmarks: the names, the item types and the conversion of a source's
rows into items (shared by every loader)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Sequence

from c2c_jax import offline
from c2c_jax.evaluate.scoring import LETTERS

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
