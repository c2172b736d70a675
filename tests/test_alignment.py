"""Tests for c2c_jax.alignment with two genuinely different tokenizers built locally.

receiver: byte-level BPE (GPT-2 regex pre-tokenizer, <= 600 tokens), ChatML template with a Qwen3-style
          `enable_thinking` switch; eos <|im_end|>, pad <|endoftext|>, no bos, no unk.
sharer:   SentencePiece-like BPE (Metaspace pre-tokenizer, ~260 tokens, no byte fallback: unknown
          characters such as "@" are dropped), Llama-3-style template that trims contents;
          bos <|begin_of_text|>, eos <|eot_id|>, unk <unk>, NO pad (must fall back to eos).
"""

import string

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from c2c_jax.c2c.token_alignment import AlignedChat, TokenAligner, _find_spans, _token_ranges, tokenizers_compatible

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, how are you doing today?",
    "Language models can share knowledge through their caches.",
    "The receiver model reads the cache of the sharer model.",
    "What is the capital of France? The capital of France is Paris.",
    "Please answer the question with a single letter.",
    "A small model learns from a larger model by reading its memory.",
    "Two plus two equals four, and three plus three equals six.",
    "You are a helpful assistant that answers briefly and politely.",
    "Tokenizers split text into pieces called tokens.",
    "Understanding communication between models is an interesting problem.",
    "The weather is sunny and warm in the afternoon.",
    "Cats and dogs are popular pets around the world.",
    "Translation between vocabularies is never perfect.",
    "She said that the experiment worked better than expected.",
] * 4

RECEIVER_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SHARER_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Same as the sharer's, but drops system messages (like some real templates do).
NO_SYSTEM_TEMPLATE = SHARER_TEMPLATE.replace(
    "{%- for message in messages %}", "{%- for message in messages if message['role'] != 'system' %}"
)


def _receiver_backend(vocab_size=600):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tool|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _sharer_backend():
    tok = Tokenizer(models.BPE(unk_token=None))  # no unk in the model: unknown characters vanish
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = [c for c in string.ascii_letters + string.digits + ".,?!'\"-:;()\n" if c != "@"] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=260,
        initial_alphabet=alphabet,
        special_tokens=[
            "<|begin_of_text|>", "<unk>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|tool|>"
        ],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _wrap_receiver(backend, template=RECEIVER_TEMPLATE):
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|tool|>"],
    )
    tok.add_tokens(["<think>", "</think>"])  # Qwen3-style: added, not special
    tok.chat_template = template
    return tok


def _wrap_sharer(backend, template=SHARER_TEMPLATE, unk=True):
    kwargs = {"unk_token": "<unk>"} if unk else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|tool|>"],
        **kwargs,
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def backends():
    return _receiver_backend(), _sharer_backend()


@pytest.fixture(scope="module")
def rtok(backends):
    return _wrap_receiver(backends[0])


@pytest.fixture(scope="module")
def stok(backends):
    return _wrap_sharer(backends[1])


@pytest.fixture(scope="module")
def aligner(rtok, stok):
    return TokenAligner(rtok, stok, strategy="first")


def _decode1(tok, i):
    return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _pieces(rtok, stok, rid):
    return stok.encode(_decode1(rtok, rid), add_special_tokens=False)


# ---------------------------------------------------------------------------------------- per token
def test_tokenizers_are_genuinely_different(rtok, stok):
    text = "The receiver model reads the cache."
    assert rtok.tokenize(text) != stok.tokenize(text)
    assert len(rtok) != len(stok)
    assert stok.pad_token is None and rtok.bos_token is None


