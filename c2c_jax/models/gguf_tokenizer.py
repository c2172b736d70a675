"""The tokenizer a GGUF file describes, built with `tokenizers` from its metadata (no torch).

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, each token's type,
the special token ids, the pre-tokenizer's name and the chat template as metadata. transformers'
own GGUF route reads that metadata through a torch-only reader, so a CPU install without torch could
not even tokenize; here the `gguf` package reads it and `tokenizers` builds the same fast tokenizer.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are built: that is what Qwen2/2.5,
Qwen3, Llama 3 and SmolLM2 files carry. The pre-tokenizer follows llama.cpp's name for it
(`tokenizer.ggml.pre`), which is how the model's own tokenizer splits text before merging.
"""

from __future__ import annotations

from pathlib import Path

from c2c_jax.models.config import UnsupportedModelError

# Split patterns of the original tokenizers, by llama.cpp's pre-tokenizer name. GPT-2's pattern is the
# one `pre_tokenizers.ByteLevel(use_regex=True)` applies by itself.
_GPT2_SPLIT = None
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT,
    # SmolLM2's tokenizer.json: every digit on its own (Digits(individual_digits=True)), then GPT-2's split.
    "smollm": "digits",
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# llama.cpp's token types (gguf.TokenType): 3 = CONTROL (special tokens), 4 = USER_DEFINED (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


def _metadata(path: Path) -> dict:
    from c2c_jax.models.loading import _gguf_reader

    reader = _gguf_reader(path)
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith("tokenizer.") or key == "general.architecture"}


def _pre_tokenizer(split):
    from tokenizers import Regex, pre_tokenizers

    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gguf_tokenizer(path: str | Path):
    """A `transformers.PreTrainedTokenizerFast` equal to the tokenizer that the GGUF file `path` describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from c2c_jax.models.loading import CheckpointError

    path = Path(path)
    meta = _metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer type {kind!r} is not supported; only byte-level BPE ('gpt2', as in Qwen, "
            f"Llama 3 and SmolLM2 files) is. Pass the model's directory with its tokenizer.json instead.")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UnsupportedModelError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
                                    f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    # Byte-level vocabularies spell every token in GPT-2's printable byte alphabet; the rare token written
    # in plain text (a CJK special token, say) is spelled in that alphabet as the original vocabulary has it.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_char = dict(zip(range(256), _byte_alphabet()))
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(byte_char[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, index)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZER_SPLITS[pre])
    backend.decoder = decoders.ByteLevel()
    # Special tokens stay whole wherever they appear; a control token outside the byte alphabet is a
    # converter's mislabel (adding it would grow the vocabulary past the embedding), so it is left out.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind_ in zip(tokens, types) if kind_ == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED and t in vocab])

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos = token("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = tokens.index(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"), clean_up_tokenization_spaces=False)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]
