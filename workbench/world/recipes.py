"""The model zoo: every model of the miniature world, built deterministically from seeds, cached per
model by a hash of its configuration, described by ``zoo.json``.

Layout (``zoo/<preset>/``, env ``WORKBENCH_ZOO`` overrides the parent folder)::

    zoo.json                          manifest: every model, its scores, params, seconds, hash
    tokenizer/                        HF PreTrainedTokenizerFast
    base/                             HF LlamaForCausalLM (text-only pretrained) + tokenizer
    encoders/<modality>/              frozen encoder (model.safetensors + config.json)
    experts/<name>/expert.json        {"modality", "kind": "projector"|"full"|"lora"|"damc", "seed", ...}
    experts/<name>/llm/ | adapter/    HF Llama folder (full FT) | peft LoRA folder
    experts/<name>/projector/         model.safetensors + config.json
    oracle-s<seed>/                   llm/ + projectors/<modality>/ (joint training on all modalities)
    capability/encoder/               the capability family's vision encoder
    capability/base/                  base VLM: projector/ (its LLM is base/)
    capability/experts/<task>-<full|lora>-s<seed>/

Generated inputs and evaluation records live under ``data/generated/<preset>/``.

Job registry: :func:`register_job_kind` adds a kind (e.g. ``"damc"``) with its :class:`Recipe` and a
planner that returns the kind's jobs for a preset; :func:`build_zoo` runs every planned job whose
key changed, in parallel worker processes (one thread each).

Cache key (:func:`job_hash`): a job is rebuilt when its key changes. The key holds the job's
declared recipe - its kind, the recipe's ``version`` (an explicit number, bumped by hand when a
recipe changes meaning without its source changing), its configuration - the keys of the jobs it
depends on, and the digest of its *training path* (:func:`training_path_digest`): the source text
of the build function and of each function, class, method or constant the recipe declares as
what the job runs to produce its weights (``Recipe.training_path``, ``"module:qualname"``
entries, each hashed on its own with ``inspect.getsource``). Hence moving a function to another
file, editing a docstring of a module, or editing code off the path (``MultimodalLM.generate``,
the :class:`Zoo` reader, evaluation) keeps every key, while an edit inside a training function
rebuilds the jobs that run it and those downstream. A declared entry that no longer exists is an
error, not a silent omission. When a recipe starts to use a new function, add it to the path.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import inspect
import json
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .concepts import CAP_TASKS, MODALITIES, PLACEHOLDERS
from .mcub import build_datasets, read_records, record_inputs, load_modal_input  # noqa: F401

WORLD_VERSION = "1"
REPO_ROOT = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    "default": {
        "modalities": list(MODALITIES),
        "seeds": [0, 1, 2],
        "arch": {"hidden": 128, "layers": 4, "heads": 4, "ffn": 384},
        "base": {"steps": 500, "batch": 64, "lr": 2e-3, "seed": 0},
        "encoder": {"steps": {"image": 500, "audio": 200, "video": 250, "point": 400}, "batch": 64, "lr": 2e-3,
                    "seed": 0},
        # steps sized for the 30-minute build budget on 2 cores (issue #3). Until 2026-11-23 the
        # preset used projector 120, expert 300, oracle 450, capability 300 / 250 caption steps
        # (86 min). Measured from nothing since: expert 180, oracle 270, projector 80 with the
        # capability family at 180 / 150: 23.8 min, but its VQA expert only 3 points above the base
        # VLM (38.7 vs 35.3); the same with capability 300 / 250: 30.0 min. Hence these values.
        "projector": {"steps": 60, "batch": 64, "lr": 3e-3},
        "expert": {"steps": 165, "batch": 64, "lr_llm": 5e-4, "lr_proj": 1e-3, "replay": 0.25, "caption": 0.1},
        # LoRA modality experts: seed 0 only (no table reports them with intervals; 08/09 can profile them)
        "lora": {"enabled": True, "r": 16, "alpha": 32, "lr": 2e-3, "seeds": [0]},
        "oracle": {"seeds": [0, 1, 2], "steps": 210, "batch": 64, "multimodal": 0.25, "replay": 0.2},
        "capability": {"tasks": list(CAP_TASKS), "seeds": [0], "lora": True, "enc_steps": 300,
                       "caption_steps": 220, "steps": 270, "batch": 64, "lr_llm": 1e-3, "lr_proj": 2e-3,
                       "train_projector": False},
        "data": {"n_per_subset": 60, "n_own": 200, "n_val": 120, "n_capability": 150, "seed": 12345},
        "eval_generate": True,
    },
    "tiny": {
        "modalities": ["image", "audio"],
        "seeds": [0],
        "arch": {"hidden": 64, "layers": 2, "heads": 2, "ffn": 192},
        "base": {"steps": 250, "batch": 32, "lr": 3e-3, "seed": 0},
        "encoder": {"steps": {"image": 250, "audio": 100}, "batch": 32, "lr": 3e-3, "seed": 0},
        "projector": {"steps": 40, "batch": 32, "lr": 3e-3},
        "expert": {"steps": 120, "batch": 32, "lr_llm": 1e-3, "lr_proj": 2e-3, "replay": 0.25, "caption": 0.1},
        "lora": {"enabled": False, "r": 8, "alpha": 16, "lr": 3e-3},
        "oracle": {"seeds": [], "steps": 150, "batch": 32, "multimodal": 0.25, "replay": 0.2},
        "capability": {"tasks": ["vqa", "chart"], "seeds": [0], "lora": False, "enc_steps": 100,
                       "caption_steps": 60, "steps": 120, "batch": 32, "lr_llm": 1e-3, "lr_proj": 3e-3,
                       "train_projector": False},
        "data": {"n_per_subset": 20, "n_own": 60, "n_val": 20, "n_capability": 40, "seed": 12345},
        "eval_generate": True,
    },
}


def zoo_root(preset: str, out: str | Path | None = None) -> Path:
    if out is not None:
        return Path(out)
    parent = os.environ.get("WORKBENCH_ZOO")
    return (Path(parent) if parent else REPO_ROOT / "zoo") / preset


def data_root(preset: str) -> Path:
    return REPO_ROOT / "data" / "generated" / preset


# ----------------------------------------------------------------------------- job registry
@dataclass
class Job:
    name: str
    kind: str
    config: dict
    deps: list[str] = field(default_factory=list)
    out: str = ""  # folder relative to the zoo root


BuildFn = Callable[[Job, dict], dict]
PlanFn = Callable[[str, dict], list[Job]]


@dataclass(frozen=True)
class Recipe:
    """How a job kind makes its models: ``build`` (runs in a worker), ``version`` (bumped by hand when
    the recipe changes meaning without its training path's source changing, e.g. a new library
    release) and ``training_path``: the ``"module:qualname"`` of every function, class, method and
    constant the job runs to produce its weights (see :func:`training_path_digest`)."""
    build: BuildFn
    version: int
    training_path: tuple[str, ...]


RECIPES: dict[str, Recipe] = {}
PLANNERS: dict[str, PlanFn] = {}


def register_job_kind(kind: str, build_fn: BuildFn, plan_fn: PlanFn | None = None, *, version: int,
                      training_path: Sequence[str]) -> None:
    """Register a job kind. ``build_fn(job, ctx) -> result dict`` runs in a worker and writes into
    ``ctx["root"] / job.out``; ``ctx`` holds ``root`` (zoo dir), ``data`` (data dir), ``preset``,
    ``cfg`` (the preset config), ``results`` (finished jobs' results by name). ``plan_fn(preset, cfg)``
    returns the kind's jobs; their results with a ``"manifest"`` entry are listed in ``zoo.json``.
    ``version`` and ``training_path`` key the kind's jobs (:class:`Recipe`)."""
    RECIPES[kind] = Recipe(build_fn, int(version), tuple(training_path))
    if plan_fn is not None:
        PLANNERS[kind] = plan_fn


def resolve_path_entry(entry: str):
    """The object a training-path entry ``"package.module:Qual.name"`` names (a property: its getter).
    Raises if it does not exist, so a renamed function cannot silently leave the key."""
    import importlib
    module, _, qualname = entry.partition(":")
    if not qualname:
        raise ValueError(f"training path entry {entry!r} is not 'module:qualname'")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    return obj


def path_entry_source(entry: str) -> str:
    """The source text of a training-path entry: a function, class or method's own source
    (``inspect.getsource``), or a module-level constant's assignment statement."""
    obj = resolve_path_entry(entry)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return inspect.getsource(obj)
    module, _, name = entry.partition(":")
    assignments = _module_assignments(module)
    if name not in assignments:
        raise TypeError(f"training path entry {entry!r} is neither a function, a class nor a module constant")
    return assignments[name]


@functools.lru_cache(maxsize=None)
def _module_assignments(module: str) -> dict[str, str]:
    """``{name: source of its assignment}`` of the module-level constants of ``module`` (as imported)."""
    import importlib
    text = inspect.getsource(importlib.import_module(module))
    out = {}
    for node in ast.parse(text).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = ast.get_source_segment(text, node)
    return out


def training_path_digest(kind: str) -> str:
    """Hash of the source text of the build function of ``kind`` and of every entry of its training
    path, in no particular order: independent of the files they live in and of everything else in
    those files."""
    recipe = RECIPES[kind]
    sources = sorted([inspect.getsource(recipe.build)] + [path_entry_source(e) for e in recipe.training_path])
    h = hashlib.sha256()
    for src in sources:
        h.update(hashlib.sha256(src.encode()).digest())
    return h.hexdigest()[:16]


def job_hash(job: Job, dep_hashes: Mapping[str, str], digest: str | None = None) -> str:
    """The cache key of ``job``: the world version, its kind's recipe version and training-path
    digest (``digest``, computed when not given), its configuration and its dependencies' keys."""
    digest = training_path_digest(job.kind) if digest is None else digest
    blob = json.dumps({"v": WORLD_VERSION, "kind": job.kind, "recipe": RECIPES[job.kind].version, "code": digest,
                       "config": job.config, "deps": {d: dep_hashes[d] for d in sorted(job.deps)}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- shared helpers
def _threads() -> None:
    torch.set_num_threads(1)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def _tok(ctx: dict):
    from .tokenizer import load_tokenizer
    return load_tokenizer(Path(ctx["root"]) / "tokenizer")


def _load_llm(path: Path):
    from transformers import LlamaForCausalLM
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no HF model in {path}")
    llm = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    llm.eval()
    return llm


def _save_llm(llm, tok, folder: Path) -> None:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    llm.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def _n_params(m) -> int:
    return int(sum(p.numel() for p in m.parameters()))


def _evaluate(model, records: list[dict], ctx: dict, method: str, seed: int, out_csv: Path | None = None,
              max_new_tokens: int = 8) -> dict:
    """Accuracy (percent) by both scorings; per-item predictions appended to ``out_csv``."""
    import pandas as pd
    from ..evaluate import predict
    root = ctx["data"]
    load = lambda r: record_inputs(r, root)  # noqa: E731
    frames, res = [], {}
    scorings = ["loglik"] + (["generate"] if ctx["cfg"].get("eval_generate", True) else [])
    for sc in scorings:
        df = predict(model, records, load, scoring=sc, method=method, seed=seed, max_new_tokens=max_new_tokens)
        res[sc] = round(100.0 * float(df["correct"].mean()), 2)
        frames.append(df)
    if out_csv is not None:
        df = pd.concat(frames)
        if out_csv.exists():
            df = pd.concat([pd.read_csv(out_csv), df])
        df.to_csv(out_csv, index=False)
    return res


def _sampler_mix(modality_list: Sequence[str], cfg_e: dict, seed: int = 0, multimodal: float = 0.0):
    from .tasks import modality_question, mixture, multimodal_common, own_task_sampler, text_question, OWN_TASKS
    parts = []
    own_w = 1.0 - cfg_e["replay"] - cfg_e.get("caption", 0.0) - multimodal
    for m in modality_list:
        parts.append((own_w / len(modality_list), own_task_sampler(m)))
        if cfg_e.get("caption", 0.0):
            parts.append((cfg_e["caption"] / len(modality_list),
                          (lambda mm: lambda r: modality_question(mm, "caption", r))(m)))
    if multimodal:
        mods = list(modality_list)

        def mm(r):
            k = int(r.integers(2, len(mods) + 1))
            pick = sorted(r.choice(len(mods), size=k, replace=False).tolist())
            return multimodal_common([mods[i] for i in pick], r)
        parts.append((multimodal, mm))
    parts.append((cfg_e["replay"], text_question))
    return mixture(parts)


# ----------------------------------------------------------------------------- job kinds
def _job_tokenizer(job: Job, ctx: dict) -> dict:
    from .tokenizer import save_tokenizer
    tok = save_tokenizer(Path(ctx["root"]) / job.out)
    return {"vocab_size": len(tok)}


def _job_data(job: Job, ctx: dict) -> dict:
    c = job.config
    root = Path(ctx["data"])
    shutil.rmtree(root, ignore_errors=True)
    counts = build_datasets(root, c["n_per_subset"], c["n_own"], c["n_val"], c["n_capability"], c["seed"],
                            c["modalities"], c["capability_tasks"])
    return {"files": counts}


def _job_encoder(job: Job, ctx: dict) -> dict:
    from .encoders import save_module
    from .training import pretrain_capability_encoder, pretrain_encoder
    c = job.config
    if c["modality"] == "capability":
        enc, info = pretrain_capability_encoder(c["steps"], c["batch"], c["lr"], c["seed"], progress=ctx["progress"])
    else:
        enc, info = pretrain_encoder(c["modality"], c["steps"], c["batch"], c["lr"], c["seed"], progress=ctx["progress"])
    save_module(enc, enc.config(), Path(ctx["root"]) / job.out)
    info["params"] = _n_params(enc)
    return info


_CAP_INK = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.75, 0.15], [0.1, 0.25, 0.95], [0.95, 0.85, 0.1], [0.95, 0.95, 0.95]])


