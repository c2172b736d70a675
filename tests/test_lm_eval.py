"""c2c-jax as an lm-evaluation-harness model: each request type against a direct computation, and a task
defined on local files run end to end through the harness, offline, with tiny random models."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from c2c_jax import build  # noqa: E402
from c2c_jax.c2c.model import C2CModel  # noqa: E402
from c2c_jax.c2c.prompt import PromptEncoder  # noqa: E402
from c2c_jax.evaluate.lm_eval_adapter import C2CHarnessModel  # noqa: E402
from c2c_jax.infer.decode import SamplingConfig  # noqa: E402
from c2c_jax.infer.generator import Generator  # noqa: E402
from c2c_jax.models import load_model, load_tokenizer  # noqa: E402
from configs import tiny  # noqa: E402


@pytest.fixture(scope="module")
def models():
    receiver = load_model("random:qwen3", dtype=jnp.float32)
    sharer = load_model("random:qwen2", dtype=jnp.float32)
    fuser = build.new_fuser(tiny.get_config(), receiver, sharer)
    fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])  # every gate open
    tok = load_tokenizer("random:qwen3")
    fused = Generator(C2CModel(receiver, [sharer], [fuser]), PromptEncoder(tok, [load_tokenizer("random:qwen2")]))
    alone = Generator(C2CModel(receiver), PromptEncoder(tok))
    return dict(receiver=receiver, tok=tok, c2c=C2CHarnessModel(route="c2c", generator=fused, batch_size=4),
                alone=C2CHarnessModel(route="receiver", generator=alone, batch_size=4), fused_generator=fused)


def _requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _full_sequence_logprob(receiver, ids, start):
    """sum of log p(ids[t] | ids[:t]) for t >= start, from one plain forward pass over the whole sequence."""
    tokens = jnp.asarray([ids], jnp.int32)
    cache = receiver.init_cache(1, len(ids))
    logits, _ = receiver(tokens, jnp.arange(len(ids))[None], cache, output="logits")
    logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    return float(sum(logprobs[t - 1, ids[t]] for t in range(start, len(ids))))


# Continuations of one length (byte-level tokenizer: one token per byte), so one program serves them all;
# "Water boils at " moves its trailing space into the continuation.
PAIRS = [("Question: What is red?\nAnswer:", " Mars"), ("The sky is", " blue"), ("2 + 2 =", " four"),
         ("Water boils at ", "100C")]


def test_receiver_loglikelihood_is_the_plain_forward_pass(models):
    m = models["alone"]
    got = m.loglikelihood(_requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        context_ids, continuation_ids = m._split(context, continuation)
        assert context_ids + continuation_ids == m._encode(context + continuation)  # byte-level: a clean split
        expected = _full_sequence_logprob(models["receiver"], context_ids + continuation_ids, len(context_ids))
        assert logprob == pytest.approx(expected, abs=2e-4)
        assert isinstance(greedy, bool)


def test_c2c_loglikelihood_of_one_token_is_the_fused_next_token_distribution(models):
    m, generator = models["c2c"], models["fused_generator"]
    pairs = [("Which planet is red?", "M"), ("Say yes:", "y")]
    got = m.loglikelihood(_requests("loglikelihood", pairs))
    for (context, continuation), (logprob, _) in zip(pairs, got):
        ids = m._encode(context)
        batch = generator.encoder.batch([generator.encoder.encode_ids(np.asarray(ids, np.int32))])
        logits = generator.next_token_logits(batch, fuse=True)
        expected = float(jax.nn.log_softmax(logits[0])[m._encode(continuation)[0]])
        assert logprob == pytest.approx(expected, abs=2e-4)
    # The fuser acts: longer continuations score differently on the fused route.
    alone = models["alone"].loglikelihood(_requests("loglikelihood", PAIRS))
    fused = m.loglikelihood(_requests("loglikelihood", PAIRS))
    assert max(abs(a[0] - f[0]) for a, f in zip(alone, fused)) > 1e-3


def test_rolling_loglikelihood_scores_every_token_after_the_prefix_token(models):
    m = models["alone"]
    text = "A short text to score, token by token."
    (got,) = m.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    ids = [m._prefix_token] + m._encode(text)
    assert got == pytest.approx(_full_sequence_logprob(models["receiver"], ids, 1), abs=5e-4)


def test_generate_until_cuts_at_the_stop_string(models):
    m, generator = models["c2c"], models["fused_generator"]
    context = "Tell me something:"
    (full,) = m.generate_until(_requests("generate_until", [(context, {"until": [], "max_gen_toks": 12})]))
    batch = generator.encoder.batch([generator.encoder.encode_ids(np.asarray(m._encode(context), np.int32))])
    generation = jax.device_get(generator.generate_batch(batch, SamplingConfig(max_new_tokens=12), fuse=True))
    assert full == m.tokenizer.decode(generation.tokens[0, : generation.lengths[0]], skip_special_tokens=True)
    assert full
    stop = full[len(full) // 2: len(full) // 2 + 1]
    (cut,) = m.generate_until(_requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 12})]))
    assert cut == full[: full.index(stop)]


def test_a_local_task_runs_end_to_end_through_the_harness(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "items.jsonl"
    rows = [dict(question="Which planet is red?", choices=["Vega", "Mars", "Moon"], answer=1),  # one length:
            dict(question="What do bees make?", choices=["Wax!", "Milk"], answer=0),  # one program
            dict(question="How many legs has a cat?", choices=["Zero", "Four", "Nine"], answer=1)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "local_mc.yaml").write_text(textwrap.dedent(f"""\
        task: c2c_local_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
        """))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for name in ("alone", "c2c"):
        m = models[name]
        result = simple_evaluate(model=m, tasks=["c2c_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                 log_samples=True)
        samples = result["samples"]["c2c_local_mc"]
        assert len(samples) == len(rows)
        for sample in samples:
            doc = sample["doc"]
            expected = m.loglikelihood(_requests("loglikelihood", [
                (f"Question: {doc['question']}\nAnswer:", " " + choice) for choice in doc["choices"]]))
            got = [float(r[0][0]) for r in sample["resps"]]
            np.testing.assert_allclose(got, [e[0] for e in expected], atol=1e-5)
            assert sample["acc"] == float(int(np.argmax(got)) == doc["answer"])
        acc = result["results"]["c2c_local_mc"]["acc,none"]
        assert acc == pytest.approx(np.mean([s["acc"] for s in samples]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown route 'fused'"):
        C2CHarnessModel(config="configs/demo.py", route="fused")
    with pytest.raises(ValueError, match="route=c2c needs fuser="):
        C2CHarnessModel(config="configs/demo.py", route="c2c")
    with pytest.raises(FileNotFoundError, match="no such file"):
        C2CHarnessModel(config="configs/nowhere.py", route="receiver")
