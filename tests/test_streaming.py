"""Streaming generation: the same answers as `chat`, delivered while the decode loop runs."""

import functools

import jax

from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.generator import IncrementalText
from test_pipeline import generator, pair  # noqa: F401 - the tiny receiver/sharer/fuser fixture

CHATS = [[{"role": "user", "content": "what is the capital of france ?"}],
         [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good day"},
          {"role": "user", "content": "why is the sun red"}]]


def test_streamed_pieces_join_to_the_chat_answers(pair):  # noqa: F811
    gen = generator(pair, pad_to=16)
    sampling = SamplingConfig(max_new_tokens=6)
    for fuse in (True, False):
        steps = list(gen.stream_chat(CHATS, sampling, fuse=fuse))
        assert len(steps) >= 2 and all(len(pieces) == len(CHATS) for pieces in steps)
        joined = ["".join(pieces[row] for pieces in steps).strip() for row in range(len(CHATS))]
        assert joined == gen.chat(CHATS, sampling, fuse=fuse)
    # A reader may stop early; the next stream starts clean.
    first = next(iter(gen.stream_chat(CHATS, sampling)))
    assert len(first) == len(CHATS)
    assert len(list(gen.stream_chat(CHATS, sampling))) == len(steps)


def test_only_the_streaming_program_calls_back_to_the_host(pair):  # noqa: F811
    gen = generator(pair, pad_to=16)
    batch = gen.encoder.batch([gen.encoder.encode_chat(c) for c in CHATS])
    cache = gen.programs._prompt_cache(gen.state, batch, None, fuse=True, suffix_length=1)

    def program(stream):
        return str(jax.make_jaxpr(functools.partial(
            gen.programs._generate_program, sampling=SamplingConfig(max_new_tokens=4), eos_ids=gen.eos_ids,
            pad_id=gen.encoder.pad_id, stream=stream))(gen.state, batch, cache, jax.random.key(0)))

    assert "callback" not in program(False)
    assert "callback" in program(True)


def test_incremental_text_holds_back_incomplete_characters():
    class Bytes:  # a byte-level tokenizer: one token per UTF-8 byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    text = IncrementalText(Bytes())
    pieces = [text.add(b) for b in "né?".encode()]
    assert pieces == ["n", "", "é", "?"] and text.flush() == ""


def test_cli_helpers_stream_the_side_by_side_answers(pair):  # noqa: F811
    from c2c_jax.generate import chat_loop, stream_side_by_side

    gen = generator(pair, pad_to=16)
    sampling = SamplingConfig(max_new_tokens=5)
    written = []
    conversation = CHATS[0]
    alone, fused = stream_side_by_side(gen, conversation, conversation, sampling, written.append)
    assert [alone, fused] == [gen.chat([conversation], sampling, fuse=f)[0] for f in (False, True)]
    text = "".join(written)
    assert text.index("receiver alone:") < text.index("receiver + C2C:") and len(written) > 6
    written.clear()
    script = iter(["what is the capital of france ?", "why", ""])
    chat_loop(gen, sampling, read=lambda _: next(script), write=written.append, stream=True)
    assert "".join(written).count("receiver + C2C:") == 2