def _cap_patch_labels(x: torch.Tensor) -> torch.Tensor:
    """Generic per-patch labels of capability images [B,3,32,32] -> [B,16] in 0..5: the colour
    (red, green, blue, yellow, white) of the patch's ink pixels (max channel > 0.5), 0 when fewer
    than 4 ink pixels."""
    b = x.shape[0]
    p = x.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(b, 16, 64, 3)
    ink = p.max(-1).values > 0.5
    cnt = ink.sum(-1)
    mean = (p * ink.unsqueeze(-1)).sum(2) / cnt.clamp(min=1).unsqueeze(-1)
    cls = torch.cdist(mean, _CAP_INK.unsqueeze(0).expand(b, -1, -1)).argmin(-1) + 1
    return torch.where(cnt >= 4, cls, torch.zeros_like(cls))


def _job_cap_encoder(job: Job, ctx: dict) -> dict:
    """Capability vision encoder, generic pretraining (as CLIP's is generic): each patch token
    reconstructs its 8x8 patch and classifies its ink colour; the mean token classifies the kind
    of image (objects, polygon, chart, text). No task's question or answer is used."""
    from torch import nn
    from .encoders import CapabilityEncoder, save_module
    from .generators import render_capability
    from .training import _lr_at, seed_everything
    c = job.config
    seed_everything(c["seed"])
    enc = CapabilityEncoder(64)
    dec = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 192))
    col = nn.Linear(64, 6)
    kind_head = nn.Linear(64, 4)
    kinds = {"vqa": 0, "grounding": 0, "geometry": 1, "chart": 2, "ocr": 3}
    params = [p for m in (enc, dec, col, kind_head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=c["lr"])
    rng = np.random.default_rng(c["seed"])
    t0 = time.time()

    def draw(r, n):
        xs, ks = [], []
        for _ in range(n):
            img, truth = render_capability(CAP_TASKS[int(r.integers(5))], r)
            xs.append(torch.from_numpy(img))
            ks.append(kinds[truth["task"]])
        return torch.stack(xs), torch.tensor(ks)

    def losses(x, k):
        tok = enc(x)
        patches = x.reshape(x.shape[0], 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], 16, 192)
        lab = _cap_patch_labels(x)
        l_rec = nn.functional.mse_loss(dec(tok), patches)
        l_col = nn.functional.cross_entropy(col(tok).reshape(-1, 6), lab.reshape(-1))
        l_kind = nn.functional.cross_entropy(kind_head(tok.mean(1)), k)
        return l_rec, l_col, l_kind, (col(tok).argmax(-1) == lab).float().mean(), (kind_head(tok.mean(1)).argmax(-1) == k).float().mean()

    for step in range(c["steps"]):
        for g in opt.param_groups:
            g["lr"] = c["lr"] * _lr_at(step, c["steps"], max(1, c["steps"] // 20))
        x, k = draw(rng, c["batch"])
        l_rec, l_col, l_kind, _, _ = losses(x, k)
        loss = 4 * l_rec + l_col + l_kind
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        x, k = draw(np.random.default_rng(c["seed"] + 10_000), 128)
        l_rec, _, _, acc_col, acc_kind = losses(x, k)
    enc.requires_grad_(False)
    save_module(enc, enc.config(), Path(ctx["root"]) / job.out)
    return {"recon_mse": float(l_rec), "patch_colour_acc": float(acc_col), "kind_acc": float(acc_kind),
            "seconds": time.time() - t0, "params": _n_params(enc)}


def _job_base(job: Job, ctx: dict) -> dict:
    from .training import pretrain_base
    from .tasks import text_question
    from ..mllm import MultimodalLM
    c = job.config
    tok = _tok(ctx)
    llm, log = pretrain_base(tok, c["arch"], c["steps"], c["batch"], c["lr"], c["seed"], progress=ctx["progress"])
    # text-only accuracy on fresh questions (the commonality question; and copy)
    rng = np.random.default_rng(777)
    exs = [text_question(rng) for _ in range(200)]
    model = MultimodalLM(llm, tok, {}, {})
    mc = [e for e in exs if e.task == "text_common"]
    scores = model.score_options_batch([e.prompt for e in mc], [None] * len(mc), [e.choices for e in mc])
    acc_mc = float(np.mean([(e.choices[int(s.argmax())] == e.answer) for s, e in zip(scores, mc)]))
    cp = [e for e in exs if e.task == "copy"]
    gens = model.generate_batch([e.prompt for e in cp], [None] * len(cp), max_new_tokens=6)
    acc_copy = float(np.mean([g == e.answer for g, e in zip(gens, cp)]))
    _save_llm(llm, tok, Path(ctx["root"]) / job.out)
    return {"seconds": log["seconds"], "text_common_acc": round(100 * acc_mc, 2),
            "copy_acc": round(100 * acc_copy, 2), "params": _n_params(llm), "final_loss": log["losses"][-1][1]}


def _modality_model(llm, tok, ctx: dict, projectors: Mapping[str, torch.nn.Module]):
    from .encoders import Tower, load_encoder
    from ..mllm import MultimodalLM
    towers = {m: Tower(load_encoder(Path(ctx["root"]) / "encoders" / m), p) for m, p in projectors.items()}
    return MultimodalLM(llm, tok, towers, {m: PLACEHOLDERS[m] for m in towers})


def _write_expert_json(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "expert.json").write_text(json.dumps(info, indent=2))


def _own_records(ctx: dict, modality: str) -> list[dict]:
    return read_records(Path(ctx["data"]) / "eval" / f"{modality}.json")


def _job_projector(job: Job, ctx: dict) -> dict:
    """Projector stage: base LLM frozen, linear projector trained on captions."""
    from .encoders import Projector, save_module
    from .tasks import batches, modality_question
    from .training import seed_everything, train_mllm
    c = job.config
    m, seed = c["modality"], c["seed"]
    seed_everything(1000 + seed)
    tok = _tok(ctx)
    llm = _load_llm(Path(ctx["root"]) / "base")
    llm.requires_grad_(False)
    proj = Projector(64, llm.config.hidden_size, m)
    model = _modality_model(llm, tok, ctx, {m: proj})
    sampler = lambda r: modality_question(m, "caption", r)  # noqa: E731
    log = train_mllm(model, batches(sampler, c["batch"], 1000 + seed), [{"params": proj.parameters(), "lr": c["lr"]}],
                     c["steps"], desc=f"projector {m} s{seed}", progress=ctx["progress"])
    folder = Path(ctx["root"]) / job.out
    save_module(proj, proj.config(), folder / "projector")
    scores = _evaluate(model, _own_records(ctx, m), ctx, job.name, seed, folder / "predictions.csv")
    info = {"name": job.name, "modality": m, "kind": "projector", "seed": seed, "llm": "base",
            "encoder": f"encoders/{m}", "own_task": scores, "seconds": round(log["seconds"], 1),
            "trainable_params": _n_params(proj), "final_loss": log["losses"][-1][1]}
    _write_expert_json(folder, info)
    return {"manifest": info}


def _lora_config(c: dict):
    from peft import LoraConfig
    return LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _trainable_llm(root: Path, c: dict):
    """The base LLM ready for an expert's fine-tuning: ``(llm, trainable LLM parameters, their lr)``.
    ``c["kind"] == "lora"`` wraps it in a peft LoRA model of ``c["lora"]`` (lr ``c["lora"]["lr"]``),
    otherwise every parameter trains at ``c["lr_llm"]``."""
    llm = _load_llm(root / "base")
    if c["kind"] == "lora":
        from peft import get_peft_model
        llm = get_peft_model(llm, _lora_config(c["lora"]))
        return llm, [p for n, p in llm.named_parameters() if "lora_" in n], c["lora"]["lr"]
    return llm, list(llm.parameters()), c["lr_llm"]


def _save_tuned_llm(llm, tok, folder: Path, kind: str):
    """Save a fine-tuned LLM in ``folder``: the peft adapter in ``adapter/`` (LoRA; the returned LLM
    has it merged, for evaluation) or the whole HF model in ``llm/`` (full; returned as is)."""
    if kind == "lora":
        llm.save_pretrained(str(folder / "adapter"))
        return llm.merge_and_unload()
    _save_llm(llm, tok, folder / "llm")
    return llm


def _job_expert(job: Job, ctx: dict) -> dict:
    """Projector + LLM fine-tuning (full or LoRA) on the modality's own tasks (+ text replay)."""
    from .encoders import load_projector, save_module
    from .tasks import batches
    from .training import seed_everything, train_mllm
    c = job.config
    m, seed, kind = c["modality"], c["seed"], c["kind"]
    seed_everything(2000 + seed)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm, llm_params, lr_llm = _trainable_llm(root, c)
    proj = load_projector(root / c["projector_from"] / "projector")
    model = _modality_model(llm, tok, ctx, {m: proj})
    sampler = _sampler_mix([m], c)
    log = train_mllm(model, batches(sampler, c["batch"], 2000 + 17 * seed), [
        {"params": llm_params, "lr": lr_llm}, {"params": proj.parameters(), "lr": c["lr_proj"]}],
        c["steps"], desc=f"expert {job.name}", progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    save_module(proj, proj.config(), folder / "projector")
    trainable = sum(p.numel() for p in llm_params) + _n_params(proj)
    llm = _save_tuned_llm(llm, tok, folder, kind)
    model = _modality_model(llm, tok, ctx, {m: proj})
    recs = _own_records(ctx, m)
    tuned = _evaluate(model, recs, ctx, job.name, seed, folder / "predictions.csv")
    base_model = _modality_model(_load_llm(root / "base"), tok, ctx, {m: proj})
    base = _evaluate(base_model, recs, ctx, job.name + "@base-llm", seed, folder / "predictions.csv")
    info = {"name": job.name, "modality": m, "kind": kind, "seed": seed, "base": "base",
            "encoder": f"encoders/{m}", "own_task": tuned, "own_task_base_llm": base,
            "gap": {k: round(tuned[k] - base[k], 2) for k in tuned},
            "seconds": round(log["seconds"], 1), "trainable_params": int(trainable),
            "final_loss": log["losses"][-1][1]}
    if kind == "lora":
        info["lora"] = c["lora"]
    _write_expert_json(folder, info)
    return {"manifest": info}


def _job_oracle(job: Job, ctx: dict) -> dict:
    """Joint oracle: one LLM + all projectors trained on every modality's tasks and on multi-modality
    commonality questions (the headroom above composition)."""
    from .encoders import load_projector, save_module
    from .tasks import batches
    from .training import seed_everything, train_mllm
    c = job.config
    seed = c["seed"]
    seed_everything(3000 + seed)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm = _load_llm(root / "base")
    projs = {m: load_projector(root / c["projectors_from"][m] / "projector") for m in c["modalities"]}
    model = _modality_model(llm, tok, ctx, projs)
    sampler = _sampler_mix(c["modalities"], c, seed, multimodal=c["multimodal"])
    log = train_mllm(model, batches(sampler, c["batch"], 3000 + 17 * seed), [
        {"params": llm.parameters(), "lr": c["lr_llm"]},
        {"params": [p for pr in projs.values() for p in pr.parameters()], "lr": c["lr_proj"]}],
        c["steps"], desc=f"oracle s{seed}", progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    _save_llm(llm, tok, folder / "llm")
    for m, p in projs.items():
        save_module(p, p.config(), folder / "projectors" / m)
    scores = {m: _evaluate(model, _own_records(ctx, m), ctx, job.name, seed, folder / "predictions.csv")
              for m in c["modalities"]}
    val = _evaluate(model, read_records(Path(ctx["data"]) / "mcub" / "val.json"), ctx, job.name, seed,
                    folder / "predictions.csv")
    info = {"name": job.name, "kind": "oracle", "seed": seed, "modalities": c["modalities"], "own_task": scores,
            "mcub_val": val, "seconds": round(log["seconds"], 1), "trainable_params": _n_params(llm)}
    _write_expert_json(folder, info)
    return {"manifest": info}


def _cap_model(llm, tok, ctx: dict, proj):
    from .encoders import Tower, load_encoder
    from ..mllm import MultimodalLM
    enc = load_encoder(Path(ctx["root"]) / "capability" / "encoder")
    return MultimodalLM(llm, tok, {"image": Tower(enc, proj)}, {"image": PLACEHOLDERS["image"]})


def _cap_records(ctx: dict, task: str) -> list[dict]:
    return read_records(Path(ctx["data"]) / "capability" / f"{task}.json")


def _job_cap_base(job: Job, ctx: dict) -> dict:
    """Base VLM: base LLM (frozen) + capability encoder + projector trained on generic captions."""
    from .encoders import Projector, save_module
    from .tasks import batches, capability_question
    from .training import seed_everything, train_mllm
    c = job.config
    seed_everything(4000)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm = _load_llm(root / "base")
    llm.requires_grad_(False)
    proj = Projector(64, llm.config.hidden_size, "image")
    model = _cap_model(llm, tok, ctx, proj)
    log = train_mllm(model, batches(lambda r: capability_question("caption", r), c["batch"], 4000),
                     [{"params": proj.parameters(), "lr": c["lr_proj"]}], c["caption_steps"],
                     desc="capability base VLM", progress=ctx["progress"])
    folder = root / job.out
    save_module(proj, proj.config(), folder / "projector")
    scores = {t: _evaluate(model, _cap_records(ctx, t), ctx, job.name, 0, folder / "predictions.csv")
              for t in c["tasks"]}
    info = {"name": job.name, "kind": "base-vlm", "llm": "base", "encoder": "capability/encoder",
            "task_scores": scores, "seconds": round(log["seconds"], 1)}
    _write_expert_json(folder, info)
    return {"manifest": info}


def _job_cap_expert(job: Job, ctx: dict) -> dict:
    from .encoders import load_projector, save_module
    from .tasks import batches, capability_question, mixture, text_question
    from .training import seed_everything, train_mllm
    c = job.config
    task, seed, kind = c["task"], c["seed"], c["kind"]
    seed_everything(5000 + seed)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm, llm_params, lr_llm = _trainable_llm(root, c)
    proj = load_projector(root / "capability" / "base" / "projector")
    proj.requires_grad_(bool(c["train_projector"]))
    model = _cap_model(llm, tok, ctx, proj)
    sampler = mixture([(0.85, lambda r: capability_question(task, r)), (0.15, text_question)])
    groups = [{"params": llm_params, "lr": lr_llm}]
    if c["train_projector"]:
        groups.append({"params": proj.parameters(), "lr": c["lr_proj"]})
    log = train_mllm(model, batches(sampler, c["batch"], 5000 + 31 * seed + CAP_TASKS.index(task)), groups,
                     c["steps"], desc=f"capability {job.name}", progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    save_module(proj, proj.config(), folder / "projector")
    model = _cap_model(_save_tuned_llm(llm, tok, folder, kind), tok, ctx, proj)
    recs = _cap_records(ctx, task)
    tuned = _evaluate(model, recs, ctx, job.name, seed, folder / "predictions.csv")
    base = _evaluate(_cap_model(_load_llm(root / "base"), tok, ctx, load_projector(root / "capability" / "base" / "projector")),
                     recs, ctx, job.name + "@base-vlm", seed, folder / "predictions.csv")
    info = {"name": job.name, "family": "capability", "task": task, "kind": kind, "seed": seed, "base": "base",
            "encoder": "capability/encoder", "own_task": tuned, "own_task_base_llm": base,
            "gap": {k: round(tuned[k] - base[k], 2) for k in tuned}, "seconds": round(log["seconds"], 1),
            "train_projector": c["train_projector"]}
    if kind == "lora":
        info["lora"] = c["lora"]
    _write_expert_json(folder, info)
    return {"manifest": info}


def _entries(module: str, names: str) -> tuple[str, ...]:
    """``"module:name"`` for each of the space-separated ``names``."""
    return tuple(f"{module}:{n}" for n in names.split())


# The training path of the world's jobs: what they run to produce their weights. Not on it: what
# only evaluates (``_evaluate``, ``evaluate.predict``, ``MultimodalLM.score_*``/``generate*``) or
# describes (``expert.json``, ``zoo.json``): the scores in ``zoo.json`` are those of the build.
CONCEPTS_PATH = _entries("workbench.world.concepts", "CONCEPTS N_CONCEPTS N_SLOTS MODALITIES PLACEHOLDERS "
                         "RECORD_KEYS RECORD_KEY_TO_MODALITY LETTERS COUNT_WORDS CAP_COLORS CAP_SHAPES CAP_SIDES "
                         "CAP_VALUES CAP_CHARS CAP_ROWS CAP_COLS CAP_TASKS TEMPLATE_WORDS CONTENT_WORDS "
                         "SPECIAL_TOKENS PUNCT vocabulary")
TOKENIZER_PATH = CONCEPTS_PATH + _entries("workbench.world.tokenizer", "build_tokenizer save_tokenizer load_tokenizer")
SCENES_PATH = (_entries("workbench.world.generators", "IMAGE_SIZE AUDIO_LEN AUDIO_SEG VIDEO_FRAMES VIDEO_SIZE "
                          "N_POINTS RAW_SHAPES _PALETTE3 _CAP_RGB _shape_mask render_image _audio_tones AUDIO_TONES "
                          "render_audio _VIDEO_DIRS render_video _POINT_CENTERS _POINT_RGB _sample_shape render_point "
                          "RENDERERS render _FONT _polygon_mask render_capability")
               + _entries("workbench.world.tasks", "COMMON_Q OWN_TASKS Example options_text _mc sample_scene "
                          "scene_concepts _words _seed modality_question common_scenes multimodal_common TEXT_MIX "
                          "text_question CAP_QUESTIONS capability_question mixture own_task_sampler batches "
                          "example_modal_inputs"))
DATA_PATH = CONCEPTS_PATH + SCENES_PATH + _entries(
    "workbench.world.mcub", "SHORT MCUB3 MCUB2 Turn MCUBRecord validate_record save_input example_to_record _write "
    "build_datasets")
MODEL_PATH = (TOKENIZER_PATH + SCENES_PATH
              + _entries("workbench.world.encoders", "D_ENC _Encoder ImageEncoder AudioEncoder VideoEncoder "
                         "PointEncoder CapabilityEncoder ENCODER_CLASSES MODALITY_ENCODERS Projector Tower "
                         "save_module _read load_encoder load_projector")
              + _entries("workbench.world.training", "seed_everything new_llm _lr_at train_mllm pretrain_base "
                         "_scene_targets pretrain_encoder pretrain_capability_encoder")
              + _entries("workbench.mllm", "_ALIASES _norm_inputs MultimodalLM.__init__ MultimodalLM.device "
                         "MultimodalLM._encode_towers MultimodalLM._pieces MultimodalLM._pad MultimodalLM.forward "
                         "_Loss")
              + _entries("workbench.routing", "RoutedModule token_routes _named_routed RoutedLinear")
              + _entries(__name__, "_tok _load_llm _save_llm _sampler_mix _modality_model _cap_model _lora_config "
                         "_trainable_llm _save_tuned_llm"))

#: job kind -> (build function, recipe version, training path)
_KINDS = {"tokenizer": (_job_tokenizer, 1, TOKENIZER_PATH), "data": (_job_data, 1, DATA_PATH),
          "encoder": (_job_encoder, 1, MODEL_PATH), "base": (_job_base, 1, MODEL_PATH),
          "projector": (_job_projector, 1, MODEL_PATH), "full": (_job_expert, 1, MODEL_PATH),
          "lora": (_job_expert, 1, MODEL_PATH), "oracle": (_job_oracle, 1, MODEL_PATH),
          "cap_encoder": (_job_cap_encoder, 1, MODEL_PATH + _entries(__name__, "_CAP_INK _cap_patch_labels")),
          "cap_base": (_job_cap_base, 1, MODEL_PATH), "cap_full": (_job_cap_expert, 1, MODEL_PATH),
          "cap_lora": (_job_cap_expert, 1, MODEL_PATH)}
for _kind, (_build, _version, _path) in _KINDS.items():
    register_job_kind(_kind, _build, version=_version, training_path=_path)


# ----------------------------------------------------------------------------- planning
def _lora_settings(cfg: dict) -> dict:
    """A LoRA job's settings: the preset's ``lora`` block without its planning keys."""
    return {k: v for k, v in cfg["lora"].items() if k not in ("enabled", "seeds")}


def plan_jobs(preset: str, cfg: dict | None = None) -> list[Job]:
    """Every job of a preset, dependencies first (registered planners, e.g. DAMC's, last)."""
    _load_plugins()
    cfg = copy.deepcopy(cfg or get_preset(preset))
    mods = cfg["modalities"]
    jobs = [Job("tokenizer", "tokenizer", {}, [], "tokenizer"),
            Job("data", "data", dict(cfg["data"], modalities=mods, capability_tasks=cfg["capability"]["tasks"]), [], "")]
    for m in mods:
        e = cfg["encoder"]
        jobs.append(Job(f"encoder-{m}", "encoder", {"modality": m, "steps": e["steps"][m], "batch": e["batch"],
                                                     "lr": e["lr"], "seed": e["seed"]}, [], f"encoders/{m}"))
    jobs.append(Job("base", "base", dict(cfg["base"], arch=cfg["arch"]), ["tokenizer"], "base"))
    common = ["tokenizer", "base", "data"]
    lora_jobs = []
    for seed in cfg["seeds"]:
        for m in mods:
            pname = f"{m}-projector-s{seed}"
            jobs.append(Job(pname, "projector", dict(cfg["projector"], modality=m, seed=seed),
                            common + [f"encoder-{m}"], f"experts/{pname}"))
            lora_seeds = cfg["lora"].get("seeds", cfg["seeds"])
            kinds = ["full"] + (["lora"] if cfg["lora"]["enabled"] and seed in lora_seeds else [])
            for kind in kinds:
                name = f"{m}-{kind}-s{seed}"
                conf = dict(cfg["expert"], modality=m, seed=seed, kind=kind, projector_from=f"experts/{pname}")
                if kind == "lora":
                    conf["lora"] = _lora_settings(cfg)
                job = Job(name, kind, conf, common + [f"encoder-{m}", pname], f"experts/{name}")
                (lora_jobs if kind == "lora" else jobs).append(job)
        if seed in cfg["oracle"]["seeds"]:  # the oracle of a seed right after that seed's experts
            o = cfg["oracle"]
            conf = dict(cfg["expert"], **{k: v for k, v in o.items() if k != "seeds"}, seed=seed, modalities=mods,
                        projectors_from={m: f"experts/{m}-projector-s{seed}" for m in mods})
            jobs.append(Job(f"oracle-s{seed}", "oracle", conf,
                            common + [f"encoder-{m}" for m in mods] + [f"{m}-projector-s{seed}" for m in mods],
                            f"oracle-s{seed}"))
    for seed in [s_ for s_ in cfg["oracle"]["seeds"] if s_ not in cfg["seeds"]]:
        raise ValueError(f"oracle seed {seed} is not among the preset's seeds {cfg['seeds']}")
    cap = cfg["capability"]
    if cap["tasks"]:
        jobs.append(Job("encoder-capability", "cap_encoder", {"modality": "capability", "steps": cap["enc_steps"],
                                                          "batch": cfg["encoder"]["batch"], "lr": cfg["encoder"]["lr"],
                                                          "seed": cfg["encoder"]["seed"]}, [], "capability/encoder"))
        jobs.append(Job("capability-base", "cap_base", {"caption_steps": cap["caption_steps"], "batch": cap["batch"],
                                                        "lr_proj": cap["lr_proj"], "tasks": cap["tasks"]},
                        common + ["encoder-capability"], "capability/base"))
        for seed in cap["seeds"]:
            for task in cap["tasks"]:
                for kind in ["full"] + (["lora"] if cap["lora"] else []):
                    name = f"{task}-{kind}-s{seed}"
                    conf = {"task": task, "seed": seed, "kind": kind, "steps": cap["steps"], "batch": cap["batch"],
                            "lr_llm": cap["lr_llm"], "lr_proj": cap["lr_proj"], "train_projector": cap["train_projector"]}
                    if kind == "lora":
                        conf["lora"] = _lora_settings(cfg)
                    jobs.append(Job(f"capability-{name}", f"cap_{kind}", conf,
                                    common + ["encoder-capability", "capability-base"], f"capability/experts/{name}"))
    jobs.extend(lora_jobs)  # priority order: full experts, oracle, capability family, then LoRA experts
    for kind, planner in PLANNERS.items():
        jobs.extend(planner(preset, cfg))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate job names in preset {preset!r}")
    return jobs


PLUGIN_MODULES = ("workbench.world.damc",)


def _load_plugins() -> None:
    """Import optional job-kind modules (they call :func:`register_job_kind` on import)."""
    import importlib
    import importlib.util
    for mod in PLUGIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def get_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


def _run_job(kind: str, job: Job, ctx: dict) -> tuple[dict, float]:
    _threads()
    t0 = time.time()
    res = RECIPES[kind].build(job, ctx)
    return res, time.time() - t0


def build_zoo(preset: str = "default", out: str | Path | None = None, jobs: int = 2, progress: bool = True,
              only: Sequence[str] | None = None, cfg: dict | None = None) -> "Zoo":
    """Build (or update) the zoo of ``preset``: runs each job whose configuration hash changed, in up
    to ``jobs`` worker processes; writes ``zoo.json``; returns the :class:`Zoo`."""
    cfg = copy.deepcopy(cfg or get_preset(preset))
    # import everything the jobs use before forking workers: jobs then run the code that was hashed
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from .. import evaluate, mllm  # noqa: F401
    from . import encoders, tokenizer, training  # noqa: F401
    root = zoo_root(preset, out)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        return _build_locked(preset, out, jobs, progress, only, cfg, root)


@contextlib.contextmanager
def _build_lock(root: Path):
    """Hold an exclusive lock on ``root/.build.lock`` for one build: a second build of the same zoo
    (another notebook, a second ``make zoo``) waits for the first, then finds its jobs cached."""
    import fcntl

    with open(root / ".build.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"zoo {root}: another build is running; waiting for it to finish", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_locked(preset: str, out, jobs: int, progress: bool, only, cfg: dict, root: Path) -> "Zoo":
    droot = data_root(preset) if out is None else Path(out) / "data"
    plan = plan_jobs(preset, cfg)
    if only:
        keep = set(only)
        changed = True
        while changed:
            before = len(keep)
            for j in plan:
                if j.name in keep:
                    keep.update(j.deps)
            changed = len(keep) != before
        plan = [j for j in plan if j.name in keep]
    by_name = {j.name: j for j in plan}
    for j in plan:
        for d in j.deps:
            if d not in by_name:
                raise ValueError(f"job {j.name!r} depends on unknown job {d!r}")
    for j in plan:
        if j.kind not in RECIPES:
            raise ValueError(f"job {j.name!r}: unknown kind {j.kind!r}")
    digests = {kind: training_path_digest(kind) for kind in {j.kind for j in plan}}
    hashes: dict[str, str] = {}
    pending = list(plan)
    while pending:  # topological hash computation
        progressed = False
        for j in list(pending):
            if all(d in hashes for d in j.deps):
                hashes[j.name] = job_hash(j, hashes, digests[j.kind])
                pending.remove(j)
                progressed = True
        if not progressed:
            raise ValueError(f"dependency cycle among {[j.name for j in pending]}")
    state_dir = root / ".jobs"
    state_dir.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    todo = []
    for j in plan:
        st = state_dir / f"{j.name}.json"
        if st.exists():
            s = json.loads(st.read_text())
            if s.get("hash") == hashes[j.name] and (j.kind != "data" or droot.exists()):
                results[j.name] = s
                continue
        todo.append(j)
    n_trained = len(todo)
    n_dep = _n_dependents(plan)
    # critical path first; among jobs nothing waits on, the longest first (less idle time at the end)
    todo.sort(key=lambda j: (-n_dep[j.name], -_RELATIVE_COST.get(j.kind, 1)))  # stable: plan order among equals
    ctx = {"root": str(root), "data": str(droot), "preset": preset, "cfg": cfg, "progress": False}
    t_start = time.time()
    bar = tqdm(total=len(todo), desc=f"zoo {preset}", disable=not progress)
    done = set(results)
    running: dict = {}
    mpctx = mp.get_context("fork")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mpctx) as ex:
        while todo or running:
            for j in list(todo):
                if len(running) >= max(1, jobs):
                    break
                if all(d in done for d in j.deps):
                    running[ex.submit(_run_job, j.kind, j, dict(ctx, results=dict(results)))] = j
                    todo.remove(j)
            if not running:
                raise RuntimeError(f"zoo {preset}: jobs {[j.name for j in todo]} wait on jobs that failed")
            fin, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in fin:
                j = running.pop(f)
                try:
                    res, secs = f.result()
                except Exception as err:  # re-raise naming the job
                    raise RuntimeError(f"zoo {preset}: job {j.name!r} failed: {err!r}") from err
                s = {"hash": hashes[j.name], "kind": j.kind, "seconds": round(secs, 1), "result": res,
                     "out": j.out, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                (state_dir / f"{j.name}.json").write_text(json.dumps(s, indent=2))
                results[j.name] = s
                done.add(j.name)
                # keep zoo.json current (an interrupted build still lists what is finished)
                _write_manifest(root, droot, preset, cfg, [p for p in plan if p.name in results], results,
                                time.time() - t_start, complete=False)
                bar.update(1)
                bar.set_postfix_str(f"{j.name} {secs:.0f}s")
    bar.close()
    _write_manifest(root, droot, preset, cfg, plan, results, time.time() - t_start, complete=not only,
                    n_trained=n_trained)
    return Zoo(root)


#: rough relative training cost of a job kind (scheduling only: longer jobs start first)
_RELATIVE_COST = {"damc": 3, "oracle": 3, "cap_full": 3, "cap_lora": 3, "full": 2, "lora": 2}


def _n_dependents(plan: Sequence[Job]) -> dict[str, int]:
    """Per job, how many jobs (transitively) wait on it: the scheduler starts ready jobs with the most
    dependents first (the base LLM before the encoders), so the two workers are not left idle behind
    the critical path."""
    direct: dict[str, set[str]] = {j.name: set() for j in plan}
    for j in plan:
        for d in j.deps:
            direct.setdefault(d, set()).add(j.name)

    @functools.lru_cache(maxsize=None)
    def below(name: str) -> frozenset:
        out = set(direct.get(name, ()))
        for c in direct.get(name, ()):
            out |= below(c)
        return frozenset(out)
    return {j.name: len(below(j.name)) for j in plan}


def _write_manifest(root: Path, droot: Path, preset: str, cfg: dict, plan: list[Job], results: dict,
                    wall: float, complete: bool = True, n_trained: int = 1) -> None:
    """Write ``zoo.json``. ``n_trained``: jobs this build ran; with none, the manifest keeps the
    ``built`` time, ``build_wall_seconds`` and ``jobs_trained`` of the build that made the models (a
    cache check is not a build). ``build_wall_seconds`` is the wall time of that last build, which
    trained ``jobs_trained`` of the ``len(jobs)`` jobs (all of them: a build from nothing)."""
    models, jobs = {}, {}
    for j in plan:
        r = results[j.name]
        jobs[j.name] = {"kind": j.kind, "hash": r["hash"], "seconds": r["seconds"], "out": j.out,
                        "finished": r.get("finished")}
        res = r["result"]
        if "manifest" in res:
            models[j.name] = dict(res["manifest"], path=j.out, hash=r["hash"], job_seconds=r["seconds"])
        elif j.kind in ("encoder", "base", "tokenizer", "data"):
            jobs[j.name]["result"] = res
    built, wall = time.strftime("%Y-%m-%dT%H:%M:%S"), round(wall, 1)
    prev = root / "zoo.json"
    if not n_trained and prev.exists():  # nothing was trained: keep the record of the build that made these models
        try:
            old = json.loads(prev.read_text())
            built, wall = old.get("built", built), old.get("build_wall_seconds", wall)
            n_trained = old.get("jobs_trained", n_trained)
        except (OSError, ValueError):
            pass
    manifest = {"preset": preset, "world_version": WORLD_VERSION, "data_dir": str(droot), "complete": complete,
                "built": built, "build_wall_seconds": wall, "jobs_trained": n_trained,
                "total_job_seconds": round(sum(results[j.name]["seconds"] for j in plan), 1),
                "config": cfg, "jobs": jobs, "models": models}
    tmp = root / "zoo.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(root / "zoo.json")


# ----------------------------------------------------------------------------- loading
class Zoo:
    """A built zoo on disk. ``Zoo(path)`` or ``Zoo.for_preset("tiny")``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mpath = self.path / "zoo.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no zoo manifest {mpath} (build it with `python -m workbench zoo`)")
        self.manifest: dict = json.loads(mpath.read_text())
        self.data_dir = Path(self.manifest["data_dir"])

    @classmethod
    def for_preset(cls, preset: str) -> "Zoo":
        return cls(zoo_root(preset))

    @property
    def base_path(self) -> Path:
        return self.path / "base"

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["config"]["modalities"])

    def tokenizer(self):
        from .tokenizer import load_tokenizer
        return load_tokenizer(self.path / "tokenizer")

    def load_base_llm(self):
        return _load_llm(self.base_path)

    def experts(self, modality: str | None = None, kind: str | None = None, seed: int | None = None,
                family: str = "modality", task: str | None = None) -> list[str]:
        """Names of experts (``family="modality"``: projector/full/lora/damc; ``"capability"``)."""
        out = []
        for name, e in self.manifest["models"].items():
            fam = e.get("family", "modality")
            if e.get("kind") in ("oracle", "base-vlm") or fam != family:
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
        """The HF Llama folder of a full-FT expert/oracle (``base/`` for projector-only experts)."""
        p = self.expert_path(name)
        if (p / "llm").exists():
            return p / "llm"
        if self.info(name).get("kind") in ("projector", "base-vlm"):
            return self.base_path
        raise FileNotFoundError(f"{p} has no llm/ folder (LoRA experts: adapter_path)")

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
            return PeftModel.from_pretrained(self.load_base_llm(), str(p / "adapter")).merge_and_unload().eval()
        if e.get("kind") in ("projector", "base-vlm"):
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
        from ..evaluate import t_interval
        rows = []
        by: dict[tuple, list[dict]] = {}
        for name, e in self.manifest["models"].items():
            if e.get("kind") in ("full", "lora", "damc", "projector") or e.get("family") == "capability":
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


expert_sampler = _sampler_mix  # public name: the experts' training mixture (own tasks + caption + text replay)
modality_model = _modality_model  # public name: MultimodalLM from an LLM + {modality: projector} (zoo encoders)


def ensure_zoo(preset: str = "tiny", out: str | Path | None = None, jobs: int = 2) -> Zoo:
    """The zoo of ``preset``, built if missing or stale (instant when every job's hash matches).
    Tests and notebooks use this (``ensure_zoo("tiny")``)."""
    return build_zoo(preset, out=out, jobs=jobs, progress=False)


def load_expert(zoo_dir: str | Path, name: str):
    return Zoo(zoo_dir).load_expert(name)


def load_tower(zoo_dir: str | Path, name_or_modality: str, **kw):
    return Zoo(zoo_dir).load_tower(name_or_modality, **kw)
