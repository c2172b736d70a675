"""Tests for c2c_jax.data: chat sources, example encoding (plain and token-aligned), batches, iterator.

Tokenizers: `byte_tokenizer()` (one token per byte, ChatML) and a locally trained SentencePiece-like BPE with
a Llama-3-style template (bos, header tokens, <|eot_id|>, no pad) -- genuinely different, so the aligned
path is exercised in both directions (the compact BPE as receiver puts receiver pads into the template
sections, the byte tokenizer as receiver puts sharer pads there).
"""

import json
import string

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from c2c_jax.c2c.prompt import PREFIX_MISMATCH, TOO_LONG
from c2c_jax.c2c.prompt import TrainExample
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.c2c.token_alignment import pad_id_of
from c2c_jax.c2c.token_alignment import TokenAligner, tokenizers_compatible
from c2c_jax.config import default_config
from c2c_jax.models.tiny import VOCAB_SIZE, byte_tokenizer
from c2c_jax.train.batching import DataSettings, batch_iterator, bucket_of, load_train_data
from c2c_jax.train.batching import BatchIterator, collate
from c2c_jax.train.sources import load_chats, row_to_chat, synthetic_chats

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant that answers briefly.",
    "Remember the number seven. What did I ask you to remember?",
    "Two plus two equals four, and three plus three equals six.",
    "The receiver model reads the cache of the sharer model.",
] * 4
LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Qwen3-like: an empty think block in the generation prompt and before the final assistant answer.
# (Newlines are written as expressions: transformers renders templates with trim_blocks.)
THINK = "{{ '<think>\\n\\n</think>\\n\\n' }}"
THINK_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.last and enable_thinking is defined and not enable_thinking %}"
    + THINK + "{% endif %}{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}" + THINK + "{% endif %}{% endif %}"
)
# Breaks the prefix property for multi-turn chats: the generation prompt gets an extra newline.
BROKEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if messages | length > 1 %}{{ '\\n' }}{% endif %}{% endif %}"
)

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Remember the number seven."},
         {"role": "assistant", "content": "OK, seven."},
         {"role": "user", "content": "What did I ask you to remember?"},
         {"role": "assistant", "content": "The number seven."}]


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def wtok():
    """SentencePiece-like BPE, Llama-3-style template, no pad token."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = list(string.ascii_letters + string.digits + ".,?!'\"-:;()=+\n") + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=200, initial_alphabet=alphabet, show_progress=False,
        special_tokens=["<|begin_of_text|>", "<unk>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   unk_token="<unk>",
                                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    fast.chat_template = LLAMA_TEMPLATE
    return fast


def _with_template(template):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


def _render(tok, messages, gen):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, enable_thinking=False)


def _batch1(ex, *, p=None, r=None, positions="shared", pad=0, spad=0):
    return collate([ex], prefix_length=p or ex.split, suffix_length=r or ex.length - ex.split, pad_id=pad,
                   sharer_pad_id=spad, sharer_positions=positions)


def _row(batch):
    return {k: v[0, 0] for k, v in vars(batch).items() if isinstance(v, np.ndarray)}


# =========================================================================================== sources
def test_synthetic_chats_deterministic_short_and_varied(btok):
    chats = synthetic_chats(200, seed=3)
    assert chats == synthetic_chats(200, seed=3) and chats != synthetic_chats(200, seed=4)
    assert all(c[-1]["role"] == "assistant" and c[0]["role"] == "user" for c in chats)
    assert any(len(c) == 4 for c in chats) and any(len(c) == 2 for c in chats)
    assert max(len(btok(_render(btok, c, False), add_special_tokens=False)["input_ids"]) for c in chats) <= 128
    # answers are computable from the prompt (learnable): check the arithmetic ones
    for c in chats:
        q = c[0]["content"]
        if q.startswith("What is") and "+" in q and len(c) == 2:
            a, b = q[len("What is "):-1].split(" + ")
            assert int(c[1]["content"]) == int(a) + int(b)


def test_row_conversion_openhermes_and_messages():
    conv = [{"from": "system", "value": "be nice"}, {"from": "human", "value": "  hi there \n"},
            {"from": "gpt", "value": " Hello! \n"}]
    chat, reason = row_to_chat({"conversations": conv})
    assert reason is None and chat == [{"role": "user", "content": "hi there"},
                                       {"role": "assistant", "content": " Hello! \n"}]
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "yo"}]
    assert row_to_chat({"messages": msgs}) == (msgs, None)  # kept as given, system included


def _write_rows(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    elif name.endswith(".json"):
        path.write_text(json.dumps({"data": rows}))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("fmt", ["messages", "conversations"])
def test_local_files_load_in_both_row_formats(tmp_path, suffix, fmt):
    chats = synthetic_chats(7, seed=1)
    if fmt == "messages":
        rows = [{"messages": c, "id": i} for i, c in enumerate(chats)]
    else:
        names = {"user": "human", "assistant": "gpt"}
        rows = [{"conversations": [{"from": "system", "value": "sys"}]
                 + [{"from": names[m["role"]], "value": m["content"]} for m in c]} for c in chats]
    path = _write_rows(tmp_path, "chats" + suffix, rows)
    loaded, stats = load_chats(str(path), max_rows=None)
    assert loaded == chats and stats["rows"] == 7
    loaded, stats = load_chats(str(path), max_rows=3)  # the first rows, in file order
    assert loaded == chats[:3] and stats["rows"] == 3


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    good = {"messages": SINGLE}
    rows = [
        good,
        "{not json",
        {"text": "no chat field"},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": ["block"]}, {"role": "assistant", "content": "a"}]},
        {"messages": SINGLE[:1]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
        {"messages": []},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "t"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "system", "value": "only system"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
        good,
    ]
    chats, stats = load_chats(str(_write_rows(tmp_path, "bad.jsonl", rows)))
    assert chats == [SINGLE, SINGLE]
    assert dict(stats) == {"rows": 15, "invalid_json": 1, "missing_field": 3, "unknown_role": 2,
                           "empty_content": 2, "bad_content": 1, "last_not_assistant": 1, "no_user_turn": 1,
                           "empty_chat": 2}


def test_empty_dataset_and_missing_source_are_clear_errors(tmp_path):
    path = _write_rows(tmp_path, "empty.jsonl", [{"messages": SINGLE[:1]}, {"foo": 1}])
    with pytest.raises(ValueError, match="no usable chat.*last_not_assistant: 1.*missing_field: 1"):
        load_chats(str(path))
    with pytest.raises(FileNotFoundError, match="openhermes, mc_train, synthetic"):
        load_chats(str(tmp_path / "nope.jsonl"))


def test_openhermes_hub_error_names_alternatives(monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(RuntimeError, match=r"(?s)OpenHermes.*local file.*'mc_train'.*'synthetic'"):
        load_chats("openhermes", max_rows=10)


def test_openhermes_takes_first_rows_and_converts(monkeypatch):
    import datasets

    rows = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": f" q{i} "},
                               {"from": "gpt", "value": f"a{i} "}], "source": "x"} for i in range(6)]
    rows[1]["conversations"][2]["value"] = ""  # malformed: counted
    calls = []

    def load(path, split):
        calls.append((path, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load)
    chats, stats = load_chats("openhermes", max_rows=4)
    assert calls == [("teknium/OpenHermes-2.5", "train")]
    assert chats == [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} "}]
                     for i in (0, 2, 3)]
    assert stats == {"rows": 4, "empty_content": 1}


def test_mc_train_source(monkeypatch):

    seen = {}

    def fake(limit=None, seed=0, **kw):
        seen.update(limit=limit, seed=seed)
        return [SINGLE] * 3

    from c2c_jax.evaluate import benchmarks

    monkeypatch.setattr(benchmarks, "mc_training_chats", fake)
    chats, _ = load_chats("mc_train", max_rows=3, seed=7)
    assert chats == [SINGLE] * 3 and seen == {"limit": 3, "seed": 7}


# =========================================================================================== encoding
def encode_example(messages, receiver_tok, sharer_tok=None, **kwargs):
    """One chat as a training example (or its skip reason), as `load_train_data` encodes it."""
    sharers = [] if sharer_tok is None else [sharer_tok]
    return PromptEncoder(receiver_tok, sharers, **kwargs).encode_example(messages)


@pytest.mark.parametrize("messages", [SINGLE, MULTI])
def test_plain_labels_are_exactly_the_final_assistant_turn(btok, messages):
    ex = encode_example(messages, btok, btok, receiver_vocab_size=VOCAB_SIZE, sharer_vocab_size=VOCAB_SIZE)
    assert isinstance(ex, TrainExample)
    instruction, full = _render(btok, messages[:-1], True), _render(btok, messages, False)
    answer_text = full[len(instruction):]
    assert answer_text == messages[-1]["content"] + "<|im_end|>\n"
    row = _row(_batch1(ex))
    assert btok.decode(row["targets"][row["loss_mask"]]) == answer_text
    assert row["loss_mask"].sum() == len(btok(answer_text, add_special_tokens=False)["input_ids"])
    # fused columns: exactly the instruction minus its last token; that token starts the suffix
    assert btok.decode(row["prefix_tokens"][row["fuse_mask"]]) == instruction[:-1]
    assert row["fuse_mask"].all() and btok.decode(row["suffix_tokens"][:1]) == instruction[-1]
    assert btok.decode(row["suffix_tokens"][row["suffix_valid"]]) == instruction[-1] + answer_text
    # a same-tokenizer sharer reads the receiver ids
    assert (ex.sharer_tokens == ex.tokens).all() and ex.split == len(btok(instruction, add_special_tokens=False)["input_ids"]) - 1


def test_enable_thinking_is_passed_through():
    tok = _with_template(THINK_TEMPLATE)
    ex = encode_example(SINGLE, tok, enable_thinking=False)
    text = tok.decode(ex.tokens[: ex.split + 1])
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(ex.answer) == SINGLE[-1]["content"] + "<|im_end|>\n"
    # with thinking on, the template renders no think block: the instruction ends at the header
    on = encode_example(SINGLE, tok, enable_thinking=True)
    assert tok.decode(on.tokens[: on.split + 1]).endswith("<|im_start|>assistant\n")


def test_prefix_property_check_skips_and_counts():
    tok = _with_template(BROKEN_TEMPLATE)
    assert encode_example(MULTI, tok) == PREFIX_MISMATCH
    assert isinstance(encode_example(SINGLE, tok), TrainExample)  # the template only breaks multi-turn chats
    examples, stats = PromptEncoder(tok).encode_examples([SINGLE, MULTI, SINGLE])
    assert [e is None for e in examples] == [False, True, False] and stats == {"prefix_mismatch": 1}


def test_too_long_and_template_errors_are_counted(btok):
    n = len(btok(_render(btok, SINGLE, False), add_special_tokens=False)["input_ids"])
    enc = PromptEncoder(btok, max_length=n)
    assert isinstance(enc.encode_example(SINGLE), TrainExample)
    assert PromptEncoder(btok, max_length=n - 1).encode_example(SINGLE) == TOO_LONG
    bad = _with_template("{{ raise_exception('no') if messages[0]['content'] == 'boom' }}{% for m in messages %}"
                         "<|im_start|>{{ m['content'] }}{% endfor %}")
    out, stats = PromptEncoder(bad).encode_examples([SINGLE, [{"role": "user", "content": "boom"}, SINGLE[1]]])
    assert out[0] is not None and out[1] is None and stats == {"template_error": 1}


def test_vocab_size_mismatch_is_a_clear_error(btok, wtok):
    with pytest.raises(ValueError, match="receiver token id .* outside the receiver model's vocabulary of 200"):
        encode_example(SINGLE, btok, btok, receiver_vocab_size=200, sharer_vocab_size=VOCAB_SIZE)
    with pytest.raises(ValueError, match="sharer token id .* outside the sharer model's vocabulary of 100"):
        encode_example(SINGLE, btok, wtok, receiver_vocab_size=VOCAB_SIZE, sharer_vocab_size=100)
    with pytest.raises(ValueError, match="pad id"):
        PromptEncoder(btok, receiver_vocab_size=256)  # pad <|endoftext|> is id 256
    # alignment "off" feeds receiver ids to a sharer with a smaller vocabulary: caught before any compile
    with pytest.raises(ValueError, match="alignment.tokens"):
        encode_example(SINGLE, btok, wtok, alignment="off", receiver_vocab_size=VOCAB_SIZE,
                    sharer_vocab_size=len(wtok))


@pytest.fixture(scope="module", params=["byte_receiver", "bpe_receiver"])
def pair(request, btok, wtok):
    return (btok, wtok) if request.param == "byte_receiver" else (wtok, btok)


@pytest.mark.parametrize("messages", [SINGLE, MULTI])
def test_aligned_labels_fused_columns_and_pads(pair, messages):
    rtok, stok = pair
    assert not tokenizers_compatible(rtok, stok)
    enc = PromptEncoder(rtok, [stok], receiver_vocab_size=len(rtok), sharer_vocab_size=len(stok))
    assert enc.aligned
    ex = enc.encode_example(messages)
    assert isinstance(ex, TrainExample)
    instruction, full = _render(rtok, messages[:-1], True), _render(rtok, messages, False)
    assert full.startswith(instruction)
    # labels: the receiver's own tokens of the final assistant turn (with trailing template tokens)
    r_full = rtok(full, add_special_tokens=False)["input_ids"]
    r_instr = rtok(instruction, add_special_tokens=False)["input_ids"]
    assert ex.answer.tolist() == r_full[len(r_instr):]
    row = _row(_batch1(ex, pad=pad_id_of(rtok), spad=pad_id_of(stok)))
    assert row["targets"][row["loss_mask"]].tolist() == r_full[len(r_instr):]
    assert rtok.decode(row["targets"][row["loss_mask"]], skip_special_tokens=False).strip() == \
        full[len(instruction):].strip()
    # columns after the split are real receiver tokens only; the receiver prefix is its own instruction
    assert ex.valid[ex.split:].all() and row["suffix_valid"].all()
    assert ex.tokens[: ex.split + 1][ex.valid[: ex.split + 1]].tolist() == r_instr
    # fused columns: only message tokens before the split = the contents of all but the last message
    fused = row["prefix_tokens"][row["fuse_mask"]]
    expected = [t for m in messages[:-1] for t in rtok(m["content"].strip(), add_special_tokens=False)["input_ids"]]
    assert fused.tolist() == expected
    sharer_fused = row["sharer_prefix_tokens"][row["sharer_columns"][row["fuse_mask"]]]
    assert (sharer_fused == TokenAligner(rtok, stok).map_ids(fused)).all()
    assert not row["fuse_mask"][~row["prefix_valid"]].any()
    assert row["sharer_prefix_valid"][row["sharer_columns"][row["fuse_mask"]]].all()
    # template tokens are not fused but present: template columns exist before the split
    assert (~row["fuse_mask"]).sum() > 0


def test_aligned_pads_land_on_the_expected_side(btok, wtok):
    bpe_receiver = PromptEncoder(wtok, [btok]).encode_example(MULTI)
    byte_receiver = PromptEncoder(btok, [wtok]).encode_example(MULTI)
    assert (~bpe_receiver.valid).any()  # compact receiver: receiver pads in template sections ...
    assert (~byte_receiver.sharer_valid).any()  # ... byte receiver: sharer pads
    # the uncompacted alignment of the bpe receiver has receiver pads after the split (before the answer)
    chat = TokenAligner(wtok, btok).align_chat(MULTI, add_generation_prompt=False)
    answer_start = [s for s, e, k in chat.sections if k == "message"][-1]
    last_real = np.flatnonzero(chat.receiver_valid[:answer_start])[-1]
    assert last_real + 1 < answer_start and not chat.receiver_valid[last_real + 1: answer_start].any()
    assert not chat.receiver_valid[-1]  # ... and after the answer's trailing template
    # the example keeps columns [0, split] and only the real receiver columns after it
    assert bpe_receiver.split == last_real
    kept = chat.receiver_valid.copy()
    kept[: last_real + 1] = True
    assert bpe_receiver.tokens.tolist() == chat.receiver_ids[kept].tolist()
    assert bpe_receiver.sharer_tokens.tolist() == chat.sharer_ids[kept].tolist()


# ------------------------------------------------------------------------ consistency with inference
@pytest.mark.parametrize("positions", ["shared", "own"])
@pytest.mark.parametrize("aligned", [False, True])
def test_training_prefix_matches_inference_prompt(btok, wtok, aligned, positions):
    """The prefix + first suffix column hold what `PromptEncoder` builds for the same instruction:
    each model's real tokens with their positions, packed to the left, and the same fused pairs."""
    rtok, stok = (wtok, btok) if aligned else (btok, btok)
    penc = PromptEncoder(rtok, [stok], sharer_positions=positions)  # one encoder for both
    ex = penc.encode_example(MULTI)
    p = ex.split + 5
    pad, spad = pad_id_of(rtok), pad_id_of(stok)
    row = _row(_batch1(ex, p=p, r=ex.length - ex.split + 3, positions=positions, pad=pad, spad=spad))
    prompt = penc.batch([penc.encode_chat(MULTI[:-1])], width=p + 1)
    inf = {k: np.asarray(v[0] if isinstance(v, tuple) else v)[0, :p] for k, v in vars(prompt).items()
           if not isinstance(v, int)}
    assert (penc.aligners[0] is not None) == aligned
    first = int(np.argmax(inf["valid"]))  # the prompt is left-padded to the width
    assert (~inf["valid"][first:]).any() == aligned  # alignment pads among the receiver's columns
    for model, (valid, tokens, positions_) in {
            "receiver": ("valid", "tokens", "positions"),
            "sharer": ("sharer_valid", "sharer_tokens", "sharer_positions")}.items():
        ours = "prefix_" if model == "receiver" else "sharer_prefix_"
        n = int(inf[valid].sum())
        assert row[ours + "valid"].tolist() == [True] * n + [False] * (p - n), model
        assert row[ours + "tokens"][:n].tolist() == inf[tokens][inf[valid]].tolist(), model
        assert row[ours + "positions"][:n].tolist() == inf[positions_][inf[valid]].tolist(), model
    # the same columns are fused, each with the same sharer token as at inference
    n = int(inf["valid"].sum())
    assert row["fuse_mask"][:n].tolist() == inf["fuse_mask"][inf["valid"]].tolist()
    fused = row["fuse_mask"]
    assert row["sharer_prefix_tokens"][row["sharer_columns"][fused]].tolist() == \
        inf["sharer_tokens"][inf["fuse_mask"]].tolist()
    assert row["suffix_tokens"][0] == prompt.tokens[0, p] and row["suffix_positions"][0] == prompt.positions[0, p]


