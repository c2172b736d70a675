"""GGUF loading against transformers.

Tiny random models are written to GGUF the way llama.cpp's `convert_hf_to_gguf.py` writes them (its
metadata keys, tensor names, q/k row permutation for the llama arch, F32/F16/Q8_0 storage, a GPT-2 style
byte-level BPE vocabulary), then loaded with `load_model` and compared with the source PyTorch model.
The real SmolLM2-135M-Instruct Q4_1 file is compared with transformers' own GGUF loader.
"""

import copy
import functools
import json
import math

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from c2c_jax.models import CheckpointError, UnsupportedModelError, load_model, load_tokenizer
from tiny_models import make_tiny_model, torch_forward

TOL = 1e-4  # fp32 vs fp32 with identical weights: only summation order differs
# Against the unrounded source model, as a fraction of each tensor's largest magnitude: F16 weights
# (relative error <= 2**-11) and two Q8_0 tensors (error <= 1/254 of each 32-value block's max) move
# logits and K/V by <= 0.6% of their scale here (the Q8_0 attn_k dominates, and Qwen3's k_norm passes it
# on to K unshrunk); 2% leaves a 3x margin while a mis-mapped or mis-permuted tensor errs by ~100%.
ROUNDED_TOL = 0.02

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
Q8_0_TENSORS = ("blk.0.attn_k.weight", "blk.1.ffn_down.weight")  # in the "f16" files; the first is also permuted

# name -> (tiny_models family, overrides). The "llama" family is untied with q/k/v/o and MLP biases
# (llama.cpp's llama arch takes them as optional tensors).
CASES = {
    "llama_untied": ("llama", dict(num_key_value_heads=2)),
    "llama_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=False,
                                 mlp_bias=False)),
    "qwen2": ("qwen2", {}),  # q/k/v bias, untied
    "qwen3": ("qwen3", {}),  # q/k norm, head_dim 24 != hidden / heads (so key_length is written), tied
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The capital of France is Paris. Water boils at 100 degrees.",
    "What is the answer? Choose the single most correct option and reply with its letter only.",
    "hello world, hello there! The sun, the moon and the earth.",
    "Read the question carefully: which planet is red? Mars is red, the sky is blue.",
] * 8
TEXTS = [
    "Hello world! The capital of France is Paris.",
    "  two leading spaces,\nnew lines\n\n and\ttabs  ",
    "naïve café, 東京 🙂 1234567 x=3.14",
    "<|im_start|>user\nWhich planet is red?<|im_end|>\n",
]


def run(model, tokens):
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t), (b, t))
    return model(jnp.asarray(tokens), jnp.asarray(positions), model.init_cache(b, t))


# ------------------------------------------------------------------------------------------------
# Writing GGUF files like llama.cpp's convert_hf_to_gguf.py.


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer (GPT-2 pre-tokenization, full byte alphabet) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def permute(weights, n_head, n_head_kv):
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (applied to q/k weights and biases).
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors: divisors of each frequency.
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def add_tokenizer(writer, tok, pre="gpt-2", add_bos=False):
    # llama.cpp's _set_vocab_gpt2 + SpecialVocab: byte-level token strings, special tokens as CONTROL.
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(tok.chat_template)


