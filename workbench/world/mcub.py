"""MCUB-mini: MCUB-format records (methods.md section 5), their schema, and the evaluation sets.

Written under the data root (``data/generated/<preset>/``) by two zoo jobs, each owning its folders:

- the ``data`` job (:func:`build_model_evals`: the sets the zoo's own jobs score their models on):
  ``eval/<modality>.json`` (each modality expert's own tasks: the retention denominators) and
  ``capability/<task>.json`` (the capability family's per-task evaluation sets), their inputs
  under ``inputs/``;
- the ``data-mcub`` job (:func:`build_mcub`: read by the notebooks only, so resizing them retrains
  nothing): ``mcub/mcub-2.json`` (the 6 pairs), ``mcub/mcub-3.json`` (V+I+A, V+A+P, V+I+P, I+A+P),
  ``mcub/mcub-4.json`` - the same number of items for every combination of modalities - and
  ``mcub/val.json`` (a validation split over 2-4 modalities; for DAMC's lambda search and MMER's
  lambda/alpha), their inputs under ``mcub/inputs/``.

Paths in the records are relative to the data root.
"""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Iterable, Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .concepts import (CAP_TASKS, CONCEPTS, LETTERS, MODALITIES, PLACEHOLDERS, RECORD_KEY_TO_MODALITY,
                       RECORD_KEYS)
from .tasks import Example, OWN_TASKS, capability_question, modality_question, multimodal_common

SHORT = {"video": "V", "image": "I", "audio": "A", "point": "P"}
MCUB3 = (("video", "image", "audio"), ("video", "audio", "point"), ("video", "image", "point"),
         ("image", "audio", "point"))
MCUB2 = tuple(itertools.combinations(MODALITIES, 2))


class Turn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class MCUBRecord(BaseModel):
    """One MCUB-format record; extra fields (``subset``, ``task``, ``options``, ``truth``) allowed."""

    model_config = ConfigDict(extra="allow")
    id: str
    conversations: list[Turn]
    modal_inputs: dict[str, list[str]]

    @field_validator("conversations")
    @classmethod
    def _two_turns(cls, v: list[Turn]) -> list[Turn]:
        if len(v) != 2 or v[0].from_ != "human" or v[1].from_ != "gpt":
            raise ValueError("conversations must be [human, gpt]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "MCUBRecord":
        prompt = self.conversations[0].value
        for key, paths in self.modal_inputs.items():
            if key not in RECORD_KEY_TO_MODALITY:
                raise ValueError(f"unknown modal_inputs key {key!r}; expected {sorted(RECORD_KEY_TO_MODALITY)}")
            ph = PLACEHOLDERS[RECORD_KEY_TO_MODALITY[key]]
            if prompt.count(ph) != len(paths):
                raise ValueError(f"{len(paths)} {key} inputs but {prompt.count(ph)} {ph} placeholders")
        for m, ph in PLACEHOLDERS.items():
            if ph in prompt and RECORD_KEYS[m] not in self.modal_inputs:
                raise ValueError(f"prompt has {ph} but modal_inputs has no {RECORD_KEYS[m]!r}")
        gold = self.conversations[1].value
        choices = getattr(self, "choices", None)
        if choices is not None and len(choices) != len(LETTERS):
            raise ValueError(f"choices must list {len(LETTERS)} option texts, got {choices}")
        opts = getattr(self, "options", None) or list(LETTERS)
        if gold not in opts:
            raise ValueError(f"gold answer {gold!r} not among options {opts}")
        return self


def validate_record(rec: Mapping) -> MCUBRecord:
    return MCUBRecord.model_validate(dict(rec))


def record_json_schema() -> dict:
    return MCUBRecord.model_json_schema()


def save_input(root: Path, modality: str, rid: str, raw: np.ndarray, folder: str = "inputs") -> str:
    """Write one input as ``root/folder/<modality>/<rid>.npy``; returns its path relative to ``root``."""
    rel = Path(folder) / modality / f"{rid}.npy"
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    np.save(p, np.asarray(raw, dtype=np.float32))
    return rel.as_posix()


def load_modal_input(path: str | Path, root: str | Path | None = None) -> torch.Tensor:
    """Load one generated input file (``.npy`` or ``.pt``) as a float32 tensor."""
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    if not p.exists():
        raise FileNotFoundError(f"modal input file not found: {p}")
    if p.suffix == ".npy":
        return torch.from_numpy(np.load(p)).float()
    if p.suffix == ".pt":
        return torch.load(p, weights_only=True).float()
    raise ValueError(f"unsupported modal input file type: {p}")


def record_inputs(rec: Mapping, root: str | Path | None = None) -> dict[str, list[torch.Tensor]]:
    """``{modality: [tensor, ...]}`` for a record (``"vision"`` -> ``"image"``)."""
    return {RECORD_KEY_TO_MODALITY[k]: [load_modal_input(p, root) for p in v]
            for k, v in rec["modal_inputs"].items()}


def example_to_record(ex: Example, rid: str, subset: str, root: Path, inputs: str = "inputs") -> dict:
    """``ex`` as a validated MCUB record with id ``rid``; its inputs written under ``root/<inputs>``
    (:func:`save_input`), the record's ``modal_inputs`` naming them relative to ``root``."""
    mi: dict[str, list[str]] = {}
    for j, (m, raw) in enumerate(ex.inputs):
        mi.setdefault(RECORD_KEYS[m], []).append(save_input(root, m, f"{rid}-{j}", raw, inputs))
    rec = {"id": rid, "subset": subset, "task": ex.task,
           "conversations": [{"from": "human", "value": ex.prompt},
                             {"from": "gpt", "value": ex.letter if ex.choices else ex.answer}],
           "modal_inputs": mi}
    if ex.choices:
        rec["choices"] = list(ex.choices)
        rec["answer_text"] = ex.answer
    elif ex.options:
        rec["options"] = list(ex.options)
    if ex.scenes:
        rec["scenes"] = [[CONCEPTS[k] if k >= 0 else None for k in s] for s in ex.scenes]
    validate_record(rec)
    return rec


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def read_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"record file not found: {p}")
    return json.loads(p.read_text())