def test_first_vs_longest_on_split_token(rtok, stok):
    first, longest = TokenAligner(rtok, stok, "first"), TokenAligner(rtok, stok, "longest")
    checked = 0
    for rid in range(len(rtok)):
        if rid in rtok.all_special_ids:
            continue
        pieces = _pieces(rtok, stok, rid)
        if len(pieces) < 2:
            continue
        lengths = [len(_decode1(stok, p)) for p in pieces]
        best = pieces[lengths.index(max(lengths))]
        assert first.map_token(rid) == pieces[0]
        assert longest.map_token(rid) == best
        if best != pieces[0]:
            checked += 1
    # The interesting case must actually occur: a receiver token the sharer splits with the
    # longest piece not first.
    assert checked > 0
    rid = rtok.convert_tokens_to_ids("Ġvocab")
    pieces = _pieces(rtok, stok, rid)
    assert [_decode1(stok, p) for p in pieces] == [" ", "v", "ocab"]
    assert first.map_token(rid) == pieces[0] == stok.convert_tokens_to_ids("▁")
    assert longest.map_token(rid) == pieces[2] == stok.convert_tokens_to_ids("ocab")


def test_one_piece_token_maps_exactly(rtok, stok, aligner):
    rid = rtok.convert_tokens_to_ids("T")
    assert stok.encode("T", add_special_tokens=False) == [aligner.map_token(rid)]
    assert _decode1(stok, aligner.map_token(rid)) == "T"


def test_special_tokens_map_by_role(rtok, stok, aligner):
    assert aligner.map_token(rtok.eos_token_id) == stok.eos_token_id  # eos -> eos
    assert aligner.map_token(rtok.pad_token_id) == stok.eos_token_id  # pad -> sharer pad = its eos
    # same special text in both vocabs, different ids -> looked up by string
    assert rtok.convert_tokens_to_ids("<|tool|>") != stok.convert_tokens_to_ids("<|tool|>")
    assert aligner.map_token(rtok.convert_tokens_to_ids("<|tool|>")) == stok.convert_tokens_to_ids("<|tool|>")
    # receiver-only special token -> sharer unk (never re-encoded as "<", "|", ...)
    assert aligner.map_token(rtok.convert_tokens_to_ids("<|im_start|>")) == stok.unk_token_id
    # reverse direction: bos/unk roles the (new) sharer lacks fall back to unk-or-0 = 0
    reverse = TokenAligner(stok, rtok)
    assert reverse.map_token(stok.eos_token_id) == rtok.eos_token_id
    assert reverse.map_token(stok.bos_token_id) == 0
    assert reverse.map_token(stok.unk_token_id) == 0
    # the caller's tokenizers are not mutated by the pad fallback
    assert stok.pad_token is None and stok.pad_token_id is None


def test_zero_piece_token_maps_to_unk_or_zero(rtok, stok, backends):
    rid = rtok.convert_tokens_to_ids("@")
    assert _decode1(rtok, rid) == "@"
    assert stok.encode("@", add_special_tokens=False) == []  # precondition: sharer drops "@"
    assert stok.unk_token_id != 0
    assert TokenAligner(rtok, stok).map_token(rid) == stok.unk_token_id
    no_unk = _wrap_sharer(backends[1], unk=False)
    assert no_unk.unk_token_id is None
    assert TokenAligner(rtok, no_unk).map_token(rid) == 0


def test_map_ids_shape_dtype_and_cache(rtok, aligner):
    ids = np.array([[rtok.convert_tokens_to_ids("Ġvocab"), rtok.eos_token_id], [5, 6]])
    out = aligner.map_ids(ids)
    assert out.dtype == np.int32 and out.shape == (2, 2)
    assert out.tolist() == [[aligner.map_token(int(i)) for i in row] for row in ids]
    assert aligner.map_ids([]).shape == (0,)


