"""Fusion controls: the sharer-cache substitution, the controls in evaluation, the trained control."""

import csv
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from c2c_jax import build, sharding
from c2c_jax.c2c.controls import CONTROL_METHODS, FusionControl, substitute_sharer_cache
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.evaluate.benchmarks import load_benchmark
from c2c_jax.evaluate.methods import Route
from c2c_jax.evaluate.run import evaluate
from c2c_jax.evaluate.scoring import mc_messages
from c2c_jax.evaluate.scoring import ANSWER_PREFIX, LETTERS, build_mc_prompt
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.fuser_io import load_fuser, save_fuser
from c2c_jax.infer.generator import Generator
from c2c_jax.models import KVCache, load_model, load_tokenizer
from c2c_jax.train import loop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import tiny  # noqa: E402


def _cache(seed=0, layers=2, batch=3, columns=40, heads=2, dim=16):
    """A cache whose (layer, row, head) blocks have distinct means and scales; row r's first r*5 columns padding."""
    rng = np.random.default_rng(seed)
    shape = (layers, batch, columns, heads, dim)
    mean = rng.normal(0, 3, (layers, batch, 1, heads, 1))
    scale = rng.uniform(0.5, 4, (layers, batch, 1, heads, 1))
    valid = np.arange(columns)[None] >= 5 * np.arange(batch)[:, None]
    k = (mean + scale * rng.normal(size=shape)).astype(np.float32)
    v = (-mean + 2 * scale * rng.normal(size=shape)).astype(np.float32)
    return KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid), jnp.asarray(columns, jnp.int32))


def _block_moments(x, valid):
    """numpy mean and variance per (layer, row, head) over valid columns and head_dim (the reference)."""
    x = np.asarray(x, np.float64)
    out_mean, out_var = np.zeros(x.shape[:2] + (x.shape[3],)), np.zeros(x.shape[:2] + (x.shape[3],))
    for layer in range(x.shape[0]):
        for row in range(x.shape[1]):
            for head in range(x.shape[3]):
                block = x[layer, row, np.asarray(valid[row]), head, :]
                out_mean[layer, row, head], out_var[layer, row, head] = block.mean(), block.var()
    return out_mean, out_var


def test_zeros_and_real():
    cache = _cache()
    assert substitute_sharer_cache(cache, "real") is cache
    zero = substitute_sharer_cache(cache, "zeros")
    assert not np.any(np.asarray(zero.k)) and not np.any(np.asarray(zero.v))
    np.testing.assert_array_equal(zero.valid, cache.valid)


def test_noise_matches_each_blocks_moments_and_carries_no_content():
    cache = _cache(columns=400, dim=64)
    noise = substitute_sharer_cache(cache, "noise", key=jax.random.key(1))
    for real, fake in ((cache.k, noise.k), (cache.v, noise.v)):
        want_mean, want_var = _block_moments(real, cache.valid)
        got_mean, got_var = _block_moments(fake, cache.valid)
        # 400 x 64 draws per block, minus padding: sampling error well under these tolerances.
        np.testing.assert_allclose(got_mean, want_mean, atol=0.03 * np.sqrt(want_var).max())
        np.testing.assert_allclose(got_var, want_var, rtol=0.05)
        assert not np.any(np.asarray(fake)[:, ~np.asarray(cache.valid)])  # padding columns stay empty
        assert abs(np.corrcoef(np.asarray(real).ravel(), np.asarray(fake).ravel())[0, 1]) < 0.5  # not a copy
    # The content does not matter: the real columns of each row reversed (same moments) give the same noise.
    valid = np.asarray(cache.valid)
    k, v = np.array(cache.k), np.array(cache.v)
    for row in range(valid.shape[0]):
        columns = np.flatnonzero(valid[row])
        k[:, row, columns] = k[:, row, columns[::-1]]
        v[:, row, columns] = v[:, row, columns[::-1]]
    shuffled = dataclasses.replace(cache, k=jnp.asarray(k), v=jnp.asarray(v))
    again = substitute_sharer_cache(shuffled, "noise", key=jax.random.key(1))
    np.testing.assert_allclose(again.k, noise.k, atol=1e-4)
    np.testing.assert_allclose(again.v, noise.v, atol=1e-4)
    other_key = substitute_sharer_cache(cache, "noise", key=jax.random.key(2))
    assert np.abs(np.asarray(other_key.k) - np.asarray(noise.k)).max() > 1.0


