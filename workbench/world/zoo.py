"""The model zoo as built on disk (``zoo/<preset>/``): :class:`Zoo` reads its manifest ``zoo.json``,
names its experts, says which folder holds what (:meth:`Zoo.llm_folders`) and loads them (LLM,
towers, tokenizer, evaluation records); :func:`ensure_zoo` builds a preset's zoo first where
needed (:mod:`workbench.world.scheduler`). The layout itself is written by the recipes
(:mod:`workbench.world.recipes`, :mod:`workbench.world.damc`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .concepts import MODALITIES, PLACEHOLDERS
from .mcub import load_modal_input, read_records, record_inputs
from .presets import PRESETS, data_root, zoo_root


def _load_llm(path: Path):
    from transformers import LlamaForCausalLM
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no HF model in {path}")
    llm = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    llm.eval()
    return llm


#: the modality family's base LLM (its theta_0): the text-pretrained LM ``base/`` instruction-tuned on
#: text versions of the experts' questions (the ``instruct`` job, folder ``instruct/``; see
#: :func:`workbench.world.recipes._job_instruct`). ``base/`` itself is the pretrained LM both families
#: start from (the capability family's instruct base VLM is built from it).
MODALITY_BASE = "instruct"

#: the sub-folders of an expert that can hold its LLM weights (see :meth:`Zoo.llm_folders`)
LLM_FOLDERS = ("llm", "adapter", "adapter_text", "adapter_modality", "llm_text", "llm_modality")


def _data_dir(zoo_path: Path, manifest: Mapping) -> Path:
    """Where a zoo's generated inputs are: the folder its build recorded (``zoo.json``'s absolute ``data_dir``). Where
    that folder is gone and the zoo is its preset's zoo of this checkout (copied or moved here together with
    ``data/generated/<preset>/``, or its checkout renamed), this checkout's inputs of the preset; otherwise the
    recorded folder, which the first record read then names as missing."""
    recorded = Path(manifest["data_dir"])
    preset = manifest.get("preset")
    if not recorded.is_dir() and preset in PRESETS:
        here = data_root(preset)
        if here.is_dir() and zoo_path.resolve() == zoo_root(preset).resolve():
            return here
    return recorded


class Zoo:
    """A built zoo on disk. ``Zoo(path)`` or ``Zoo.for_preset("tiny")``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mpath = self.path / "zoo.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no zoo manifest {mpath} (build it with `python -m workbench zoo`)")
        self.manifest: dict = json.loads(mpath.read_text())
        self.data_dir = _data_dir(self.path, self.manifest)

    @classmethod
    def for_preset(cls, preset: str) -> "Zoo":
        return cls(zoo_root(preset))

    @classmethod
    def coerce(cls, zoo: "Zoo | str | Path | None", preset: str | None = None) -> "Zoo":
        """``zoo`` itself when it is a :class:`Zoo` (anything with a ``manifest``), else the zoo in the
        folder ``zoo``, else the zoo of the preset named ``zoo``; ``None``: the zoo of ``preset``."""
        if hasattr(zoo, "manifest"):
            return zoo
        if zoo is None:
            if preset is None:
                raise ValueError("Zoo.coerce: give a zoo, its folder, or a preset")
            return cls.for_preset(preset)
        if isinstance(zoo, str) and not Path(zoo).is_dir() and zoo in PRESETS:
            return cls.for_preset(zoo)
        return cls(zoo)

    @property
    def base_path(self) -> Path:
        """The modality family's base LLM (theta_0 of NaiveMC, DAMC, MMER and the modality merges)."""
        return self.path / MODALITY_BASE

    def job_hash(self, job: str) -> str | None:
        """The cache key of zoo job ``job`` as built (``None`` if the manifest has no such job)."""
        return self.manifest.get("jobs", {}).get(job, {}).get("hash")

    @property
    def base_hash(self) -> str | None:
        """The cache key of the job that wrote :attr:`base_path` (studies key their caches on it)."""
        return self.job_hash(MODALITY_BASE)

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["config"]["modalities"])

    def tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self.path / "tokenizer")

    def load_base_llm(self):
        return _load_llm(self.base_path)

    def base_llm_path(self, name: str) -> Path:
        """The LLM folder model ``name`` was fine-tuned from (its theta_0): :attr:`base_path` for the
        modality family, the instruct base VLM's ``capability/base/llm`` for the capability family."""
        return self.path / self.info(name).get("base", MODALITY_BASE)

    def experts(self, modality: str | None = None, kind: str | None = None, seed: int | None = None,
                family: str = "modality", task: str | None = None) -> list[str]:
        """Names of experts (``family="modality"``: projector/full/lora/damc; ``"capability"``)."""
        out = []
        for name, e in self.manifest["models"].items():
            fam = e.get("family", "modality")
            if e.get("kind") in ("oracle", "base-vlm", "mixture") or fam != family:
                continue
            if modality is not None and e.get("modality") != modality:
                continue
            if kind is not None and e.get("kind") != kind:
                continue
            if seed is not None and e.get("seed") != seed:
                continue
            if task is not None and e.get("task") != task:
                continue
            out.append(name)
        return sorted(out)

    def info(self, name: str) -> dict:
        if name not in self.manifest["models"]:
            raise KeyError(f"no model {name!r} in {self.path / 'zoo.json'}")
        return self.manifest["models"][name]

    def expert_path(self, name: str) -> Path:
        return self.path / self.info(name)["path"]

    def llm_path(self, name: str) -> Path:
        """The HF Llama folder of a full-FT expert/oracle (:attr:`base_path` for projector-only experts)."""
        p = self.expert_path(name)
        if (p / "llm").exists():
            return p / "llm"
        if self.info(name).get("kind") == "projector":
            return self.base_path
        raise FileNotFoundError(f"{p} has no llm/ folder (LoRA experts: adapter_path)")

    def llm_folders(self, name: str) -> dict[str, Path]:
        """The folders holding the LLM weights of expert ``name``, by role (the keyword names of
        :class:`workbench.compose.ExpertSource`): ``llm`` (full fine-tuning, an HF Llama folder),
        ``adapter`` (a peft LoRA folder), ``adapter_text`` + ``adapter_modality`` (DAMC's two LoRA
        routes) or ``llm_text`` + ``llm_modality`` (DAMC's full-weight option); none for a
        projector-only expert (its LLM is :attr:`base_path`)."""
        p = self.expert_path(name)
        return {role: p / role for role in LLM_FOLDERS if (p / role).is_dir()}

    def adapter_path(self, name: str) -> Path:
        p = self.expert_path(name) / "adapter"
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist ({name} is not a LoRA expert)")
        return p

    def load_encoder(self, modality: str):
        from .encoders import load_encoder
        return load_encoder(self.path / ("capability/encoder" if modality == "capability" else f"encoders/{modality}"))

    def load_llm(self, name: str):
        """An expert's LLM as a plain LlamaForCausalLM (LoRA adapters merged into the base)."""
        e = self.info(name)
        p = self.expert_path(name)
        if (p / "llm").exists():
            return _load_llm(p / "llm")
        if (p / "adapter").exists():
            from peft import PeftModel
            base = _load_llm(self.base_llm_path(name))
            return PeftModel.from_pretrained(base, str(p / "adapter")).merge_and_unload().eval()
        if e.get("kind") == "projector":
            return self.load_base_llm()
        raise FileNotFoundError(f"{p}: neither llm/ nor adapter/")

    def load_tower(self, name_or_modality: str, seed: int = 0, kind: str = "full"):
        """The tower (frozen encoder + projector) of an expert; a modality name means that
        modality's ``<modality>-<kind>-s<seed>`` expert."""
        from .encoders import Tower, load_projector
        name = name_or_modality
        if name in MODALITIES and name not in self.manifest["models"]:
            name = f"{name}-{kind}-s{seed}"
        e = self.info(name)
        p = self.expert_path(name)
        if e.get("family") == "capability" or e.get("kind") == "base-vlm":
            return Tower(self.load_encoder("capability"), load_projector(p / "projector"))
        return Tower(self.load_encoder(e["modality"]), load_projector(p / "projector"))

    def load_expert(self, name: str):
        """``MultimodalLM`` of an expert (its LLM and tower), the oracle (all towers) or the base VLM."""
        from .encoders import Tower, load_projector
        from ..mllm import MultimodalLM
        e = self.info(name)
        tok = self.tokenizer()
        if e.get("kind") == "oracle":
            p = self.expert_path(name)
            towers = {m: Tower(self.load_encoder(m), load_projector(p / "projectors" / m)) for m in e["modalities"]}
            return MultimodalLM(self.load_llm(name), tok, towers, {m: PLACEHOLDERS[m] for m in towers})
        mod = "image" if (e.get("family") == "capability" or e.get("kind") == "base-vlm") else e["modality"]
        return MultimodalLM(self.load_llm(name), tok, {mod: self.load_tower(name)}, {mod: PLACEHOLDERS[mod]})

    def summary(self, scoring: str = "loglik"):
        """Own-task scores per (family, modality/task, kind): mean over seeds with a 95% t-interval,
        for the tuned expert and for its base LLM (projector only), and the gap. A DataFrame."""
        import pandas as pd
        from ..statistics import t_interval
        rows = []
        by: dict[tuple, list[dict]] = {}
        for name, e in self.manifest["models"].items():
            if e.get("kind") in ("full", "lora", "damc", "projector"):
                key = (e.get("family", "modality"), e.get("modality") or e.get("task"), e["kind"])
                by.setdefault(key, []).append(e)
        for (fam, what, kind), es in sorted(by.items()):
            tuned = [e["own_task"][scoring] for e in es]
            m, lo, hi = t_interval(tuned)
            row = {"family": fam, "modality_or_task": what, "kind": kind, "n_seeds": len(es), "tuned": m,
                   "tuned_low": lo, "tuned_high": hi}
            if all("own_task_base_llm" in e for e in es):
                base = [e["own_task_base_llm"][scoring] for e in es]
                gm, glo, ghi = t_interval([t - b for t, b in zip(tuned, base)])
                row.update(base_llm=float(np.mean(base)), gap=gm, gap_low=glo, gap_high=ghi)
            row["train_seconds"] = float(np.mean([e.get("seconds", float("nan")) for e in es]))
            rows.append(row)
        return pd.DataFrame(rows)

    # ---- evaluation sets
    def records(self, relpath: str) -> list[dict]:
        return read_records(self.data_dir / relpath)

    def mcub(self, subset: str) -> list[dict]:
        """``subset`` in mcub-2, mcub-3, mcub-4, val (records; ``record["subset"]`` names the combo)."""
        return self.records(f"mcub/{subset}.json")

    def own_eval(self, modality: str) -> list[dict]:
        return self.records(f"eval/{modality}.json")

    def capability_eval(self, task: str) -> list[dict]:
        return self.records(f"capability/{task}.json")

    def load_inputs(self, record: Mapping) -> dict[str, list[torch.Tensor]]:
        return record_inputs(record, self.data_dir)

    def load_modal_input(self, path: str | Path) -> torch.Tensor:
        return load_modal_input(path, self.data_dir)


def ensure_zoo(preset: str = "tiny", out: str | Path | None = None, jobs: int = 2) -> Zoo:
    """The zoo of ``preset``, built if missing or stale (instant when every job's key matches).
    Tests and notebooks use this (``ensure_zoo("tiny")``)."""
    from .scheduler import build_zoo

    return build_zoo(preset, out=out, jobs=jobs, progress=False)


def load_expert(zoo_dir: str | Path, name: str):
    return Zoo(zoo_dir).load_expert(name)


def load_tower(zoo_dir: str | Path, name_or_modality: str, **kw):
    return Zoo(zoo_dir).load_tower(name_or_modality, **kw)
