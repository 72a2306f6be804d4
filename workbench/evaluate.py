"""Evaluation: option log-likelihood and greedy first-letter scoring, saved per-item predictions,
intervals and paired tests.

Records are MCUB-format dicts (:mod:`workbench.world.mcub`): the human turn is the prompt, the gpt
turn the gold answer. Multiple-choice records (gold is a letter A-D) are scored

- ``"loglik"``: the option with the highest log-likelihood after the prompt; the candidates are
  the option texts where the record lists them as ``"choices"`` (the miniature world's models
  answer with the option text), else the letters A-D;
- ``"generate"``: greedy decoding; the prediction is the letter of the option whose text the output
  starts with (records with ``"choices"``), else the output's first character - the first-letter
  match of DAMC's released MCUB script.

Open-answer records (the capability family; ``"options"`` lists the candidate answers) are scored by
log-likelihood over the candidates, or by exact match of the greedy output.

Statistics are pure functions: :func:`wilson_interval`, :func:`t_interval`,
:func:`mcnemar_exact` (two-sided exact McNemar = binomial test on the discordant pairs).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

LETTERS = ("A", "B", "C", "D")
PRED_COLUMNS = ["id", "subset", "gold", "pred", "correct", "method", "seed", "scoring"]


def record_prompt(rec: Mapping) -> str:
    return rec["conversations"][0]["value"]


def record_gold(rec: Mapping) -> str:
    return rec["conversations"][1]["value"]


def record_options(rec: Mapping) -> list[str]:
    """The continuations scored by log-likelihood: ``choices`` (option texts, A-D order),
    ``options`` (open-answer candidates) or the letters A-D."""
    return list(rec.get("choices") or rec.get("options") or LETTERS)


def is_letter_record(rec: Mapping) -> bool:
    return record_gold(rec) in LETTERS and not rec.get("options")


def generated_letter(text: str, choices: Sequence[str] | None) -> str:
    """Map a generated answer to an option letter: the option whose text the output starts with
    (longest match first), else the first character of the output."""
    t = " ".join(text.strip().split())
    if choices:
        for i in sorted(range(len(choices)), key=lambda i: -len(choices[i])):
            c = " ".join(choices[i].split())
            if t == c or t.startswith(c + " "):
                return LETTERS[i]
    return first_letter(t)


def first_letter(text: str) -> str:
    """The first non-space character of a generated answer ('' if none)."""
    t = text.strip()
    return t[:1]


class CachedInputs:
    """``load_inputs`` memoised in memory: a record's inputs are read from disk once, however many
    models and grid points score it. The key is the record's ``modal_inputs`` (its input files),
    so two records with the same files share them; records without ``modal_inputs`` are loaded
    every time. The tensors are shared between calls: callers must not modify them in place
    (:class:`workbench.mllm.MultimodalLM` does not)."""

    def __init__(self, load_inputs: Callable[[Mapping], dict]) -> None:
        self.load_inputs = load_inputs
        self._memo: dict[str, dict] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(rec: Mapping) -> str | None:
        mi = rec.get("modal_inputs")
        if mi is None:
            return None
        import json

        return json.dumps(mi, sort_keys=True, default=str)

    def __call__(self, rec: Mapping) -> dict:
        k = self.key(rec)
        if k is None:
            return self.load_inputs(rec)
        hit = self._memo.get(k)
        if hit is None:
            self.misses += 1
            hit = self._memo[k] = self.load_inputs(rec)
        else:
            self.hits += 1
        return hit

    def clear(self) -> None:
        self._memo.clear()


#: Default of ``predict(shared_prefix=None)``: on - each prompt runs once and its options are scored
#: on the shared KV cache (``MultimodalLM.score_options_batch(shared_prefix=True)``, 2.4-3x faster on the mini zoos, log-
#: likelihoods within ~1e-6 of the reference). ``False``: ``MultimodalLM.score_options_batch``, the
#: reference that re-runs prompt + option per option. The two never share cache entries.
SHARED_PREFIX = True


def _is_multimodal_lm(model) -> bool:
    from .mllm import MultimodalLM
    return isinstance(model, MultimodalLM)


def shared_prefix_enabled(shared_prefix: bool | None = None) -> bool:
    return SHARED_PREFIX if shared_prefix is None else bool(shared_prefix)


def scorer_key() -> dict:
    """Cache-key entry of the log-likelihood scorer: none for the reference
    (``score_options_batch``, so existing caches stay valid), a tag for the shared-prefix scorer."""
    return {"scorer": "shared-prefix"} if shared_prefix_enabled() else {}


def predict(model, records: Sequence[Mapping], load_inputs: Callable[[Mapping], dict],
            scoring: str = "loglik", method: str = "", seed: int | None = None, batch_size: int = 32,
            max_new_tokens: int = 8, shared_prefix: bool | None = None) -> pd.DataFrame:
    """Score ``model`` (a :class:`workbench.mllm.MultimodalLM`) on ``records``.

    ``load_inputs(record) -> {modality: [tensor, ...]}`` loads a record's inputs. Returns one row
    per record with :data:`PRED_COLUMNS` (plus ``task``). ``shared_prefix`` (default
    :data:`SHARED_PREFIX`, on): log-likelihoods by ``model.score_options_batch(shared_prefix=True)``
    (each prompt once, options on its KV cache) instead of the per-option reference.
    """
    if scoring not in ("loglik", "generate"):
        raise ValueError(f"scoring must be 'loglik' or 'generate', got {scoring!r}")
    # the shared-prefix scorer needs a MultimodalLM (tokenizer, LLM, towers); other models keep their own
    shared = shared_prefix_enabled(shared_prefix) and _is_multimodal_lm(model)
    rows = []
    for s in range(0, len(records), batch_size):
        chunk = list(records[s:s + batch_size])
        prompts = [record_prompt(r) for r in chunk]
        inputs = [load_inputs(r) for r in chunk]
        if scoring == "loglik":
            opts = [record_options(r) for r in chunk]
            scores = (model.score_options_batch(prompts, inputs, opts, shared_prefix=True) if shared
                      else model.score_options_batch(prompts, inputs, opts))
            preds = [(LETTERS[int(torch.argmax(sc))] if r.get("choices") else o[int(torch.argmax(sc))])
                     for r, o, sc in zip(chunk, opts, scores)]
        else:
            outs = model.generate_batch(prompts, inputs, max_new_tokens=max_new_tokens)
            preds = [generated_letter(o, r.get("choices")) if is_letter_record(r) else o.strip()
                     for o, r in zip(outs, chunk)]
        for r, p in zip(chunk, preds):
            g = record_gold(r)
            rows.append({"id": r["id"], "subset": r.get("subset", ""), "gold": g, "pred": p,
                         "correct": bool(p == g), "method": method, "seed": seed, "scoring": scoring,
                         "task": r.get("task", "")})
    return pd.DataFrame(rows, columns=PRED_COLUMNS + ["task"])


def accuracy(df: pd.DataFrame) -> float:
    """Accuracy in percent (correct / total x 100)."""
    if len(df) == 0:
        raise ValueError("accuracy of an empty prediction table")
    return 100.0 * float(df["correct"].mean())


def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (as fractions in [0, 1])."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    z = stats.norm.ppf(0.5 + conf / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: Sequence[float], conf: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds. One value -> (v, nan, nan)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("t_interval of no values")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + conf / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact two-sided McNemar test on paired outcomes of the same items.

    ``b`` = items A got right and B wrong, ``c`` = the reverse; p-value of a two-sided binomial
    test of ``b`` successes in ``b + c`` trials with p = 0.5 (1.0 when b + c = 0).
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape:
        raise ValueError(f"paired outcomes differ in length: {a.shape} vs {bb.shape}")
    b = int((a & ~bb).sum())
    c = int((~a & bb).sum())
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "n": int(a.size), "pvalue": p}


def paired_test(df: pd.DataFrame, method_a: str, method_b: str, **filters) -> dict:
    """McNemar between two methods' predictions on the same items (joined on id, seed, scoring)."""
    d = df
    for k, v in filters.items():
        d = d[d[k] == v]
    a = d[d["method"] == method_a]
    b = d[d["method"] == method_b]
    j = a.merge(b, on=["id", "seed", "scoring"], suffixes=("_a", "_b"))
    if len(j) == 0:
        raise ValueError(f"no common items between {method_a!r} and {method_b!r}")
    return mcnemar_exact(j["correct_a"].tolist(), j["correct_b"].tolist())


def summarize(df: pd.DataFrame, by: Iterable[str] = ("method", "subset", "scoring"), conf: float = 0.95
              ) -> pd.DataFrame:
    """Per group: accuracy per seed, then the mean with a t-interval over seeds, plus the Wilson
    interval of the pooled counts. Columns: *by, n_seeds, n_items, acc, t_low, t_high, wilson_low,
    wilson_high (percent)."""
    by = list(by)
    rows = []
    for key, g in df.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        per_seed = g.groupby("seed", dropna=False)["correct"].mean() * 100
        m, lo, hi = t_interval(per_seed.tolist(), conf)
        k, n = int(g["correct"].sum()), len(g)
        wl, wh = wilson_interval(k, n, conf)
        rows.append(dict(zip(by, key), n_seeds=len(per_seed), n_items=n, acc=m, t_low=lo, t_high=hi,
                         wilson_low=100 * wl, wilson_high=100 * wh))
    return pd.DataFrame(rows)