def test_mismatched_reads_the_donor_row_and_zeros_where_it_has_no_token():
    cache = _cache()
    donors = jnp.asarray([2, 0, 1], jnp.int32)
    out = substitute_sharer_cache(cache, "mismatched", donor_rows=donors)
    k, valid = np.asarray(cache.k), np.asarray(cache.valid)
    for row, donor in enumerate([2, 0, 1]):
        np.testing.assert_array_equal(np.asarray(out.k)[:, row, valid[donor]], k[:, donor, valid[donor]])
        assert not np.any(np.asarray(out.k)[:, row, ~valid[donor]])
        np.testing.assert_array_equal(np.asarray(out.valid)[row], valid[donor])


def test_bad_control_inputs_are_named():
    with pytest.raises(ValueError, match="unknown sharer input 'shuffled'"):
        FusionControl("shuffled")
    with pytest.raises(ValueError, match="'noise' needs a PRNG key"):
        substitute_sharer_cache(_cache(), "noise")
    with pytest.raises(ValueError, match="needs donor_rows"):
        substitute_sharer_cache(_cache(), "mismatched")
    with pytest.raises(ValueError, match="unknown sharer input 'mismatched'; choose one of real, zeros, noise"):
        tiny_config = tiny.get_config()
        tiny_config.fuser.sharer_input = "mismatched"
        build.fuser_config(tiny_config, load_model("random:qwen3"), load_model("random:qwen2"))


def test_donors_form_a_derangement_within_batches_of_neighbouring_lengths():
    widths = [30, 10, 50, 20, 40, 60, 70]

    @dataclasses.dataclass(frozen=True)
    class Stub:  # what _chunks reads of a Prompt
        width: int
        suffix: int = 1

    prompts = [Stub(w) for w in widths]
    chunks = Route._chunks(prompts, 3, min_rows=2)
    assert [len(c) for c in chunks] == [3, 2, 2] and all(len(c) > 1 for c in chunks)
    assert [[widths[i] for i in c] for c in chunks] == [[10, 20, 30], [40, 50], [60, 70]]
    donors = Route.donors(chunks)
    assert sorted(donors) == list(range(7)) and sorted(donors.values()) == list(range(7))
    assert all(donors[i] != i for i in donors)
    assert all(any(i in c and donors[i] in c for c in chunks) for i in donors)
    # The batch control's row permutation is the same derangement.
    control = Route.batch_control(FusionControl("mismatched"), 0, 3, 4, seed=0)
    assert list(np.asarray(control.donor_rows)) == [1, 2, 0, 3]


# ------------------------------------------------------------------------------------------------
# The controls in an evaluation, each against an independent construction of what it claims to be.

ROWS = [
    dict(id="q0", question="Which gas do plants take in?", choices=["Oxygen", "Carbon dioxide", "Helium", "Neon"],
         answer="B"),
    dict(id="q1", question="What is two plus two?", choices=["Three", "Five", "Four", "Six"], answer="C"),
    dict(id="q2", question="Which planet is red?", choices=["Venus", "Earth", "Mars", "Jupiter"], answer=2),
    dict(id="q3", question="Which animal barks?", choices=["Cat", "Dog", "Fish", "Bird"], answer="B"),
    dict(id="q4", question="When does water boil?", choices=["50 C", "100 C", "150 C"], answer="B"),
]


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    bench = root / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    config = tiny.get_config()
    receiver = load_model("random:qwen3", dtype=jnp.float32)
    sharer = load_model("random:qwen2", dtype=jnp.float32)
    fuser = build.new_fuser(config, receiver, sharer)
    fuser.projectors.gate_logit[...] = jnp.ones_like(fuser.projectors.gate_logit[...])  # every gate open
    save_fuser(fuser, root / "fuser")
    config.eval.update(dict(fuser=str(root / "fuser"), source=str(bench), benchmarks="openbookqa", limit=0,
                            methods="receiver,c2c," + ",".join(CONTROL_METHODS), answer_mode="logits",
                            batch_size=4, latency_items=0))
    summary = evaluate(config, root)
    with open(root / "eval" / "openbookqa.csv", newline="") as f:
        rows = {(r["method"], r["id"]): r for r in csv.DictReader(f)}
    return dict(root=root, bench=bench, receiver=receiver, sharer=sharer, fuser=fuser, summary=summary, rows=rows,
                tokenizer=load_tokenizer("random:qwen3"))


