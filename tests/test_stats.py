"""Evaluation statistics against independent references (scipy) and the verdict line on known outcomes."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from c2c_jax.evaluate.methods import ItemResult
from c2c_jax.evaluate.report import _statistics, verdict
from c2c_jax.evaluate.stats import bootstrap_interval, mcnemar_exact, paired_comparison


@pytest.mark.parametrize("only_a, only_b, both, neither", [
    (3, 0, 10, 5), (0, 0, 4, 4), (7, 2, 1, 0), (20, 31, 40, 9), (150, 120, 300, 430), (1, 1, 0, 0),
])
def test_mcnemar_exact_is_the_two_sided_binomial_test_on_discordant_pairs(only_a, only_b, both, neither):
    a = np.array([1] * only_a + [0] * only_b + [1] * both + [0] * neither, bool)
    b = np.array([0] * only_a + [1] * only_b + [1] * both + [0] * neither, bool)
    n = only_a + only_b
    expected = 1.0 if n == 0 else scipy_stats.binomtest(only_a, n, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(b, a) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_by_hand():
    # 3 discordant items, all one way: 2 * (1/2)^3.
    assert mcnemar_exact([1, 1, 1, 0], [0, 0, 0, 0]) == 0.25


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    values = rng.random(300) < 0.37
    ours = bootstrap_interval(values, np.random.default_rng(0), resamples=20000)
    ref = scipy_stats.bootstrap((values.astype(float),), np.mean, method="percentile", n_resamples=20000,
                                random_state=np.random.default_rng(1)).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.006) and ours[1] == pytest.approx(ref.high, abs=0.006)
    # And the normal approximation's width, for a sample this size.
    se = np.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert ours[1] - ours[0] == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_paired_difference_resamples_items_not_methods():
    # b = a on every item but 12, where only a is right: the paired interval is tight around +12/200,
    # far narrower than two independent intervals would allow.
    rng = np.random.default_rng(0)
    b = rng.random(200) < 0.5
    a = b.copy()
    a[np.flatnonzero(~b)[:12]] = True
    out = paired_comparison(a, b, np.random.default_rng(0))
    assert out["difference"] == pytest.approx(12 / 200)
    assert 0 < out["low"] < 12 / 200 < out["high"] < 0.1
    assert (out["only_a"], out["only_b"]) == (12, 0) and out["p_mcnemar"] == pytest.approx(2 * 0.5 ** 12)


def _summary(correct_by_method, num_choices=4):
    """A summary built by the evaluator's own statistics from per-item outcomes."""
    methods = tuple(correct_by_method)
    n = len(next(iter(correct_by_method.values())))
    results = {m: [ItemResult(id=str(i), subject="", method=m, gold="A", prediction="A" if ok else "B",
                                 correct=bool(ok)) for i, ok in enumerate(outcomes)]
               for m, outcomes in correct_by_method.items()}
    settings = type("S", (), dict(methods=methods, seed=0))()
    out = dict(results=results, num_choices={str(i): num_choices for i in range(n)})
    return dict(benchmarks=["bench"], statistics={"bench": _statistics(settings, out)})


def test_verdict_names_what_the_run_shows():
    rng = np.random.default_rng(0)
    chance = rng.random(400) < 0.25
    better = chance | (rng.random(400) < 0.3)  # about +22 pp on the same items
    # Nothing differs, at chance.
    line = verdict(_summary({"receiver": chance, "c2c": chance.copy()}))
    assert line == ("Verdict: pipeline check at this model size: the receiver is at chance and no method differs "
                    "from the receiver alone beyond its 95% interval.")
    # A fuser with every gate closed says so.
    closed = dict(_summary({"receiver": chance, "c2c": chance.copy()}), models=dict(fuser_gates_open=[[0, 56]]))
    assert verdict(closed).endswith("(every gate of the fuser is closed, so C2C and its controls are the "
                                       "receiver alone).")
    # C2C gains, no control run.
    line = verdict(_summary({"receiver": chance, "c2c": better}))
    assert "bench: c2c +" in line and "no controls run" in line
    # C2C gains and so does a control: a format effect.
    line = verdict(_summary({"receiver": chance, "c2c": better, "c2c_zero": better.copy()}))
    assert "but c2c_zero does not fall below it: not the sharer's content" in line
    # C2C gains and beats every control.
    line = verdict(_summary({"receiver": chance, "c2c": better, "c2c_zero": chance.copy(),
                                "c2c_mismatched": chance.copy()}))
    assert "above every control: the sharer's content helps" in line
    # The sharer-only projection keeps the sharer's cache: matching C2C is no sign of a format effect, and
    # the verdict gives its distance to C2C (what the fuser takes from the receiver's own cache).
    line = verdict(_summary({"receiver": chance, "c2c": better, "c2c_zero": chance.copy(),
                                "c2c_no_receiver_input": better.copy()}))
    assert "above every control: the sharer's content helps" in line
    assert "c2c_no_receiver_input +" in line and "+0.0 pp [+0.0, +0.0] vs c2c)" in line
