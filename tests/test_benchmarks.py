"""Prompt, answer extraction and local-file loading of c2c_jax.benchmarks (no downloads, no hub)."""

import csv
import json

import pytest

from c2c_jax.evaluate import benchmarks as B, scoring
from c2c_jax.evaluate.benchmarks import MCItem


# ---------------------------------------------------------------------------------------------
# Answer extraction: realistic outputs -> the letter the reference evaluator would extract.
# ---------------------------------------------------------------------------------------------

EXTRACTION_CASES = [
    # letter alone
    ("C", "C"),
    (" C", "C"),
    ("D.", "D"),
    ("B\n", "B"),
    ("c", "C"),
    ("(d)", "D"),
    ("B) 42", "B"),
    ("b) Paris", "B"),
    # "answer" phrases
    ("The answer is (C)", "C"),
    ("The correct answer is D", "D"),
    ("The correct answer is: B.", "B"),
    ("THE CORRECT ANSWER IS (A)", "A"),
    ("the answer is d", "D"),  # no uppercase letter after the phrase -> standalone-letter stage
    ("Answer: B", "B"),
    ("answer: b", "B"),
    ("Option: A", "A"),
    ("Choice: C", "C"),
    ("The correct answer is C. Photosynthesis converts light energy.", "C"),
    ("The correct answer is B, not A.", "B"),
    ("Let me think.\nThe answer is C.\nActually, it could be D.", "C"),  # first phrase wins
    ("The answer is Because of gravity", "B"),  # reference quirk: first uppercase A-D after the phrase
    ("The correct answer is", None),  # the model only echoed the prefix
    # letter followed by the option text / an explanation
    ("C. Paris", "C"),
    ("C\n\nExplanation: plants need light.", "C"),
    # option text only
    ("Paris", None),
    ("Paris is the capital of France.", None),
    ("Berlin", "B"),  # reference quirk: last uppercase A-D anywhere (the B of Berlin)
    ("Capital of France", "C"),
    # refusals
    ("I'm sorry, but I cannot answer that question.", None),
    ("I don't know.", None),
    ("None of the above.", None),
    ("As an AI, I cannot answer.", "A"),  # no standalone letter; last uppercase A-D anywhere: "AI"
    ("I cannot determine the answer from a single reading.", "A"),  # lowercase article "a"
    # several letters
    ("A or C", "C"),
    ("Both A and B are correct", "B"),
    # lowercase article "a"
    ("It is a good choice", "A"),
    ("I think it's a", "A"),
    ("a", "A"),
    # math text (guard: math symbols and no answer word)
    ("2x + 3 = 7, so x = 2", None),
    ("Let a = 3 and b = 4, then c = 5", None),
    ("1/2 + 1/3 = 5/6", None),
    ("The area is 4 * 5 = 20, which matches D", None),
    ("sin(x) + cos(x) b", None),
    ("**C**", None),  # markdown bold: "*" counts as a math symbol in the reference
    ("x = 4, so the answer is B", "B"),  # an answer phrase overrides the guard
    # empty
    ("", None),
    ("   ", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_answer_table(text, expected):
    assert scoring.extract_answer(text) == expected


def test_extract_answer_num_choices():
    assert scoring.extract_answer("E", num_choices=5) == "E"
    assert scoring.extract_answer("The correct answer is E", num_choices=5) == "E"
    assert scoring.extract_answer("E", num_choices=4) is None
    assert scoring.extract_answer("The correct answer is E", num_choices=4) is None
    assert scoring.extract_answer("C", num_choices=2) is None
    assert scoring.extract_answer("The answer is (J)", num_choices=10) == "J"
    assert scoring.extract_answer("j", num_choices=10) == "J"
    assert scoring.extract_answer(None) is None
    with pytest.raises(ValueError):
        scoring.extract_answer("A", num_choices=0)
    with pytest.raises(ValueError):
        scoring.extract_answer("A", num_choices=27)


# ---------------------------------------------------------------------------------------------
# Prompt.
# ---------------------------------------------------------------------------------------------

ITEM = MCItem(
    id="q1",
    question="Which gas do plants absorb from the air?",
    choices=("Oxygen", "Carbon dioxide", "Nitrogen", "Helium"),
    answer="B",
)

EXPECTED_PROMPT = """Accurately answer the following question:

Which gas do plants absorb from the air?

Choices:
A. Oxygen
B. Carbon dioxide
C. Nitrogen
D. Helium


Instructions:
- Carefully read the question and all options.
- Select the single most correct answer.
- Respond ONLY in the following format: "The correct answer is A/B/C/D".
- Do not include any explanations, additional text, or punctuation besides the answer.

The correct answer is"""

EXPECTED_COT_PROMPT = (
    "Accurately answer the following question:\n"
    "                   \n"  # 19 spaces, as in the reference source
    "Which gas do plants absorb from the air?\n"
    "\n"
    "Choices:\n"
    "A. Oxygen\n"
    "B. Carbon dioxide\n"
    "C. Nitrogen\n"
    "D. Helium\n"
    "\n"
    "\n"
    "Instructions:\n"
    "- Carefully read the question and all options.\n"
    "- Let's think step by step and explain your reasoning briefly.\n"
    "- Then give the final answer starting with The correct answer is"
)


def test_prompt_exact():
    prompt = scoring.build_mc_prompt(ITEM)
    assert prompt == EXPECTED_PROMPT
    assert prompt.endswith(scoring.ANSWER_PREFIX)
    assert scoring.ANSWER_PREFIX == "The correct answer is"


def test_prompt_cot_exact():
    assert scoring.build_mc_prompt(ITEM, use_cot=True) == EXPECTED_COT_PROMPT
    assert len(EXPECTED_COT_PROMPT.split("\n")[1]) == 19


def test_prompt_without_template():
    expected = "Which gas do plants absorb from the air?\n\nChoices:\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nD. Helium\n"
    assert scoring.build_mc_prompt(ITEM, use_template=False) == expected
    assert scoring.build_mc_prompt(ITEM, use_template=False, use_cot=True) == expected


def test_prompt_five_options_and_braces():
    item = MCItem("q", "Pick {{choices}}", ("a", "b", "c", "d", "e"), "E")
    prompt = scoring.build_mc_prompt(item)
    assert "\nPick {{choices}}\n" in prompt
    assert "D. d\nE. e\n\n\nInstructions:" in prompt


# ---------------------------------------------------------------------------------------------
# Local files.
# ---------------------------------------------------------------------------------------------


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl(tmp_path):
    rows = [
        {"id": "a1", "question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": "B", "subject": "math"},
        {"question": "Sky colour?", "choices": ["red", "blue", "green"], "answer": 1},
        {"id": "a3", "question": "Bad letter", "choices": ["x", "y", "z", "w"], "answer": "E"},
        {"id": "a4", "question": "No gold", "choices": ["x", "y"], "answer": None},
        {"id": "a5", "question": "Index too big", "choices": ["x", "y"], "answer": 2},
        {"id": "a6", "question": "lowercase letter", "choices": ["x", "y", "z"], "answer": "c"},
    ]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    bench = B.load_benchmark("mmlu", source=str(path))
    assert bench.name == "mmlu"
    assert [it.id for it in bench.items] == ["a1", "mine/1", "a6"]
    assert bench.items[0] == MCItem("a1", "1+1?", ("1", "2", "3", "4"), "B", "math")
    assert bench.items[1].answer == "B" and bench.items[1].choices == ("red", "blue", "green")
    assert bench.items[2].answer == "C"
    assert [s[0] for s in bench.skipped] == ["a3", "a4", "a5"]
    assert "E" in bench.skipped[0][1]
    assert "no gold answer" in bench.skipped[1][1]
    assert "out of range" in bench.skipped[2][1]
    assert len(bench) == 3


def test_local_csv_letter_columns(tmp_path):
    path = tmp_path / "ceval_like.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D", "answer", "subject"])
        w.writeheader()
        w.writerow({"id": "c1", "question": "Q1", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "D", "subject": "law"})
        w.writerow({"id": "c2", "question": "Q2", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "0", "subject": "law"})
        w.writerow({"id": "c3", "question": "Q3", "A": "a", "B": "b", "C": "c", "D": "", "answer": "D", "subject": "logic"})
        w.writerow({"id": "c4", "question": "Q4", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "", "subject": "logic"})
    bench = B.load_benchmark("ceval", source=path)
    assert [(it.id, it.answer, len(it.choices)) for it in bench.items] == [("c1", "D", 4), ("c2", "A", 4)]
    assert [s[0] for s in bench.skipped] == ["c3", "c4"]  # blank D column -> 3 options -> "D" invalid
    law = B.load_benchmark("ceval", source=path, subjects=["law"])
    assert [it.id for it in law.items] == ["c1", "c2"] and law.skipped == ()