# =========================================================================================== batches
def _fake(i, split, length, pads=()):
    """Example i: receiver tokens encode (i, column) so rows can be identified; `pads` are receiver pads."""
    tokens = (1000 * (i + 1) + np.arange(length)).astype(np.int32)
    valid = np.ones(length, bool)
    valid[list(pads)] = False
    sharer_valid = np.ones(length, bool)
    return TrainExample(tokens, valid, tokens + 7, sharer_valid, valid & sharer_valid, split)


def test_a_fuse_mask_set_where_a_model_has_no_token_is_refused():
    tokens, valid = np.arange(6, dtype=np.int32), np.ones(6, bool)
    sharer_valid = valid.copy()
    sharer_valid[2] = False  # an alignment pad of the sharer
    with pytest.raises(ValueError, match="column 2"):
        TrainExample(tokens, valid, tokens, sharer_valid, np.ones(6, bool), 4)


def test_collate_padding_and_positions():
    a = _fake(0, split=5, length=9, pads=(2,))
    b = _fake(1, split=8, length=10)
    shared = collate([a, b], prefix_length=8, suffix_length=6, pad_id=-1, sharer_pad_id=-2)
    assert shared.shape == (1, 2, 8, 6)
    leaves = jax.tree_util.tree_leaves(shared)  # a pytree of 14 NumPy arrays, ready for device_put
    assert len(leaves) == 14 and all(isinstance(x, np.ndarray) for x in leaves)
    assert {x.dtype for x in leaves} == {np.dtype(np.int32), np.dtype(bool)}
    r = {k: v[0] for k, v in vars(shared).items() if isinstance(v, np.ndarray)}
    # prefix: each model's real tokens first, then padding; the receiver's alignment pad is dropped
    assert r["prefix_tokens"][0].tolist() == a.tokens[[0, 1, 3, 4]].tolist() + [-1] * 4
    assert r["prefix_valid"][0].tolist() == [True] * 4 + [False] * 4
    assert r["sharer_prefix_tokens"][0].tolist() == (a.tokens[:5] + 7).tolist() + [-2] * 3
    assert r["sharer_prefix_valid"][0].tolist() == [True] * 5 + [False] * 3
    # receiver column j pairs with the sharer token of the same example column
    assert r["sharer_columns"][0][:4].tolist() == [0, 1, 3, 4]
    assert r["fuse_mask"][0].tolist() == [True] * 4 + [False] * 4
    assert r["prefix_tokens"][1].tolist() == b.tokens[:8].tolist()
    assert r["sharer_columns"][1].tolist() == list(range(8)) and r["fuse_mask"][1].all()
    # suffix: right padded, targets = next token, loss on the answer tokens only
    assert r["suffix_tokens"][0].tolist() == a.tokens[5:].tolist() + [-1, -1]
    assert r["suffix_valid"][0].tolist() == [True] * 4 + [False] * 2
    assert r["targets"][0][:3].tolist() == a.tokens[6:].tolist() and (r["targets"][0][3:] == 0).all()
    assert r["loss_mask"][0].tolist() == [True] * 3 + [False] * 3
    assert r["loss_mask"][1].tolist() == [True] + [False] * 5
    # shared positions: the example's column (pads counted), the suffix continues
    assert r["prefix_positions"][0].tolist() == [0, 1, 3, 4, 0, 0, 0, 0]
    assert r["sharer_prefix_positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert r["suffix_positions"][0].tolist() == [5, 6, 7, 8, 0, 0]
    assert r["suffix_positions"][1].tolist() == [8, 9, 0, 0, 0, 0]
    # own positions: per model, real tokens so far - 1; the receiver skips its pad, the sharer has none
    own = {k: v[0] for k, v in vars(collate([a, b], prefix_length=8, suffix_length=6, pad_id=-1, sharer_pad_id=-2,
                                                sharer_positions="own")).items() if isinstance(v, np.ndarray)}
    assert own["prefix_positions"][0].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    assert own["sharer_prefix_positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert own["suffix_positions"][0].tolist() == [4, 5, 6, 7, 0, 0]
    assert own["suffix_positions"][1].tolist() == r["suffix_positions"][1].tolist()
    with pytest.raises(ValueError, match="does not fit"):
        collate([b], prefix_length=7, suffix_length=6, pad_id=0, sharer_pad_id=0)


def _examples(n=53, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        split = int(rng.integers(2, 40))
        out.append(_fake(i, split, split + int(rng.integers(2, 20))))
    out.append(_fake(n, 100, 105))  # fits no prefix bucket
    return out


ITER = dict(prefix_buckets=(8, 16, 40), suffix_buckets=(8, 20), seed=5, pad_id=0, sharer_pad_id=1)


def _ids(batch):
    return (batch.suffix_tokens[..., 0] // 1000 - 1).reshape(-1).tolist()


def test_iterator_buckets_shapes_and_determinism():
    ex = _examples()
    it = BatchIterator(ex, micro_batch_size=2, micro_batches=3, **ITER)
    assert it.skipped == 1
    batches = [next(it) for _ in range(30)]
    for b in batches:
        a_, b_, p, r = b.shape
        assert (a_, b_) == (3, 2) and p in ITER["prefix_buckets"] and r in ITER["suffix_buckets"]
        for i in _ids(b):  # the step's bucket is each row's own smallest fitting bucket
            assert bucket_of(ex[i], ITER["prefix_buckets"], ITER["suffix_buckets"]) == (p, r)
            assert i != len(ex) - 1
        # prefix and suffix both start with a real token at column 0
        assert b.prefix_valid[..., 0].all() and b.suffix_valid[..., 0].all()
    assert len(it.shapes_used) == len({b.shape for b in batches}) > 1
    again = BatchIterator(ex, micro_batch_size=2, micro_batches=3, **ITER)
    assert [_ids(b) for b in batches] == [_ids(next(again)) for _ in range(30)]
    other = BatchIterator(ex, micro_batch_size=2, micro_batches=3, **{**ITER, "seed": 6})
    assert [_ids(b) for b in batches] != [_ids(next(other)) for _ in range(30)]


def test_num_steps_per_epoch_is_exact():
    it = BatchIterator(_examples(), micro_batch_size=2, micro_batches=2, **ITER)
    per_epoch, seen = [0, 0, 0, 0], [0] * 54
    while True:
        _, indices = it.next_indices()
        if it.epoch >= 4:
            break
        per_epoch[it.epoch] += 1
        for i in indices:
            seen[i] += 1
    assert per_epoch == [it.num_steps_per_epoch(e) for e in range(4)]
    assert sum(per_epoch) == it.total_steps(4) and len(set(per_epoch)) > 1  # carry-over changes the count
    assert sum(seen) == it.step_size * sum(per_epoch) and max(seen) <= 4 and seen[-1] == 0  # never fits


def test_multi_process_rows_concatenate_to_the_global_batch():
    ex = _examples()
    full = BatchIterator(ex, micro_batch_size=4, micro_batches=2, **ITER)
    parts = [BatchIterator(ex, micro_batch_size=4, micro_batches=2, process_index=k, process_count=2, **ITER)
             for k in range(2)]
    for _ in range(12):
        g, p0, p1 = next(full), next(parts[0]), next(parts[1])
        assert p0.shape[:2] == (2, 2)
        for name, value in vars(g).items():
            if not isinstance(value, np.ndarray):  # the static layout: the whole step's, on every process
                assert getattr(p0, name) == getattr(p1, name) == value
                continue
            np.testing.assert_array_equal(np.concatenate([getattr(p0, name), getattr(p1, name)], axis=1), value)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        BatchIterator(ex, micro_batch_size=4, micro_batches=2, process_index=0, process_count=3, **ITER)


def test_state_restore_resumes_exactly_mid_epoch():
    ex = _examples()
    kw = dict(micro_batch_size=2, micro_batches=2, **ITER)
    uninterrupted = BatchIterator(ex, **kw)
    for _ in range(5):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state()))
    assert state["epoch"] == 0 and 0 < state["cursor"] < len(ex) and state["pending"] and state["step"] == 5
    resumed = BatchIterator(ex, **kw)
    resumed.restore(state)
    # a multi-host resume from the same state gives this process's rows of the same batches
    half = BatchIterator(ex, process_index=1, process_count=2, **kw)
    half.restore(state)
    for _ in range(40):  # crosses several epoch boundaries
        a, b, h = next(uninterrupted), next(resumed), next(half)
        for name, value in vars(a).items():
            np.testing.assert_array_equal(getattr(b, name), value)
            np.testing.assert_array_equal(getattr(h, name), value[:, 1:] if isinstance(value, np.ndarray) else value)
    assert uninterrupted.epoch >= 2 and resumed.state() == uninterrupted.state()
    with pytest.raises(ValueError, match="micro_batches"):
        BatchIterator(ex, **{**kw, "micro_batches": 3}).restore(state)
    with pytest.raises(ValueError, match="lengths_crc|num_examples"):
        BatchIterator(ex[:-2], **kw).restore(state)


def test_iterator_rejects_examples_fitting_no_bucket():
    with pytest.raises(ValueError, match="none of the 1 examples fits"):
        BatchIterator([_fake(0, 100, 105)], micro_batch_size=1, micro_batches=1, **ITER)


# =========================================================================================== from config
def _config(source="synthetic", **data_kw):
    c = default_config()
    c.data.update({**dict(source=source, max_rows=120, max_length=128, eval_fraction=0.1,
                          prefix_buckets=(64, 128), suffix_buckets=(32, 128)), **data_kw})
    c.train.update(batch_size=8, micro_batch_size=4)
    return c


def test_load_train_data_split_and_stats(btok):
    c = _config()
    train, evals, stats = load_train_data(DataSettings.from_config(c), btok, btok, VOCAB_SIZE, VOCAB_SIZE)
    assert len(evals) == 12 and len(train) == 108
    assert stats == {"rows": 120, "chats": 120, "examples": 120, "train": 108, "eval": 12}
    # a partition of the encoded chats (by index: synthetic chats are all distinct)
    chats, _ = load_chats("synthetic", max_rows=120, seed=c.seed)
    assert len({json.dumps(ch) for ch in chats}) == 120
    key = lambda e: e.tokens.tobytes()  # noqa: E731
    everything = [key(e) for e in PromptEncoder(btok).encode_examples(chats)[0]]
    assert sorted(everything) == sorted(map(key, train + evals)) and not set(map(key, train)) & set(map(key, evals))
    train2, evals2, _ = load_train_data(DataSettings.from_config(c), btok, btok, VOCAB_SIZE, VOCAB_SIZE)
    assert [e.tokens.tolist() for e in evals2] == [e.tokens.tolist() for e in evals]
    c.seed = 1
    _, evals3, _ = load_train_data(DataSettings.from_config(c), btok, btok, VOCAB_SIZE, VOCAB_SIZE)
    assert [e.tokens.tolist() for e in evals3] != [e.tokens.tolist() for e in evals]
    it = batch_iterator(DataSettings.from_config(c), train, pad_id=pad_id_of(btok), sharer_pad_id=pad_id_of(btok))
    batch = next(it)
    assert batch.shape[:2] == (2, 4) and it.num_steps_per_epoch() >= 108 // 8 - 2


def test_load_train_data_counts_skips_and_errors(tmp_path, btok):
    rows = [{"messages": SINGLE}, {"messages": [{"role": "user", "content": "x" * 200}, SINGLE[1]]},
            {"messages": [{"role": "user", "content": "y" * 120}, SINGLE[1]]}, {"messages": SINGLE[:1]}]
    path = _write_rows(tmp_path, "mix.jsonl", rows)
    c = _config(str(path), max_length=200)
    c.data.eval_fraction = 0.0
    train, evals, stats = load_train_data(DataSettings.from_config(c), btok, btok, VOCAB_SIZE, VOCAB_SIZE)
    assert len(train) == 1 and not evals
    assert stats == {"rows": 4, "chats": 3, "examples": 1, "train": 1, "eval": 0, "skipped/too_long": 1,
                     "skipped/too_long_for_buckets": 1, "skipped/last_not_assistant": 1}
    c.data.max_length = 20
    with pytest.raises(ValueError, match="no training example.*too_long: 3"):
        load_train_data(DataSettings.from_config(c), btok, btok, VOCAB_SIZE, VOCAB_SIZE)
    c.data.max_length = 200
    with pytest.raises(ValueError, match="vocabulary of 100"):
        load_train_data(DataSettings.from_config(c), btok, btok, VOCAB_SIZE, 100)