# ---------------------------------------------------------------------------------------- chats
SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello there, how are you today?"},
    {"role": "assistant", "content": "The weather is sunny @ home."},
    {"role": "user", "content": "  Two plus two equals four?  "},  # sharer template trims this one
    {"role": "assistant", "content": "The answer is four."},
]
CASES = [
    (SINGLE, dict(add_generation_prompt=True)),
    (SINGLE, dict(add_generation_prompt=False)),
    (MULTI, dict(add_generation_prompt=True)),
    (MULTI, dict(add_generation_prompt=False)),
    (MULTI, dict(add_generation_prompt=True, enable_thinking=True)),
    (
        MULTI[:-1] + [{"role": "assistant", "content": "The answer is "}],
        dict(add_generation_prompt=False, continue_final_message=True),
    ),
]


def _own(tok, messages, **kw):
    """Text, ids and offsets of the model's own templated tokenisation (computed independently)."""
    if "enable_thinking" not in tok.chat_template:
        kw.pop("enable_thinking", None)
    text = tok.apply_chat_template(messages, tokenize=False, **kw)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, enc["input_ids"], enc["offset_mapping"]


def _content_token_mask(text, offsets, messages):
    """Tokens overlapping a message content; contents located by a plain sequential search."""
    mask, pos = np.zeros(len(offsets), bool), 0
    for m in messages:
        content = m["content"] if m["content"] in text[pos:] else m["content"].strip()
        s = text.index(content, pos)
        e = pos = s + len(content)
        mask |= np.array([a < e and b > s for a, b in offsets], bool)
    return mask


@pytest.mark.parametrize("messages,kw", CASES)
def test_align_chat(rtok, stok, aligner, messages, kw):
    kw = {"enable_thinking": False, **kw}
    out = aligner.align_chat(messages, **kw)
    assert isinstance(out, AlignedChat)
    n = len(out.receiver_ids)
    for arr, dtype in [(out.receiver_ids, np.int32), (out.sharer_ids, np.int32), (out.message_mask, bool),
                       (out.receiver_valid, bool), (out.sharer_valid, bool)]:
        assert arr.shape == (n,) and arr.dtype == dtype

    # sections tile [0, N), alternate, and carry the mask
    assert out.sections[0][0] == 0 and out.sections[-1][1] == n
    for (s0, e0, k0), (s1, e1, k1) in zip(out.sections, out.sections[1:]):
        assert e0 == s1 and k0 != k1
    for s, e, kind in out.sections:
        is_message = kind == "message"
        assert e > s and out.message_mask[s:e].all() == is_message and out.message_mask[s:e].any() == is_message
    msg_sections = [(s, e) for s, e, k in out.sections if k == "message"]
    assert len(msg_sections) == len(messages)

    # receiver: valid positions are exactly its own templated tokenisation
    r_text, r_ids, r_off = _own(rtok, messages, **kw)
    assert out.receiver_ids[out.receiver_valid].tolist() == r_ids
    assert rtok.decode(out.receiver_ids[out.receiver_valid], skip_special_tokens=False) == r_text
    if kw.get("enable_thinking") is False and kw["add_generation_prompt"]:
        assert r_text.endswith("<think>\n\n</think>\n\n")

    # message_mask covers exactly the receiver tokens overlapping message contents
    expected_msg = _content_token_mask(r_text, r_off, messages)
    assert out.message_mask[out.receiver_valid].tolist() == expected_msg.tolist()
    assert out.receiver_valid[out.message_mask].all() and out.sharer_valid[out.message_mask].all()
    for (s, e), m in zip(msg_sections, messages):
        # no token straddles a content boundary in these chats (see test_boundary_rule_token_ranges)
        assert rtok.decode(out.receiver_ids[s:e]) == m["content"]

    # sharer: message tokens are the mapped receiver tokens (first piece), template tokens are its own
    expected_mapped = [_pieces(rtok, stok, i)[0] if _pieces(rtok, stok, i) else stok.unk_token_id
                       for i in out.receiver_ids[out.message_mask]]
    assert out.sharer_ids[out.message_mask].tolist() == expected_mapped
    s_text, s_ids, s_off = _own(stok, messages, **kw)
    s_template = np.asarray(s_ids)[~_content_token_mask(s_text, s_off, messages)].tolist()
    assert out.sharer_ids[~out.message_mask & out.sharer_valid].tolist() == s_template
    assert s_template[0] == stok.bos_token_id

    # pads: own pad id (sharer: eos fallback), right-aligned within template sections, only on the
    # shorter side, never in messages
    assert (out.receiver_ids[~out.receiver_valid] == rtok.pad_token_id).all()
    assert (out.sharer_ids[~out.sharer_valid] == stok.eos_token_id).all()
    assert not (~out.receiver_valid & ~out.sharer_valid).any()
    assert (~out.sharer_valid).any() or (~out.receiver_valid).any()
    for s, e, kind in out.sections:
        for valid in (out.receiver_valid[s:e], out.sharer_valid[s:e]):
            k = int(valid.sum())
            assert valid[:k].all() and not valid[k:].any()
        if kind == "template":
            assert e - s == max(out.receiver_valid[s:e].sum(), out.sharer_valid[s:e].sum())