def _letter_logits(c, sharer, fuser, item_ids, *, donors=None):
    """{id: option-letter logits} from a Generator built here (one batch, no bucket padding); with `donors`,
    the sharer reads the donor item's prompt, right-aligned in the recipient's columns."""
    tok = c["tokenizer"]
    generator = Generator(C2CModel(c["receiver"], [sharer], [fuser]), PromptEncoder(tok, [tok], pad_to=1))
    items = {it.id: it for it in load_benchmark("openbookqa", source=c["bench"]).items}

    def encode(item_id):
        return generator.encoder.encode_chat([{"role": "user", "content": build_mc_prompt(items[item_id])},
                                              {"role": "assistant", "content": ANSWER_PREFIX}],
                                             add_generation_prompt=False, continue_final_message=True)

    # One batch, every row as wide as the longest prompt; with donors, row i's sharer reads its donor's prompt.
    encoded = [encode(i) for i in item_ids]
    sharer_side = encoded if donors is None else [encode(donors[i]) for i in item_ids]
    for mine, theirs in zip(encoded, sharer_side):
        assert len(theirs.tokens) >= len(mine.tokens)  # the donor covers every fused column
    width = max(len(e.tokens) for e in sharer_side)
    batch = generator.encoder.batch(encoded, width=width)
    other = generator.encoder.batch(sharer_side, width=width)
    batch = dataclasses.replace(batch, sharer_tokens=other.sharer_tokens, sharer_valid=other.sharer_valid,
                                sharer_positions=other.sharer_positions)
    logits = np.asarray(generator.next_token_logits(batch, suffix_length=len(ANSWER_PREFIX)))
    out = {}
    for row, item_id in enumerate(item_ids):
        ids = [tok(L, add_special_tokens=False)["input_ids"][0] for L in LETTERS[: len(items[item_id].choices)]]
        out[item_id] = logits[row, ids]
    return out


def _rows_logits(c, method):
    return {i: np.asarray(json.loads(r["option_logits"])) for (m, i), r in c["rows"].items() if m == method}


def _silent_sharer(sharer):
    """`sharer` with zero key and value projections (weights and biases): its K/V cache is all zeros."""
    graphdef, state = nnx.split(sharer)
    params = nnx.to_pure_dict(state)
    q_width = sharer.config.num_heads * sharer.config.head_dim
    qkv = params["layers"]["self_attn"]["qkv_proj"]
    qkv["kernel"] = qkv["kernel"].at[..., q_width:].set(0.0)
    qkv["bias"] = qkv["bias"].at[..., q_width:].set(0.0)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def test_controls_in_generate_mode(controlled, tmp_path):
    """Generate mode runs each control on its own (no shared prefill): the zero control generates what a
    silent sharer makes C2C generate, and the mismatched control still deranges the items."""
    c = controlled
    config = tiny.get_config()
    config.eval.update(dict(fuser=str(c["root"] / "fuser"), source=str(c["bench"]), benchmarks="openbookqa",
                            methods="c2c_zero,c2c_mismatched", answer_mode="generate", batch_size=2,
                            max_new_tokens=4, latency_items=0))
    evaluate(config, tmp_path)
    with open(tmp_path / "eval" / "openbookqa.csv", newline="") as f:
        rows = {(r["method"], r["id"]): r for r in csv.DictReader(f)}
    tok = c["tokenizer"]
    generator = Generator(C2CModel(c["receiver"], [_silent_sharer(c["sharer"])], [c["fuser"]]),
                          PromptEncoder(tok, [tok], pad_to=1))
    items = load_benchmark("openbookqa", source=c["bench"]).items
    texts = [generator.chat([mc_messages(it)], SamplingConfig(max_new_tokens=4))[0] for it in items[:2]]
    assert [rows[("c2c_zero", it.id)]["generated_text"] for it in items[:2]] == texts
    donors = {i: r["sharer_item"] for (m, i), r in rows.items() if m == "c2c_mismatched"}
    assert len(donors) == len(ROWS) and all(d and d != i for i, d in donors.items())
    assert sorted(donors.values()) == sorted(donors)


