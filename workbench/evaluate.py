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

The statistics (intervals, McNemar, accuracy intervals) live in :mod:`workbench.statistics` only.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from .statistics import mcnemar_exact

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


#: The modules whose code produces a cached prediction: the compositions and their λ searches, the merge methods (the
#: ``merging`` package) and their engine, this scorer and the model's option scorer (``mllm.py``). Their digest is part of every
#: results-cache key (:mod:`workbench.studies.composition`, :mod:`workbench.studies.merging_benchmark`), so a fixed method never
#: reuses predictions of the old code.
PREDICTION_CODE = ("compose.py", "studies/search.py", "merging", "engine.py", "evaluate.py", "mllm.py")


@functools.lru_cache(maxsize=None)
def code_digest(root: str | Path | None = None, files: tuple[str, ...] = PREDICTION_CODE) -> str:
    """sha256 (16 hex digits) over the names and bytes of ``files`` in ``root`` (default: this package);
    a folder entry stands for every ``*.py`` directly in it, sorted by name (each hashed under its path
    ``folder/file.py``); read once per process."""
    folder = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for entry in files:
        path = folder / entry
        if path.is_dir():
            members = [f"{entry}/{f.name}" for f in sorted(path.glob("*.py"), key=lambda f: f.name)]
            if not members:
                raise FileNotFoundError(f"code_digest: {path} holds no *.py file")
        else:
            members = [entry]
        for name in members:
            f = folder / name
            if not f.is_file():
                raise FileNotFoundError(f"code_digest: {f} is missing")
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


#: Records per forward call of :func:`predict`. Measured on the mini zoo (MCUB-mini-3, 600 items, 2 CPU
#: threads, 2026-12-06): against 32, NaiveMC's log-likelihood scoring 13% and MMER's 7% faster at 64 (the
#: same predictions); at 128-256 MMER's routed layers slow down again.
EVAL_BATCH = 64


def predict(model, records: Sequence[Mapping], load_inputs: Callable[[Mapping], dict],
            scoring: str = "loglik", method: str = "", seed: int | None = None, batch_size: int = EVAL_BATCH,
            max_new_tokens: int = 8, shared_prefix: bool | None = None) -> pd.DataFrame:
    """Score ``model`` (a :class:`workbench.mllm.MultimodalLM`) on ``records``.

    ``load_inputs(record) -> {modality: [tensor, ...]}`` loads a record's inputs. Returns one row
    per record with :data:`PRED_COLUMNS` (plus ``task``). ``shared_prefix`` (default
    :data:`SHARED_PREFIX`, on): log-likelihoods by ``model.score_options_batch(shared_prefix=True)``
    (each prompt once, options on its KV cache) instead of the per-option reference.
    """
    return predict_scorings(model, records, load_inputs, (scoring,), method=method, seed=seed, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, shared_prefix=shared_prefix)[scoring]


def predict_scorings(model, records: Sequence[Mapping], load_inputs: Callable[[Mapping], dict],
                     scorings: Sequence[str] = ("loglik", "generate"), method: str = "", seed: int | None = None,
                     batch_size: int = EVAL_BATCH, max_new_tokens: int = 8,
                     shared_prefix: bool | None = None) -> dict[str, pd.DataFrame]:
    """:func:`predict` for each of ``scorings``: ``{scoring: table}``. With both scorings and the
    shared-prefix scorer, each prompt runs through the LLM once for both
    (``model.score_and_generate_batch``: the options are scored on its KV cache and the greedy answer
    decoded from it), about half the prompt work of two :func:`predict` calls and their predictions:
    bit for bit where a batch's prompts share one length (the mini zoo's benchmark files); with
    prompts of several lengths the answers are decoded in batches of ``batch_size // 4`` prompts
    (generation alone: ``batch_size``), other left padding, sums equal to float rounding."""
    bad = [s for s in scorings if s not in ("loglik", "generate")]
    if bad or not scorings:
        raise ValueError(f"scoring must be 'loglik' or 'generate', got {bad or list(scorings)!r}")
    # the shared-prefix scorer needs a MultimodalLM (tokenizer, LLM, towers); other models keep their own
    shared = shared_prefix_enabled(shared_prefix) and _is_multimodal_lm(model)
    joint = shared and set(scorings) == {"loglik", "generate"}
    rows: dict[str, list[dict]] = {s: [] for s in scorings}
    for s in range(0, len(records), batch_size):
        chunk = list(records[s:s + batch_size])
        prompts = [record_prompt(r) for r in chunk]
        inputs = [load_inputs(r) for r in chunk]
        opts = [record_options(r) for r in chunk] if "loglik" in scorings else []
        preds: dict[str, list[str]] = {}
        if joint:
            scores, outs = model.score_and_generate_batch(prompts, inputs, opts, max_new_tokens=max_new_tokens,
                                                          batch_size=max(1, batch_size // 4))
            preds["loglik"], preds["generate"] = _option_predictions(chunk, opts, scores), _generated(chunk, outs)
        elif "loglik" in scorings:
            scores = (model.score_options_batch(prompts, inputs, opts, shared_prefix=True) if shared
                      else model.score_options_batch(prompts, inputs, opts))
            preds["loglik"] = _option_predictions(chunk, opts, scores)
        if "generate" in scorings and not joint:
            preds["generate"] = _generated(chunk, model.generate_batch(prompts, inputs, max_new_tokens=max_new_tokens))
        for scoring, ps in preds.items():
            for r, p in zip(chunk, ps):
                g = record_gold(r)
                rows[scoring].append({"id": r["id"], "subset": r.get("subset", ""), "gold": g, "pred": p,
                                      "correct": bool(p == g), "method": method, "seed": seed, "scoring": scoring,
                                      "task": r.get("task", "")})
    return {s: pd.DataFrame(rows[s], columns=PRED_COLUMNS + ["task"]) for s in scorings}


def _option_predictions(chunk: Sequence[Mapping], options: Sequence[Sequence[str]], scores) -> list[str]:
    """The best-scored option of each record: its letter where the record has lettered choices, else its text."""
    return [(LETTERS[int(torch.argmax(sc))] if r.get("choices") else o[int(torch.argmax(sc))])
            for r, o, sc in zip(chunk, options, scores)]


def _generated(chunk: Sequence[Mapping], outs: Sequence[str]) -> list[str]:
    """Each record's generated answer: the letter it names for a lettered record, else the stripped text."""
    return [generated_letter(o, r.get("choices")) if is_letter_record(r) else o.strip() for o, r in zip(outs, chunk)]


def accuracy(df: pd.DataFrame) -> float:
    """Accuracy in percent (correct / total x 100)."""
    if len(df) == 0:
        raise ValueError("accuracy of an empty prediction table")
    return 100.0 * float(df["correct"].mean())


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