def test_continue_final_message_leaves_last_message_open(aligner, rtok):
    messages = SINGLE + [{"role": "assistant", "content": "The capital is"}]
    out = aligner.align_chat(messages, add_generation_prompt=False, continue_final_message=True)
    s, e, kind = out.sections[-1]
    assert kind == "message" and rtok.decode(out.receiver_ids[s:e]) == "The capital is"
    closed = aligner.align_chat(messages, add_generation_prompt=False)
    assert closed.sections[-1][2] == "template"


def test_empty_content_is_template(aligner):
    messages = [{"role": "system", "content": ""}] + SINGLE
    out = aligner.align_chat(messages, add_generation_prompt=True)
    assert [k for _, _, k in out.sections] == ["template", "message", "template"]


def test_message_without_receiver_tokens_stays_template(rtok, stok):
    # Reverse pair: the Metaspace tokenizer is now the receiver and drops "@" entirely, so that
    # message has no receiver token; it is merged into the surrounding template on both sides.
    out = TokenAligner(stok, rtok).align_chat([{"role": "user", "content": "@"}], add_generation_prompt=True)
    assert [k for _, _, k in out.sections] == ["template"] and not out.message_mask.any()
    assert out.receiver_ids[out.receiver_valid].tolist() == _own(stok, [{"role": "user", "content": "@"}],
                                                                 add_generation_prompt=True)[1]
    assert rtok.convert_tokens_to_ids("@") in out.sharer_ids[out.sharer_valid].tolist()


def test_identical_tokenizers_align_trivially(rtok, backends):
    twin = _wrap_receiver(backends[0])
    assert tokenizers_compatible(rtok, rtok) and tokenizers_compatible(rtok, twin)
    out = TokenAligner(rtok, twin).align_chat(MULTI, add_generation_prompt=True)
    assert out.receiver_valid.all() and out.sharer_valid.all()
    assert (out.receiver_ids == out.sharer_ids).all()


# ---------------------------------------------------------------------------------------- helpers
def test_boundary_rule_token_ranges():
    # token 1 straddles the start of span (5, 9), token 3 its end; a zero-width token inside counts
    offsets = [(0, 3), (3, 6), (6, 6), (6, 8), (8, 11), (11, 12)]
    assert _token_ranges(offsets, [(5, 9)]) == [(1, 5)]
    # a token overlapping two contents stays with the earlier one; the later gets what is left
    assert _token_ranges(offsets, [(4, 7), (7, 9), (11, 12)]) == [(1, 4), (4, 5), (5, 6)]
    # content with no overlapping token -> empty range
    assert _token_ranges([(0, 2), (4, 6)], [(2, 4)]) == [(1, 1)]