def test_zero_control_is_a_sharer_with_zero_key_and_value_projections(controlled):
    c = controlled
    silent = _silent_sharer(c["sharer"])
    expected = _letter_logits(c, silent, c["fuser"], [r["id"] for r in ROWS])
    got = _rows_logits(c, "c2c_zero")
    for item_id, logits in expected.items():
        np.testing.assert_allclose(got[item_id], logits, atol=2e-4)
    real = _rows_logits(c, "c2c")
    assert max(np.abs(got[i] - real[i]).max() for i in got) > 1e-3  # the sharer's content did matter


def test_no_receiver_input_control_is_a_fuser_blind_to_the_receiver(controlled):
    c = controlled
    graphdef, state = nnx.split(c["fuser"])
    params = nnx.to_pure_dict(state)
    kernel = params["projectors"]["in_proj"]["kernel"]  # [layers, 2, sharer dims + receiver dims, hidden]
    params["projectors"]["in_proj"]["kernel"] = kernel.at[:, :, c["fuser"].config.sharer_dim:].set(0.0)
    nnx.replace_by_pure_dict(state, params)
    blind = nnx.merge(graphdef, state)
    expected = _letter_logits(c, c["sharer"], blind, [r["id"] for r in ROWS])
    got = _rows_logits(c, "c2c_no_receiver_input")
    for item_id, logits in expected.items():
        np.testing.assert_allclose(got[item_id], logits, atol=2e-4)


def test_mismatched_control_reads_another_items_sharer_prompt(controlled):
    c = controlled
    donors = {i: r["sharer_item"] for (m, i), r in c["rows"].items() if m == "c2c_mismatched"}
    assert sorted(donors) == sorted(r["id"] for r in ROWS) == sorted(donors.values())
    assert all(donor != item for item, donor in donors.items())
    assert all(r["sharer_item"] == "" for (m, _), r in c["rows"].items() if m != "c2c_mismatched")
    # Where the donor's prompt is at least as long, the control equals a sharer that ran on the donor's prompt.
    length = {r["id"]: int(c["rows"][("receiver", r["id"])]["prompt_tokens"]) for r in ROWS}
    covered = [i for i, d in donors.items() if length[d] >= length[i]]
    assert len(covered) >= 3
    expected = _letter_logits(c, c["sharer"], c["fuser"], covered, donors=donors)
    got = _rows_logits(c, "c2c_mismatched")
    for item_id, logits in expected.items():
        np.testing.assert_allclose(got[item_id], logits, atol=2e-4)


def test_controls_are_reported_against_the_receiver_and_c2c(controlled):
    c = controlled
    stats = c["summary"]["statistics"]["openbookqa"]["methods"]
    noise, zero, real = (_rows_logits(c, m) for m in ("c2c_noise", "c2c_zero", "c2c"))
    assert max(np.abs(noise[i] - zero[i]).max() for i in noise) > 1e-3
    assert max(np.abs(noise[i] - real[i]).max() for i in noise) > 1e-3
    for method in CONTROL_METHODS:
        assert stats[method]["items"] == len(ROWS)
        assert stats[method]["vs_c2c"]["items"] == len(ROWS) and stats[method]["vs_receiver"]["items"] == len(ROWS)
        gold = {r["id"]: r for (m, _), r in c["rows"].items() if m == method}
        expected = np.mean([float(r["gold_logprob"]) for r in gold.values()])
        assert stats[method]["gold_logprob"] == pytest.approx(expected)
    assert stats["c2c"]["vs_c2c"] is None and stats["receiver"]["vs_receiver"] is None
    table = (c["root"] / "eval" / "results.md").read_text()
    assert "| C2C, zero sharer |" in table and "vs C2C" in table and "## Answer distribution" in table