#: The data root's folders each data job writes (and removes before writing): nothing else is touched.
MODEL_EVAL_FOLDERS = ("eval", "capability", "inputs")
MCUB_FOLDERS = ("mcub",)


def _clear(root: Path, folders: Iterable[str]) -> None:
    for f in folders:
        shutil.rmtree(root / f, ignore_errors=True)


def build_mcub(root: str | Path, n_per_combination: int, n_val: int, seed: int,
               modalities: Iterable[str] = MODALITIES) -> dict:
    """Write MCUB-mini's test and validation sets under ``root/mcub``; returns ``{file: n_records}``.

    Sizes: ``n_per_combination`` test items for every combination of the modalities (``mcub-2``: the
    6 pairs, ``mcub-3``: the 4 triples, ``mcub-4``: the quadruple - 3600 / 2400 / 600 items for 600
    per combination and four modalities); ``n_val`` validation items per combination in
    ``mcub/val.json`` (a composition's search uses the items of its own modalities, so each pair's
    search sees ``n_val`` items, a triple's ``4 x n_val``).

    Seeds: everything derives from ``seed`` via ``numpy.random.default_rng([seed, k, ...])`` with a
    fixed k per set, so training streams (other seeds) never share noise with the evaluation sets;
    a combination's items are one stream, so a larger ``n_per_combination`` keeps the smaller's items
    as its first ones.
    """
    root = Path(root)
    _clear(root, MCUB_FOLDERS)
    mods = [m for m in MODALITIES if m in set(modalities)]
    out: dict[str, int] = {}

    def common_set(name: str, combos: list[tuple[str, ...]], k: int) -> None:
        recs = []
        for ci, combo in enumerate(combos):
            rng = np.random.default_rng([seed, k, ci])
            order = [m for m in MODALITIES if m in combo]  # prompt order: image, audio, video, point
            tag = "+".join(SHORT[m] for m in combo)
            for i in range(n_per_combination):
                ex = multimodal_common(order, rng)
                recs.append(example_to_record(ex, f"{name}-{tag}-{i:04d}", f"{name}:{tag}", root, "mcub/inputs"))
        _write(root / "mcub" / f"{name}.json", recs)
        out[f"mcub/{name}.json"] = len(recs)

    pairs = [p for p in MCUB2 if set(p) <= set(mods)]
    triples = [t for t in MCUB3 if set(t) <= set(mods)]
    if pairs:
        common_set("mcub-2", pairs, 2)
    if triples:
        common_set("mcub-3", triples, 3)
    if len(mods) == 4:
        common_set("mcub-4", [tuple(mods)], 4)
    # validation split: a mixture over all the combinations above, other seeds
    combos = pairs + triples + ([tuple(mods)] if len(mods) == 4 else [])
    if combos:
        rng = np.random.default_rng([seed, 9])
        recs = []
        for i in range(n_val * len(combos)):
            combo = combos[i % len(combos)]
            order = [m for m in MODALITIES if m in combo]
            tag = "+".join(SHORT[m] for m in combo)
            recs.append(example_to_record(multimodal_common(order, rng), f"val-{tag}-{i:04d}", f"val:{tag}", root,
                                          "mcub/inputs"))
        _write(root / "mcub" / "val.json", recs)
        out["mcub/val.json"] = len(recs)
    return out


def build_model_evals(root: str | Path, n_own: int, n_capability: int, seed: int,
                      modalities: Iterable[str] = MODALITIES, capability_tasks: Iterable[str] = CAP_TASKS) -> dict:
    """Write the sets the zoo's jobs score their models on; returns ``{file: n_records}``:
    ``n_own`` own-task items per modality (``eval/<modality>.json``, the tasks of
    :data:`~workbench.world.tasks.OWN_TASKS` in turn) and ``n_capability`` items per capability task
    (``capability/<task>.json``, split into validation and test by the merging benchmark).
    Seeds as :func:`build_mcub`'s."""
    root = Path(root)
    _clear(root, MODEL_EVAL_FOLDERS)
    mods = [m for m in MODALITIES if m in set(modalities)]
    out: dict[str, int] = {}
    for mi, m in enumerate(mods):
        rng = np.random.default_rng([seed, 20, mi])
        tasks = OWN_TASKS[m]
        recs = [example_to_record(modality_question(m, tasks[i % len(tasks)], rng), f"own-{m}-{i:04d}",
                                  f"own:{m}", root) for i in range(n_own)]
        _write(root / "eval" / f"{m}.json", recs)
        out[f"eval/{m}.json"] = len(recs)
    for ti, t in enumerate(capability_tasks):
        rng = np.random.default_rng([seed, 30, ti])
        recs = []
        for i in range(n_capability):
            ex = capability_question(t, rng)
            recs.append(example_to_record(ex, f"cap-{t}-{i:04d}", f"capability:{t}", root))
        _write(root / "capability" / f"{t}.json", recs)
        out[f"capability/{t}.json"] = len(recs)
    return out