def test_local_parquet_and_json(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "question": ["p1", "p2", "p3"],
        "choices": [["w", "x", "y", "z"], ["w", "x", "y", "z"], ["w", "x", "y", "z"]],
        "answer": [3, 0, 7],
        "subject": ["astronomy", "anatomy", "anatomy"],
    })
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    bench = B.load_benchmark("mmlu-redux", source=path)
    assert [it.answer for it in bench.items] == ["D", "A"]
    assert bench.items[0].subject == "astronomy"
    assert bench.skipped == (("m/2", "answer index 7 is out of range for 4 options"),)
    assert [it.question for it in B.load_benchmark("mmlu", source=path, limit=1).items] == ["p1"]

    # HF ARC-style rows (choices.text/label, answerKey) in a JSON list; numeric keys map through the labels.
    jpath = tmp_path / "arc.json"
    jpath.write_text(json.dumps([
        {"id": "arc1", "question": "q", "choices": {"text": ["t1", "t2", "t3"], "label": ["1", "2", "3"]}, "answerKey": "3"},
        {"id": "arc2", "question": "q", "choices": {"text": ["t1", "t2", "t3", "t4", "t5"], "label": list("ABCDE")}, "answerKey": "E"},
    ]))
    arc = B.load_benchmark("arc-challenge", source=jpath)
    assert [(it.id, it.answer) for it in arc.items] == [("arc1", "C"), ("arc2", "E")]