def head_dim_of(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_gguf(path, model, tok, *, storage="f32", drop=(), rope_scaling=True, raw=None, edit=None):
    """Writes `model` (+ `tok`) to `path`; returns the HF state dict as stored (after F16/Q8_0 rounding).

    storage "f32": every tensor F32; "f16": 2-D tensors F16 except Q8_0_TENSORS, 1-D ones F32 (as
    llama.cpp's --outtype f16 keeps norms and biases). drop: GGUF tensor names to leave out.
    raw: GGUF name -> (bytes array, quant type) written instead. edit(writer): last-minute metadata changes.
    """
    c = model.config
    arch = c.model_type
    rope = c.rope_parameters
    heads, kv_heads, head_dim = c.num_attention_heads, c.num_key_value_heads, head_dim_of(c)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if head_dim != c.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if storage == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    if rope_scaling and rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    add_tokenizer(w, tok)
    if edit is not None:
        edit(w)
    if rope_scaling and rope["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))

    names = gguf.get_tensor_name_map(ARCHS[arch], c.num_hidden_layers)
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if name in drop:
            continue
        if raw and name in raw:
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
            continue
        data = tensor.numpy().astype(np.float32)
        ondisk = data
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            ondisk = permute(data, heads, heads)
        if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            ondisk = permute(data, heads, kv_heads)
        if storage == "f32" or data.ndim == 1:
            w.add_tensor(name, ondisk)
            stored[hf_name] = data
        elif name in Q8_0_TENSORS:
            w.add_tensor(name, gguf.quants.quantize(ondisk, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            # Q8_0 blocks are 32 values within a row, so rounding commutes with the row permutation.
            stored[hf_name] = gguf.quants.dequantize(
                gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, ondisk.astype(np.float16))
            stored[hf_name] = data.astype(np.float16).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def with_weights(model, stored):
    """A copy of the torch model holding exactly the weights a GGUF file stores."""
    copied = copy.deepcopy(model)
    result = copied.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in stored.items()}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return copied


def tiny(case, tok, directory, **overrides):
    family, case_overrides = CASES[case]
    return make_tiny_model(family, directory, vocab_size=len(tok), **{**case_overrides, **overrides})


# ------------------------------------------------------------------------------------------------
# Tiny files.


@pytest.mark.parametrize("storage", ["f32", "f16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gguf_matches_transformers(case, storage, bpe, tmp_path):
    torch_model = tiny(case, bpe, tmp_path / "hf")
    stored = write_gguf(tmp_path / "model.gguf", torch_model, bpe, storage=storage)
    model = load_model(tmp_path / "model.gguf", dtype=jnp.float32)
    c, hf = model.config, torch_model.config
    assert (c.model_type, c.vocab_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        hf.model_type, hf.vocab_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        head_dim_of(hf))
    assert c.tie_word_embeddings == hf.tie_word_embeddings and (model.lm_head is None) == hf.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (bpe.bos_token_id, (bpe.eos_token_id,),
                                                                 bpe.pad_token_id)

    tokens = np.random.default_rng(0).integers(0, len(bpe), (2, 19))
    logits, cache = run(model, tokens)
    # Against a torch model holding exactly the stored (rounded) weights: the loader itself adds no error.
    ref_logits, ref_k, ref_v = torch_forward(with_weights(torch_model, stored), tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k, ref_k, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v, ref_v, atol=TOL, rtol=0)
    if storage == "f16":
        # Against the unrounded source model: only the F16/Q8_0 rounding remains.
        src_logits, src_k, src_v = torch_forward(torch_model, tokens)
        for ours, src in ((logits, src_logits), (cache.k, src_k), (cache.v, src_v)):
            np.testing.assert_allclose(ours, src, atol=ROUNDED_TOL * np.abs(src).max(), rtol=0)
        assert not np.allclose(logits, src_logits, atol=1e-6, rtol=0)  # the rounding did happen


def test_tokenizer_from_gguf_metadata(bpe, tmp_path):
    torch_model = tiny("qwen2", bpe, tmp_path / "hf")
    write_gguf(tmp_path / "model.gguf", torch_model, bpe)
    tok = load_tokenizer(tmp_path / "model.gguf")
    assert len(tok) == len(bpe)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == bpe.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>")[0] == bpe.convert_tokens_to_ids("<|im_start|>")  # kept whole
    messages = [{"role": "user", "content": "Which planet is red?"}, {"role": "assistant", "content": "Mars."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == bpe.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.encode(prompt) == bpe.encode(prompt)


# The split patterns of Qwen2's and Llama 3's own tokenizer.json files (their "Split" pre-tokenizer).
SOURCE_SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+",
}


@pytest.mark.parametrize("pre,add_bos", [("qwen2", False), ("llama-bpe", True), ("smollm", False)])
def test_gguf_tokenizer_matches_the_source_and_transformers(pre, add_bos, tmp_path):
    """Each pre-tokenizer llama.cpp names is rebuilt as the source tokenizer splits text (checked against
    that tokenizer and against transformers' own GGUF route, which reads the file with torch)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if pre == "smollm":  # SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level split
        split = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SOURCE_SPLITS[pre]), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # Text where the splits differ: punctuation glued to a word (Qwen2, Llama 3), digit runs (all three).
    split_texts = ["(hello) .world ,the 'S 1234567 and 89, 2024 or 3.14\n\n\n  x"]
    tok = Tokenizer(models.BPE())
    # Merges learned under GPT-2's split include multi-digit ones, which only a digit-splitting
    # pre-tokenizer keeps apart; then the source splits as the model's tokenizer does.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if pre == "smollm" else split
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + split_texts * 16, trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.pre_tokenizer = split
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
            ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    source = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    source.chat_template = CHAT_TEMPLATE
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "qwen2")
    add_tokenizer(w, source, pre=pre, add_bos=add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = load_tokenizer(tmp_path / "tok.gguf")
    via_torch = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in TEXTS + split_texts + ["it's THEY'RE\r\n\n  x"]:
        ids = ours.encode(text)
        assert ids == source.encode(text), text
        assert (ids[0] == source.bos_token_id) == add_bos
        assert ours.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        if pre != "smollm":  # transformers splits "smollm" files as plain GPT-2 (multi-digit numbers stay whole)
            assert ids == via_torch.encode(text), text
    messages = [{"role": "user", "content": "Which planet is red?"}]
    assert (ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == source.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


@pytest.mark.parametrize("scaling", ["llama3", "linear"])
def test_rope_scaling_from_gguf(scaling, bpe, tmp_path):
    if scaling == "llama3":  # Llama 3.1+: llama.cpp writes a rope_freqs.weight tensor of divisors
        torch_model = make_tiny_model("llama3", tmp_path / "hf", vocab_size=len(bpe))
    else:  # linear scaling goes into metadata (rope.scaling.type / .factor)
        torch_model = tiny("llama_tied", bpe, tmp_path / "hf",
                           rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    write_gguf(tmp_path / "model.gguf", torch_model, bpe)
    model = load_model(tmp_path / "model.gguf", dtype=jnp.float32)
    assert model.config.rope.rope_type == ("divisors" if scaling == "llama3" else "linear")
    # 48 positions: well past llama3's original_max_position_embeddings (16), where the scaling acts.
    tokens = np.random.default_rng(1).integers(0, len(bpe), (1, 48))
    logits, cache = run(model, tokens)
    ref_logits, ref_k, ref_v = torch_forward(torch_model, tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.k, ref_k, atol=TOL, rtol=0)
    np.testing.assert_allclose(cache.v, ref_v, atol=TOL, rtol=0)
    # The scaling matters: the same file without it is far off.
    write_gguf(tmp_path / "plain.gguf", torch_model, bpe, rope_scaling=False)
    _, plain_cache = run(load_model(tmp_path / "plain.gguf", dtype=jnp.float32), tokens)
    assert np.abs(np.asarray(plain_cache.k) - ref_k).max() > 100 * TOL


def test_corrupt_and_unsupported_gguf_files_name_the_problem(bpe, tmp_path):
    torch_model = tiny("llama_untied", bpe, tmp_path / "hf")
    good = tmp_path / "good.gguf"
    write_gguf(good, torch_model, bpe)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    for broken in (data[:len(data) - 100], data[:len(data) // 2], data[:16], b"", b"PK\x03\x04" + data[4:]):
        bad.write_bytes(broken)
        with pytest.raises(CheckpointError, match="not a readable GGUF file"):
            load_model(bad, dtype=jnp.float32)

    def fails(error, match, **kwargs):
        write_gguf(bad, torch_model, bpe, **kwargs)
        with pytest.raises(error, match=match):
            load_model(bad, dtype=jnp.float32)

    fails(CheckpointError, r"lacks tensor blk\.1\.ffn_up\.weight", drop={"blk.1.ffn_up.weight"})
    fails(CheckpointError, r"lacks tensor output_norm\.weight", drop={"output_norm.weight"})
    fails(CheckpointError, r"lacks tensor token_embd\.weight", drop={"token_embd.weight"})
    fails(CheckpointError, r"lacks metadata key llama\.attention\.head_count",
          edit=lambda w: w.kv_data[0].pop("llama.attention.head_count"))
    fails(UnsupportedModelError, r"RoPE scaling 'yarn'",
          edit=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0)))
    # A quantization type gguf-py cannot dequantize, named with its tensor.
    q1 = gguf.GGMLQuantizationType.Q1_0
    block, size = gguf.GGML_QUANT_SIZES[q1]
    fails(UnsupportedModelError, r"blk\.0\.ffn_up\.weight is stored as Q1_0",
          raw={"blk.0.ffn_up.weight": (np.zeros((96, 64 // block * size), np.uint8), q1)})

    # An architecture we do not implement.
    w = gguf.GGUFWriter(str(bad), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        load_model(bad, dtype=jnp.float32)


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file.


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    # ggml block_q4_1: f16 scale d, f16 min m, 16 bytes of nibbles; low nibbles are values 0-15, high 16-31.
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return (q * d + m).reshape(raw.shape[0], -1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    # ggml block_q8_0: f16 scale d, 32 int8 values.
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    return (blocks[..., 2:].copy().view(np.int8).astype(np.float32) * d).reshape(raw.shape[0], -1)


def transformers_gguf_model(path):
    """transformers' own load of a GGUF file, fp32."""
    try:
        import accelerate  # noqa: F401  (from_pretrained(gguf_file=...) insists on it)
    except ImportError:
        # The steps of from_pretrained's legacy GGUF path: transformers' config mapping, dequantization
        # and q/k un-permutation, then the tensors into the model.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
        assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
        return model.eval()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_smollm2_gguf_matches_transformers(monkeypatch):
    from c2c_jax.offline import smollm2_gguf

    # transformers' legacy loader rebuilds gguf's (pure) tensor-name map for each of ~400 submodules: 5 s.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))

    path = smollm2_gguf()
    model = load_model(path, dtype=jnp.float32)
    assert model.config.tie_word_embeddings and model.config.num_layers == 30

    # Dequantization checked against ggml's block layouts, written out independently of gguf-py.
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.3.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    np.testing.assert_allclose(model.embed_tokens.embedding[...], dequantize_q8_0(tensors["token_embd.weight"].data),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.layers.mlp.down_proj.kernel[...][3].T,
                               dequantize_q4_1(tensors["blk.3.ffn_down.weight"].data), atol=1e-6, rtol=0)

    tok = load_tokenizer(path)
    # The tokenizer we build from the metadata (no torch) is transformers' own GGUF tokenizer, token for token.
    via_torch = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert len(tok) == len(via_torch) and tok.all_special_tokens == via_torch.all_special_tokens
    for text in TEXTS:
        assert tok.encode(text) == via_torch.encode(text), text
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    tokens = np.asarray([tok.encode(prompt, add_special_tokens=False)])
    assert tokens[0, 0] == tok.convert_tokens_to_ids("<|im_start|>")

    ref = transformers_gguf_model(path)
    ref_logits, ref_k, ref_v = torch_forward(ref, tokens)
    logits, cache = run(model, tokens)
    # Same dequantized fp32 weights on both sides; what differs is fp32 summation order (XLA vs torch
    # kernels) through 30 layers. Measured: max error 1e-4 on logits up to ~38, 5e-5 on K up to ~20.
    # 1e-3 leaves a 10x margin; a wrong tensor, permutation or RoPE setting errs by whole units.
    assert np.abs(ref_logits).max() > 10
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=0)
    np.testing.assert_allclose(cache.k, ref_k, atol=1e-3, rtol=0)
    np.testing.assert_allclose(cache.v, ref_v, atol=1e-3, rtol=0)
    # Every position's greedy token agrees (the closest top-2 margin in this prompt is ~0.04 >> 1e-3).
    assert (np.argmax(logits, -1) == ref_logits.argmax(-1)).all()

    # Greedy decoding: the same 8 tokens (ours with the KV cache, one token per step).
    steps = 8
    with torch.no_grad():
        ref_out = ref.generate(torch.as_tensor(tokens), attention_mask=torch.ones_like(torch.as_tensor(tokens)),
                               max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)
    ref_new = ref_out[0, tokens.shape[1]:].numpy()
    b, t = tokens.shape
    logits, cache = model(jnp.asarray(tokens), jnp.asarray(np.arange(t)[None]), model.init_cache(b, t + steps))
    decode = nnx.jit(lambda m, c, tok_, pos: m(tok_, pos, c))  # weights as arguments, not baked-in constants
    new = [int(np.argmax(logits[0, -1]))]
    for i in range(steps - 1):
        logits, cache = decode(model, cache, jnp.asarray([[new[-1]]]), jnp.asarray([[t + i]]))
        new.append(int(np.argmax(logits[0, -1])))
    assert new == ref_new.tolist(), (tok.decode(new), tok.decode(ref_new))
    assert "Paris" in tok.decode(new)