def test_no_receiver_input_refuses_a_fuser_that_reads_no_receiver(controlled, tmp_path):
    config = tiny.get_config()
    config.fuser.ablation = "project"
    save_fuser(build.new_fuser(config, controlled["receiver"], controlled["sharer"]), tmp_path / "fuser")
    config.eval.update(dict(fuser=str(tmp_path / "fuser"), source=str(controlled["bench"]), benchmarks="openbookqa",
                            methods="c2c_no_receiver_input", answer_mode="logits"))
    with pytest.raises(ValueError, match="reads no receiver input, so the control would repeat c2c"):
        evaluate(config, tmp_path)


# ------------------------------------------------------------------------------------------------
# The trained control.


def _config(sharer_input):
    config = tiny.get_config()
    config.mesh.data = 1
    config.fuser.sharer_input = sharer_input
    return config


def _open_gates(params):
    """The fuser parameters with every gate open at inference (a closed gate would hide any dependence)."""
    projectors = dict(params["projectors"], gate_logit=jnp.ones_like(params["projectors"]["gate_logit"]))
    return dict(params, projectors=projectors)


def _other_sharer(state):
    """The sharer's weights changed (so its K/V change)."""
    return jax.tree.map(lambda x: x * 1.7 + 0.05 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def test_real_sharer_input_depends_on_the_sharer():
    """The negative control of the test below: the same check fails for the real sharer input."""
    run = loop.setup(_config("real"))
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    receiver_state, sharer_state = run.frozen
    params = _open_gates(run.state.params)
    loss, _ = run.eval_fn(params, run.frozen, batch)
    other, _ = run.eval_fn(params, (receiver_state, _other_sharer(sharer_state)), batch)
    assert abs(float(loss) - float(other)) > 1e-4


def test_trained_control_fuser_does_not_depend_on_the_sharer(tmp_path):
    run = loop.setup(_config("zeros"))
    assert run.fuser_template.config.sharer_input == "zeros"
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    state = run.state
    for _ in range(2):  # two training steps through the switch
        state, metrics = run.step_fn(state, run.frozen, batch, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    receiver_state, sharer_state = run.frozen
    params = _open_gates(state.params)
    loss, _ = run.eval_fn(params, run.frozen, batch)
    other, _ = run.eval_fn(params, (receiver_state, _other_sharer(sharer_state)), batch)
    assert float(loss) == float(other)

    # Saved with the fuser, and inference feeds it what it was trained on: its logits ignore the sharer too.
    fuser = nnx.merge(run.graphdefs[2], jax.device_get(params))
    save_fuser(fuser, tmp_path / "fuser")
    loaded = load_fuser(tmp_path / "fuser")
    assert loaded.config.sharer_input == "zeros"
    receiver = nnx.merge(run.graphdefs[0], receiver_state)
    tok = run.tokenizers[0]
    chats = [[{"role": "user", "content": "Why is the sky blue?"}]]
    logits = []
    for sharer in (sharer_state, _other_sharer(sharer_state)):
        model = C2CModel(receiver, [nnx.merge(run.graphdefs[1], sharer)], [loaded])
        generator = Generator(model, PromptEncoder(tok, [run.tokenizers[1]]))
        batch = generator.encoder.batch([generator.encoder.encode_chat(c) for c in chats])
        logits.append(np.asarray(generator.next_token_logits(batch)))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_noise_trained_control_runs_and_is_saved(tmp_path):
    run = loop.setup(_config("noise"))
    batch = sharding.place_batch(next(run.train_iter), run.mesh, batch_axis=1)
    state, metrics = run.step_fn(run.state, run.frozen, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and run.fuser_template.config.sharer_input == "noise"
