"""Tiny random `transformers` models, saved with `save_pretrained`, as ground truth for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# Each family exercises what makes it different: Qwen2 q/k/v bias, Qwen3 q/k norm with
# head_dim != hidden / heads, Llama 3 RoPE scaling with tied embeddings, plain untied Llama.
FAMILIES = {
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False), **kw}),
    "qwen3": lambda **kw: transformers.Qwen3Config(**{**dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=True), **kw}),
    "llama3": lambda **kw: transformers.LlamaConfig(**{**dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), **kw}),
    "llama": lambda **kw: transformers.LlamaConfig(**{**dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True), **kw}),
}


def make_tiny_model(family: str, directory, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """Builds a random fp32 model of `family`, perturbs its norms/biases, saves it to `directory`."""
    config = FAMILIES[family](**overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1 and biases at 0, which would hide a mis-mapped tensor.
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def torch_forward(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
                  positions: np.ndarray | None = None):
    """Logits [B, T, V] and per-layer K, V as [layers, B, T, kv_heads, head_dim] (our layout)."""
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long),
            position_ids=None if positions is None else torch.as_tensor(positions, dtype=torch.long),
            use_cache=True,
        )
    cache = out.cache if hasattr(type(out), "cache") else out.past_key_values  # renamed in transformers 5.2x
    keys = np.stack([layer.keys.numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4)
    values = np.stack([layer.values.numpy() for layer in cache.layers]).transpose(0, 1, 3, 2, 4)
    return out.logits.numpy(), keys, values


_WORDS = (
    "user assistant system A B C D E the a an is are was of to and in on for with what which who how why "
    "answer question correct choices instructions read carefully choose single most option reply only form "
    "no explanation or extra text following accurately background problem describe briefly useful solve "
    "paris france capital city water boils at degrees sun moon earth planet red blue green one two three four "
    "five yes not be it this that by from as you your i we they he she can will would should "
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; - ( ) ' \" / = + * hello world good day night time people year way thing "
    "man woman child animal dog cat bird fish tree plant food eat drink light heat energy force"
).split()


def make_tiny_tokenizer(directory, vocab_size: int = 160):
    """A word-level tokenizer with a ChatML template, saved next to a tiny model (ids < vocab_size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = list(dict.fromkeys(_WORDS))[: vocab_size - len(specials)]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(directory)
    return fast
