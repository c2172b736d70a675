"""End-to-end evaluation of tiny random models on a small fixture benchmark (every method, both answer modes)."""

import csv
import itertools
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c2c_jax import build
from c2c_jax.c2c.fuser import FuserCheckpointError
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.evaluate.benchmarks import load_benchmark
from c2c_jax.evaluate.methods import Route
from c2c_jax.evaluate.report import CSV_FIELDS
from c2c_jax.evaluate.run import evaluate
from c2c_jax.evaluate.scoring import T2T_BACKGROUND_PROMPT, t2t_messages
from c2c_jax.evaluate.scoring import ANSWER_PREFIX, LETTERS, build_mc_prompt, extract_answer, mc_messages
from c2c_jax.evaluate.settings import METHOD_LABELS, parse_settings
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.fuser_io import load_fuser, save_fuser
from c2c_jax.infer.generator import Generator
from c2c_jax.models import load_model, load_tokenizer
from c2c_jax.models.tiny import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs.tiny import get_config  # noqa: E402

ROWS = [
    dict(id="q0", question="What is the capital of France?", choices=["Paris", "Rome", "Berlin", "Madrid"],
         answer="A", subject="geo"),
    dict(id="q1", question="When does water boil?", choices=["50 C", "100 C", "150 C"], answer="B", subject="phys"),
    dict(id="q2", question="Which planet is red?", choices=["Venus", "Earth", "Mars", "Jupiter"],
         answer=2, subject="astro"),
    dict(id="q3", question="What do plants need?",
         choices=["Light", "Sound", "Salt", "Sand", "Snow"], answer="A", subject="bio"),
    dict(id="q4", question="Which animal barks?", choices=["Cat", "Dog", "Fish", "Bird"], answer="B", subject="bio"),
    dict(id="q5", question="What is two plus two?", choices=["Three", "Five", "Four", "Six"], answer="C",
         subject="math"),
    dict(id="no_gold", question="Unanswerable?", choices=["Yes", "No"], answer=None, subject="x"),
    dict(id="too_long", question="Why? " * 900, choices=["Because", "Not"], answer="A", subject="x"),
]
SCORED = [r for r in ROWS if r["id"] not in ("no_gold", "too_long")]
METHODS = ("receiver", "sharer", "t2t", "c2c")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    bench_file = root / "bench.jsonl"
    bench_file.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    config = get_config()
    receiver = load_model("random:qwen3", dtype=jnp.float32)
    sharer = load_model("random:qwen2", dtype=jnp.float32)
    fuser = build.new_fuser(config, receiver, sharer)
    gates = np.zeros(fuser.projectors.gate_logit[...].shape, np.float32)
    gates[::2] = 1.0  # open both gates of every other receiver layer
    fuser.projectors.gate_logit[...] = jnp.asarray(gates)
    save_fuser(fuser, root / "fuser")
    # The same fuser shape with every gate open: a second fuser for multi-sharer C2C.
    fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])
    save_fuser(fuser, root / "fuser_open")
    # A fuser for another pair: sharer random:llama (2 KV heads of 16; qwen2 has 1). Only its config is needed.
    llama = types.SimpleNamespace(config=tiny_config("llama"))
    save_fuser(build.new_fuser(config, receiver, llama), root / "fuser_llama")
    return dict(root=root, bench=bench_file, fuser=root / "fuser", fuser_open=root / "fuser_open",
                fuser_llama=root / "fuser_llama", receiver=receiver, sharer=sharer,
                tokenizer=load_tokenizer("random:qwen3"))


def make_config(assets, **eval_fields):
    config = get_config()
    config.eval.update(dict(fuser=str(assets["fuser"]), source=str(assets["bench"]), methods=",".join(METHODS),
                            benchmarks="openbookqa", limit=0, batch_size=4, max_new_tokens=6,
                            t2t_message_tokens=12))
    config.eval.latency_items = 1
    for key, value in eval_fields.items():
        config.eval[key] = value
    return config