def test_find_spans_prefers_special_token_boundary_without_stealing():
    text = "[INST] cat [/INST] a cat<eos>"
    msgs = [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "a cat"}]
    # "cat" followed by "<" only occurs inside the answer; it must not be taken for the question
    assert _find_spans(text, [(0, "cat"), (1, "a cat")], msgs, "x") == [(7, 10), (19, 24)]
    # with a single message the "<"-followed occurrence wins over the earlier one
    assert _find_spans("cat x cat<eos>", [(0, "cat")], msgs, "x") == [(6, 9)]


# ---------------------------------------------------------------------------------------- errors
def test_compatibility(rtok, stok, backends):
    assert not tokenizers_compatible(rtok, stok) and not tokenizers_compatible(stok, rtok)
    # a tokenizer that only ADDS tokens on top (Qwen2.5 -> Qwen3) stays compatible, both ways
    extended = _wrap_receiver(backends[0])
    extended.add_tokens(["<tool_call>", "</tool_call>"])
    assert len(extended) > len(rtok)
    assert tokenizers_compatible(rtok, extended) and tokenizers_compatible(extended, rtok)
    # ...but not one where a token sits at a different id below the common size: with fewer merges
    # the added <think> lands on an id that is an ordinary merge in the other tokenizer
    fewer = _wrap_receiver(_receiver_backend(vocab_size=560))
    assert fewer.convert_tokens_to_ids("<think>") != rtok.convert_tokens_to_ids("<think>")
    assert not tokenizers_compatible(rtok, fewer) and not tokenizers_compatible(fewer, rtok)


def test_unknown_strategy(rtok, stok):
    with pytest.raises(ValueError, match="first, longest"):
        TokenAligner(rtok, stok, strategy="prefix")


def test_missing_chat_template(rtok, backends):
    bare = _wrap_sharer(backends[1], template=None)
    aligner = TokenAligner(rtok, bare)
    aligner.map_token(5)  # per-token mapping does not need templates
    with pytest.raises(ValueError, match="sharer tokenizer has no chat template"):
        aligner.align_chat(SINGLE, add_generation_prompt=True)


def test_message_missing_from_one_template(rtok, backends):
    no_system = _wrap_sharer(backends[1], template=NO_SYSTEM_TEMPLATE)
    with pytest.raises(ValueError, match=r"message 0 \(system: 'You are a helpful assistant.'\).*sharer"):
        TokenAligner(rtok, no_system).align_chat(MULTI, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------
# Layer maps (docs/upstream_reference.md §2.8), written out by hand for the published pairs.

from c2c_jax.c2c.layer_map import layer_map  # noqa: E402


def test_terminal_layer_maps_of_published_pairs():
    # Qwen3-0.6B (28) <- Qwen2.5-0.5B (24): t = 0..4 read layer 0, then t - 4.
    assert layer_map("terminal", 28, 24) == (0, 0, 0, 0, 0) + tuple(range(1, 24))
    # Qwen3-0.6B (28) <- Qwen3-4B (36): one-to-one from the top, t + 8.
    assert layer_map("terminal", 28, 36) == tuple(range(8, 36))
    # Qwen3-0.6B (28) <- Llama-3.2-1B (16): t = 0..12 read layer 0, then t - 12.
    assert layer_map("terminal", 28, 16) == (0,) * 13 + tuple(range(1, 16))


def test_nearest_layer_maps():
    assert layer_map("nearest", 28, 28) == tuple(range(28))
    m = layer_map("nearest", 28, 16)
    assert m[0] == 0 and m[-1] == 15 and list(m) == sorted(m)
    # Receiver layer 9 sits at depth 1/3: sharer layer 5 (depth 1/3) exactly.
    assert m[9] == 5
    # 3 <- 2: receiver depth 0.5 is equally far from sharer depths 0 and 1; the lower index wins.
    assert layer_map("nearest", 3, 2) == (0, 0, 1)
    assert layer_map("nearest", 1, 5) == (0,)


def test_unknown_layer_map():
    with pytest.raises(ValueError, match="terminal, nearest"):
        layer_map("diagonal", 4, 4)
