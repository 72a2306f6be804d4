"""Evaluation: scoring rules and statistics against hand computations."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from workbench.evaluate import first_letter, generated_letter, paired_test, predict
from workbench.statistics import accuracy_intervals, mcnemar_exact, t_interval, wilson_interval


def test_wilson_hand_computed():
    # k=8, n=10, z=1.959964: centre=(0.8+z^2/20)/(1+z^2/10), half=z*sqrt(0.016+z^2/400)/(1+z^2/10)
    z = 1.959963984540054
    den = 1 + z * z / 10
    centre = (0.8 + z * z / 20) / den
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / den
    lo, hi = wilson_interval(8, 10)
    assert abs(lo - (centre - half)) < 1e-9 and abs(hi - (centre + half)) < 1e-9
    assert abs(lo - 0.4901624) < 1e-6 and abs(hi - 0.9433178) < 1e-6
    lo0, hi0 = wilson_interval(0, 5)
    assert lo0 == 0.0 and 0 < hi0 < 0.6


def test_t_interval_hand_computed():
    m, lo, hi = t_interval([60.0, 70.0, 80.0])
    # sd = 10, se = 10/sqrt(3), t_{0.975,2} = 4.302652729911275
    half = 4.302652729911275 * 10 / math.sqrt(3)
    assert m == 70.0 and abs(lo - (70 - half)) < 1e-9 and abs(hi - (70 + half)) < 1e-9
    m1, lo1, hi1 = t_interval([55.0])
    assert m1 == 55.0 and math.isnan(lo1) and math.isnan(hi1)


def test_mcnemar_hand_computed():
    a = [1, 1, 1, 1, 1, 0, 0, 1, 1, 0]
    b = [0, 0, 0, 0, 1, 0, 1, 1, 1, 0]
    r = mcnemar_exact(a, b)
    # discordant: a-only = 4, b-only = 1 -> p = 2 * P(X<=1 | n=5, 0.5) = 2 * 6/32
    assert r["b"] == 4 and r["c"] == 1 and abs(r["pvalue"] - 12 / 32) < 1e-12
    assert mcnemar_exact([1, 0], [1, 0])["pvalue"] == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1], [1, 0])


def test_first_letter():
    assert first_letter("  B. drum") == "B" and first_letter("") == ""


def test_generated_letter_maps_option_text():
    ch = ["cat", "drum", "cat drum", "eagle"]
    assert generated_letter("drum", ch) == "B"
    assert generated_letter("cat drum", ch) == "C"  # longest match first
    assert generated_letter("eagle </s> x", ch) == "D"
    assert generated_letter("C. cat drum", ch) == "C"  # a letter answer still works
    assert generated_letter("horse", ch) == "h"  # no option: first character (wrong)


class FakeModel:
    """Prefers option index (len(prompt) % n); generates 'C ...'."""

    def score_options_batch(self, prompts, inputs, options):
        return [torch.tensor([1.0 if i == len(p) % len(o) else 0.0 for i in range(len(o))]) for p, o in zip(prompts, options)]

    def generate_batch(self, prompts, inputs, max_new_tokens=8):
        return ["C cat" for _ in prompts]


def _rec(i, gold, prompt, options=None):
    r = {"id": f"r{i}", "subset": "s", "conversations": [{"from": "human", "value": prompt},
                                                         {"from": "gpt", "value": gold}], "modal_inputs": {}}
    if options:
        r["options"] = options
    return r


def test_predict_choices_records():
    recs = [_rec(0, "B", "xxxxx"), _rec(1, "D", "xxxx")]
    for r in recs:
        r["choices"] = ["cat", "drum", "eagle", "fox"]
    df = predict(FakeModel(), recs, lambda r: {}, scoring="loglik")
    assert df["pred"].tolist() == ["B", "A"] and df["correct"].tolist() == [True, False]


def test_predict_both_scorings():
    recs = [_rec(0, "A", "xxxx"), _rec(1, "B", "xxxxx"), _rec(2, "C", "xx"),
            _rec(3, "cat", "xxx", ["dog", "cat", "eel", "fox"])]
    df = predict(FakeModel(), recs, lambda r: {}, scoring="loglik", method="m", seed=0)
    assert df["pred"].tolist() == ["A", "B", "C", "fox"]
    assert df["correct"].tolist() == [True, True, True, False]
    dg = predict(FakeModel(), recs, lambda r: {}, scoring="generate", method="m", seed=0)
    assert dg["pred"].tolist() == ["C", "C", "C", "C cat"] and dg["correct"].tolist() == [False, False, True, False]
    assert list(df.columns[:8]) == ["id", "subset", "gold", "pred", "correct", "method", "seed", "scoring"]


def test_summarize_and_paired():
    rows = []
    for seed, acc_a in ((0, [1, 1, 0, 1]), (1, [1, 1, 1, 1])):
        for i, c in enumerate(acc_a):
            rows.append({"id": f"q{i}", "subset": "s", "gold": "A", "pred": "A", "correct": bool(c),
                         "method": "a", "seed": seed, "scoring": "loglik"})
            rows.append({"id": f"q{i}", "subset": "s", "gold": "A", "pred": "B", "correct": i == 0,
                         "method": "b", "seed": seed, "scoring": "loglik"})
    df = pd.DataFrame(rows)
    s = accuracy_intervals(df)
    a = s[s.method == "a"].iloc[0]
    assert a.acc == pytest.approx(87.5) and a.n_seeds == 2 and a.n_items == 8
    lo, hi = wilson_interval(7, 8)
    assert a.wilson_low == pytest.approx(100 * lo)
    r = paired_test(df, "a", "b")
    assert r["b"] == 5 and r["c"] == 0 and r["pvalue"] == pytest.approx(2 / 32)


def test_cached_inputs_read_once_per_input_files():
    from workbench.evaluate import CachedInputs

    calls = []

    def load(r):
        calls.append(r["id"])
        return {"image": [torch.tensor([float(len(calls))])]}

    ci = CachedInputs(load)
    a = {"id": "a", "modal_inputs": {"vision": ["x.npy"]}}
    b = {"id": "b", "modal_inputs": {"vision": ["x.npy"]}}  # same files: same inputs
    c = {"id": "c", "modal_inputs": {"vision": ["y.npy"]}}
    first = ci(a)
    assert ci(a) is first and ci(b) is first and ci(c) is not first
    assert calls == ["a", "c"] and (ci.hits, ci.misses) == (2, 2)
    raw_rec = {"id": "d", "_inputs": {}}  # no modal_inputs: loaded every time
    ci(raw_rec), ci(raw_rec)
    assert calls == ["a", "c", "d", "d"]
    recs = [_rec(0, "A", "xxxx"), _rec(1, "B", "xxxxx")]
    pd.testing.assert_frame_equal(predict(FakeModel(), recs, CachedInputs(lambda r: {})),
                                  predict(FakeModel(), recs, lambda r: {}))