@pytest.fixture(scope="module")
def runs(assets):
    """One evaluation per answer mode; records every chat the encoders see."""
    chats = []
    original = PromptEncoder.encode_chat

    def spy(self, messages, **kwargs):
        chats.append([dict(m) for m in messages])
        return original(self, messages, **kwargs)

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PromptEncoder, "encode_chat", spy)
        # Generate mode runs batches of 4 (6 items: a full batch and a filled one); logits mode batch size 1,
        # which shares its compiled programs with the batch-1 latency runs (batched scoring is exercised by
        # the multi-sharer test).
        for mode, batch_size in (("generate", 4), ("logits", 1)):
            config = make_config(assets, answer_mode=mode, batch_size=batch_size)
            workdir = assets["root"] / f"run_{mode}"
            summary = evaluate(config, workdir)
            out_dir = workdir / "eval"
            with open(out_dir / "openbookqa.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            out[mode] = dict(summary=summary, dir=out_dir, rows=rows)
    out["chats"] = chats
    return out


def runs_fuser_dir(run) -> str:
    return run["summary"]["models"]["fusers"][0]


def _main_table(path: Path) -> dict[str, list[str]]:
    """results.md's first table: {first cell: cells} (the header and the alignment row left out)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:2] == ["Method", "openbookqa"] and "Speedup vs T2T" in header
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}


@pytest.mark.parametrize("mode", ["generate", "logits"])
def test_outputs_are_complete_and_consistent(runs, mode):
    run = runs[mode]
    out_dir, rows, summary = run["dir"], run["rows"], run["summary"]
    for name in ("openbookqa.csv", "summary.json", "results.md", "accuracy.png", "answers.png", "latency.png"):
        assert (out_dir / name).stat().st_size > 0, name
    assert json.loads((out_dir / "summary.json").read_text())["accuracy"] == summary["accuracy"]
    assert tuple(rows[0]) == CSV_FIELDS

    # One row per scored item and method; the unscorable and the too-long item are counted, not dropped.
    assert len(rows) == len(SCORED) * len(METHODS)
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        assert sorted(r["id"] for r in mine) == sorted(r["id"] for r in SCORED)
        for r in mine:
            assert r["correct"] == str(int(r["prediction"] == r["gold"]))
            assert int(r["prompt_tokens"]) > 0
        accuracy = np.mean([int(r["correct"]) for r in mine])
        assert summary["accuracy"]["openbookqa"][method] == pytest.approx(accuracy)
        counts = summary["counts"]["openbookqa"][method]
        assert (counts["scored"], counts["skipped"]) == (len(SCORED), 2)
        assert counts["correct"] == sum(int(r["correct"]) for r in mine)
    reasons = {s["id"]: s["reason"] for s in summary["skipped"]["openbookqa"]}
    assert reasons["no_gold"] == "no gold answer"
    assert "exceeds the context" in reasons["too_long"]
    gold = {r["id"]: r["answer"] for r in SCORED}
    assert all(r["gold"] == (LETTERS[gold[r["id"]]] if isinstance(gold[r["id"]], int) else gold[r["id"]])
               for r in rows)

    # Latency: first item of each method, batch size 1, positive (TTFT and total are separate calls, so on
    # a busy CPU with tiny models TTFT need not come out below total).
    for method in METHODS:
        lat = summary["latency"][method]
        assert lat["items"] == 1 and lat["ttft_ms"] > 0 and lat["total_ms"] > 0
        timed = [r for r in rows if r["method"] == method and r["latency_ms"]]
        assert len(timed) == 1 and float(timed[0]["latency_ms"]) > 0 and float(timed[0]["ttft_ms"]) > 0
    assert summary["speedup_vs_t2t"]["c2c"] == pytest.approx(
        summary["latency"]["t2t"]["total_ms"] / summary["latency"]["c2c"]["total_ms"])

    # results.md: a row per method and the chance row, a column per benchmark, accuracy in % [interval].
    body = _main_table(out_dir / "results.md")
    assert set(body) == {METHOD_LABELS[m] for m in METHODS} | {"Chance"}
    stats = summary["statistics"]["openbookqa"]
    for method in METHODS:
        entry = stats["methods"][method]
        assert entry["items"] == len(SCORED) and entry["accuracy"] == summary["accuracy"]["openbookqa"][method]
        assert entry["low"] <= entry["accuracy"] <= entry["high"]
        assert body[METHOD_LABELS[method]][1] == (f"{100 * entry['accuracy']:.1f} [{100 * entry['low']:.1f}, "
                                                     f"{100 * entry['high']:.1f}]")
        # The answer distribution counts every scored row once.
        mine = [r for r in rows if r["method"] == method]
        for letter, share in entry["answers"].items():
            assert share == pytest.approx(sum(r["prediction"] == ("" if letter == "none" else letter)
                                              for r in mine) / len(mine))
    chance = np.mean([1 / len(r["choices"]) for r in SCORED])
    assert stats["chance"] == pytest.approx(chance)
    assert float(body["Chance"][1]) == pytest.approx(100 * chance, abs=0.05)
    assert summary["verdict"].startswith("Verdict: ") and (out_dir / "results.md").read_text().rstrip().endswith(
        summary["verdict"])
    gates = np.asarray(load_fuser(runs_fuser_dir(run)).gates_open())
    assert summary["models"]["fuser_gates_open"] == [[int(gates.sum()), gates.size]] and 0 < gates.sum() < gates.size
    assert summary["config"]["eval"]["answer_mode"] == mode


def test_generate_mode_extracts_answers_from_the_text(runs):
    rows = runs["generate"]["rows"]
    choices = {r["id"]: len(r["choices"]) for r in SCORED}
    for r in rows:
        assert int(r["output_tokens"]) > 0
        assert r["prediction"] == (extract_answer(r["generated_text"], choices[r["id"]]) or "")
        assert r["option_logits"] == ""


def _independent_generator(assets, fuser_dirs=(), pad_to=1):
    tok = assets["tokenizer"]
    fusers = [load_fuser(d) for d in fuser_dirs]
    model = C2CModel(assets["receiver"], [assets["sharer"]] * len(fusers), fusers)
    return Generator(model, PromptEncoder(tok, [tok] * len(fusers), pad_to=pad_to))


def _option_logits(assets, generator, item_ids, fuse, log_probs=False):
    """{item id: option-letter logits after the answer prefix}, computed directly with the Generator
    (`log_probs`: log-softmax over the whole vocabulary first)."""
    tok = assets["tokenizer"]
    items = {it.id: it for it in load_benchmark("openbookqa", source=assets["bench"]).items}
    encoded = []
    for item_id in item_ids:
        messages = [{"role": "user", "content": build_mc_prompt(items[item_id])},
                    {"role": "assistant", "content": ANSWER_PREFIX}]
        encoded.append(generator.encoder.encode_chat(messages, add_generation_prompt=False,
                                                     continue_final_message=True))
        assert tok.decode(encoded[-1].tokens[-len(ANSWER_PREFIX):]) == ANSWER_PREFIX  # one byte per token
    logits = np.asarray(generator.next_token_logits(generator.encoder.batch(encoded), fuse=fuse,
                                                    suffix_length=len(ANSWER_PREFIX)))
    if log_probs:
        logits = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    # The byte-level tokenizer splits " A" into " " + "A", so the bare letters are scored.
    assert len({tok(" " + L, add_special_tokens=False)["input_ids"][0] for L in "ABCD"}) == 1
    out = {}
    for row, item_id in enumerate(item_ids):
        ids = [tok(L, add_special_tokens=False)["input_ids"][0] for L in LETTERS[: len(items[item_id].choices)]]
        out[item_id] = logits[row, ids]
    return out


def test_logits_predictions_are_the_argmax_over_option_letters(runs, assets):
    rows = runs["logits"]["rows"]
    choices = {r["id"]: len(r["choices"]) for r in SCORED}
    for r in rows:
        scores = json.loads(r["option_logits"])
        assert len(scores) == choices[r["id"]]
        assert r["prediction"] == LETTERS[int(np.argmax(scores))]
        assert r["generated_text"] == "" and r["output_tokens"] == "0"
    # Recompute independently (other batch, no bucket padding) with the Generator.
    generator = _independent_generator(assets, [assets["fuser"]])
    for method, fuse in (("c2c", True), ("receiver", False)):
        expected = _option_logits(assets, generator, ["q1", "q3"], fuse)  # 3 and 5 options
        for item_id, logits in expected.items():
            row = next(r for r in rows if r["method"] == method and r["id"] == item_id)
            np.testing.assert_allclose(json.loads(row["option_logits"]), logits, atol=2e-4)
            assert row["prediction"] == LETTERS[int(np.argmax(logits))]
    # The gold letter's log-probability over the whole vocabulary.
    gold = {r["id"]: (LETTERS[r["answer"]] if isinstance(r["answer"], int) else r["answer"]) for r in SCORED}
    for item_id, logprobs in _option_logits(assets, generator, ["q1", "q3"], True, log_probs=True).items():
        row = next(r for r in rows if r["method"] == "c2c" and r["id"] == item_id)
        assert float(row["gold_logprob"]) == pytest.approx(logprobs[LETTERS.index(gold[item_id])], abs=1e-3)
    # The fuser really acts: C2C's option logits differ from the receiver's.
    by = {(r["method"], r["id"]): json.loads(r["option_logits"]) for r in rows}
    assert max(np.abs(np.subtract(by[("c2c", i)], by[("receiver", i)])).max() for i in choices) > 1e-3


def test_prompt_buckets_set_the_batch_width_and_leave_the_logits_as_they_were(assets):
    generator = _independent_generator(assets, [assets["fuser"]], pad_to=8)
    with pytest.raises(ValueError, match=r"eval.prompt_buckets \(100, 64\): every bucket must be a positive "
                                         r"multiple of 8"):
        Route("c2c", generator, fuse=True, context=4096, prompt_buckets=(100, 64))
    route = Route("c2c", generator, fuse=True, context=4096, prompt_buckets=(1024, 512))
    items = {it.id: it for it in load_benchmark("openbookqa", source=assets["bench"]).items}
    prompts = [route.encode(mc_messages(items[i]), "logits") for i in ("q1", "q3")]
    longest = max(p.width for p in prompts)
    assert 0 < longest <= 496  # one byte a token
    batch = route.batch(prompts, 0)
    assert batch.tokens.shape[1] == 512  # the smallest bucket that holds the longest prompt
    assert route.batch(prompts, 3600).tokens.shape[1] == 496  # never past the context
    padded = generator.encoder.batch([p.encoded for p in prompts])  # a multiple of pad_to only
    assert padded.tokens.shape[1] < 512
    suffix = prompts[0].suffix
    np.testing.assert_allclose(generator.next_token_logits(batch, suffix_length=suffix),
                               generator.next_token_logits(padded, suffix_length=suffix), atol=2e-5)
    # Past the largest bucket: a multiple of pad_to.
    wide = Route("c2c", generator, fuse=True, context=4096, prompt_buckets=(16,))
    assert wide.batch(prompts, 0).tokens.shape[1] == -(-longest // 8) * 8


def test_t2t_feeds_the_sharers_text_to_the_receiver(runs, assets):
    rows = [r for r in runs["generate"]["rows"] if r["method"] == "t2t"]
    items = {it.id: it for it in load_benchmark("openbookqa", source=assets["bench"]).items}
    stage2 = [c for c in runs["chats"] if len(c) == 3]
    receiver_rows = {r["id"]: r for r in runs["generate"]["rows"] if r["method"] == "receiver"}
    # Stage 1, recomputed independently: the sharer alone, greedy, on the background prompt (no options).
    backgrounds = [T2T_BACKGROUND_PROMPT.format(question=items[r["id"]].question) for r in rows]
    assert not any("Choices:" in b for b in backgrounds)
    sharer = Generator(C2CModel(assets["sharer"]), PromptEncoder(load_tokenizer("random:qwen2")))
    expected = sharer.chat([[{"role": "user", "content": b}] for b in backgrounds], SamplingConfig(max_new_tokens=12))
    for r, background, message in zip(rows, backgrounds, expected):
        assert r["message"] == message and message
        # The receiver's stage-2 chat carries the sharer's text, then the full MC prompt.
        assert [{"role": "user", "content": background}, {"role": "assistant", "content": message},
                {"role": "user", "content": build_mc_prompt(items[r["id"]])}] in stage2
        assert int(r["prompt_tokens"]) > int(receiver_rows[r["id"]]["prompt_tokens"]) + len(message)
    # And the receiver answered that three-turn chat: regenerating from it gives the same text.
    receiver = Generator(C2CModel(assets["receiver"]), PromptEncoder(assets["tokenizer"]))
    chats = [t2t_messages(items[r["id"]], r["message"]) for r in rows[:2]]
    assert receiver.chat(chats, SamplingConfig(max_new_tokens=6)) == [r["generated_text"] for r in rows[:2]]


def test_multi_sharer_c2c_matches_sequential_fusion(assets, tmp_path):
    config = make_config(assets, methods="c2c", answer_mode="logits", limit=3, batch_size=2,
                         fuser=f"{assets['fuser']},{assets['fuser_open']}", sharers="random:qwen2,random:qwen2")
    config.eval.latency_items = 0
    summary = evaluate(config, tmp_path)
    assert summary["models"]["fusers"] == [str(assets["fuser"]), str(assets["fuser_open"])]
    assert summary["latency"]["c2c"]["items"] == 0 and summary["counts"]["openbookqa"]["c2c"]["scored"] == 3
    assert not (tmp_path / "eval" / "latency.png").exists()  # nothing timed, no empty plot
    with open(tmp_path / "eval" / "openbookqa.csv", newline="") as f:
        rows = {r["id"]: json.loads(r["option_logits"]) for r in csv.DictReader(f)}
    generator = _independent_generator(assets, [assets["fuser"], assets["fuser_open"]], pad_to=64)
    expected = _option_logits(assets, generator, ["q1", "q2"], True)
    single = _option_logits(assets, _independent_generator(assets, [assets["fuser"]], pad_to=64), ["q1"], True)
    for item_id, logits in expected.items():
        np.testing.assert_allclose(rows[item_id], logits, atol=2e-4)
    assert np.abs(expected["q1"] - single["q1"]).max() > 1e-3  # the second fuser does something


# ------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was validated")

    monkeypatch.setattr(build, "load_frozen", refuse)


@pytest.mark.parametrize("field, value, message", [
    ("methods", "receiver,oracle", r"unknown method\(s\) oracle.*valid: receiver, sharer, t2t, c2c"),
    ("answer_mode", "cot", r"unknown eval.answer_mode 'cot'; valid: generate, logits"),
    ("fuser", "", r"method 'c2c' needs a trained fuser"),
    ("sharers", "random:qwen2,random:qwen2", r"2 sharer model\(s\) for 1 fuser"),
    ("prompt_buckets", "256,long", r"eval.prompt_buckets must be token counts, e.g. 256,512; got '256,long'"),
])
def test_bad_configuration_fails_before_loading_models(assets, tmp_path, no_model_loading, field, value, message):
    with pytest.raises(ValueError, match=message):
        evaluate(make_config(assets, **{field: value}), tmp_path)


def test_unknown_offline_benchmark_fails_before_loading_models(assets, tmp_path, no_model_loading):
    # With a local file any name goes (a multiple-choice set of one's own); offline names must be known.
    with pytest.raises(ValueError, match=r"unknown benchmark\(s\) mmlu-pro.*valid: openbookqa, arc-challenge"):
        evaluate(make_config(assets, benchmarks="openbookqa,mmlu-pro", source="offline"), tmp_path)


def test_no_output_directory(assets):
    with pytest.raises(ValueError, match="no output directory"):
        evaluate(make_config(assets), None)


def test_fuser_for_another_pair(assets, tmp_path):
    with pytest.raises(FuserCheckpointError, match="belongs to another model pair"):
        evaluate(make_config(assets, fuser=str(assets["fuser_llama"])), tmp_path)


def test_missing_fuser_directory(assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="fuser directory .*nowhere does not exist"):
        evaluate(make_config(assets, fuser=str(tmp_path / "nowhere")), tmp_path)


def test_benchmark_file_with_missing_fields(assets, tmp_path, no_model_loading):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(question="Q?", choices=["a", "b"], answer="A")) + "\n"
                   + json.dumps(dict(question="Q?", answer="A")) + "\n")
    with pytest.raises(ValueError, match=r"row 1 \(0-based\) has no field 'choices'"):
        evaluate(make_config(assets, source=str(bad)), tmp_path)


def test_text_to_text_budget_defaults_to_upstreams_per_answer_mode(tmp_path):
    """Upstream gives the sharer's message 1024 new tokens in generate mode and 64 in logits mode."""
    from c2c_jax.config import default_config

    def settings(**overrides):
        config = default_config()
        config.eval.update(fuser="f", **overrides)
        return parse_settings(config, tmp_path)

    assert settings(answer_mode="generate").t2t_message_tokens == 1024
    assert settings(answer_mode="logits").t2t_message_tokens == 64
    assert settings(answer_mode="logits", t2t_message_tokens=300).t2t_message_tokens == 300
    with pytest.raises(ValueError, match="eval.t2t_message_tokens must be >= 1"):
        settings(t2t_message_tokens=-2)
