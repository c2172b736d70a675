"""Tiny random models and synthetic data: a whole training run in seconds on a CPU.

No checkpoint, no data download: receiver "random:qwen3", sharer "random:qwen2" (byte-level
tokenizer), chats generated on the fly, a small fuser. For smoke tests, CI and Colab first runs.
"""

from c2c_jax.config import default_config


def get_config():
    c = default_config()
    c.receiver.path = "random:qwen3"
    c.receiver.dtype = "float32"
    c.sharer.path = "random:qwen2"
    c.sharer.dtype = "float32"
    c.fuser.update(hidden_dim=32, intermediate_dim=64, dtype="float32", anneal_steps=20)
    c.data.update(source="synthetic", max_rows=256, max_length=128, eval_fraction=0.1,
                  prefix_buckets=(64, 128), suffix_buckets=(32, 128))
    c.optim.lr = 1e-3
    c.train.update(batch_size=8, micro_batch_size=4, max_steps=20, log_every=5, eval_every=10, eval_batches=2)
    c.ckpt.update(every=10, keep=2)
    c.eval.update(benchmarks="openbookqa", source="offline", limit=8, batch_size=4, max_new_tokens=8,
                  t2t_message_tokens=16)
    c.generate.max_new_tokens = 16
    return c