def test_local_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "broken.jsonl", [
        {"question": "ok", "choices": ["a", "b"], "answer": "A"},
        {"question": "no answer field", "choices": ["a", "b"]},
    ])
    with pytest.raises(ValueError) as exc:
        B.load_benchmark("openbookqa", source=path)
    msg = str(exc.value)
    assert "broken.jsonl" in msg and "row 1" in msg and "'answer'" in msg

    path2 = _write_jsonl(tmp_path / "nochoices.jsonl", [{"question": "q", "answer": "A"}])
    with pytest.raises(ValueError, match=r"nochoices\.jsonl.*row 0.*'choices'"):
        B.load_benchmark("openbookqa", source=path2)

    path3 = _write_jsonl(tmp_path / "noquestion.jsonl", [{"choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError, match=r"noquestion\.jsonl.*row 0.*'question'"):
        B.load_benchmark("openbookqa", source=path3)


def test_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        B.load_benchmark("mmlu", source=tmp_path / "nope.jsonl")
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        B.load_benchmark("mmlu", source=bad)
    ok = _write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ValueError, match="split"):
        B.load_benchmark("mmlu", source=ok, split="test")


def test_unknown_benchmark():
    with pytest.raises(ValueError) as exc:
        B.load_benchmark("gsm8k")
    for name in B.BENCHMARKS:
        assert name in str(exc.value)


def test_any_name_for_a_local_multiple_choice_file(tmp_path):
    rows = [{"question": "Pick the even number", "choices": ["3", "4", "5"], "answer": "B"}]
    bench = B.load_benchmark("my-set", source=_write_jsonl(tmp_path / "mine.jsonl", rows))
    assert bench.name == "my-set" and bench.items[0].answer == "B" and bench.items[0].choices == ("3", "4", "5")
    with pytest.raises(ValueError, match="unknown benchmark 'bad name!'"):
        B.load_benchmark("bad name!", source=tmp_path / "mine.jsonl")


def test_benchmarks_without_a_hub_source_say_so():
    with pytest.raises(ValueError, match="sciq is not read from the hub"):
        B.load_benchmark("sciq", source="hub")


def test_ceval_offline_is_a_clear_error():
    with pytest.raises(ValueError, match="not available offline.*hub.*jsonl"):
        B.load_benchmark("ceval")


def test_unknown_subject():
    with pytest.raises(ValueError, match="unknown mmlu subject"):
        B.load_benchmark("mmlu", subjects=["astrology"])


def test_hub_failure_names_alternatives(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(RuntimeError) as exc:
        B.load_benchmark("arc-challenge", source="hub")
    msg = str(exc.value)
    assert "allenai/ai2_arc" in msg and "source='offline'" in msg and ".jsonl" in msg


def test_hub_mmlu_redux_rules(monkeypatch):
    """The reference's error_type rules, on fake hub rows (no network)."""
    datasets = pytest.importorskip("datasets")
    rows = [
        {"question": "ok", "choices": list("wxyz"), "answer": 1, "error_type": "ok", "correct_answer": None},
        {"question": "nca", "choices": list("wxyz"), "answer": 1, "error_type": "no_correct_answer", "correct_answer": None},
        {"question": "exp", "choices": list("wxyz"), "answer": 1, "error_type": "expert", "correct_answer": None},
        {"question": "wg digit", "choices": list("wxyz"), "answer": 1, "error_type": "wrong_groundtruth", "correct_answer": "3"},
        {"question": "wg letter", "choices": list("wxyz"), "answer": 1, "error_type": "wrong_groundtruth", "correct_answer": "C"},
        {"question": "wg none", "choices": list("wxyz"), "answer": 2, "error_type": "wrong_groundtruth", "correct_answer": None},
    ]
    calls = []

    def fake(path, config, split):
        calls.append((path, config, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake)
    bench = B.load_benchmark("mmlu-redux", source="hub", subjects=["virology"])
    assert calls == [("edinburgh-dawg/mmlu-redux-2.0", "virology", "test")]
    assert [(it.question, it.answer) for it in bench.items] == [("ok", "B"), ("wg digit", "D"), ("wg letter", "C"), ("wg none", "C")]
    assert [s[1] for s in bench.skipped] == ["mmlu-redux error_type 'no_correct_answer'", "mmlu-redux error_type 'expert'"]

    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset", lambda p, c, split: (calls.append((p, c, split)) or [
        {"id": 0, "question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "B"}]))
    bench = B.load_benchmark("ceval", source="hub", subjects=["logic"])
    assert calls == [("ceval/ceval-exam", "logic", "val")]
    assert bench.items[0].answer == "B" and bench.items[0].subject == "logic"


def test_training_never_uses_test_split():
    with pytest.raises(ValueError, match="never use test"):
        B.mc_training_chats(split="test")
    with pytest.raises(ValueError, match="unknown training task"):
        B.mc_training_chats(tasks=("mmlu",))
