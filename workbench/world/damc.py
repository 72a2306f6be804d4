"""DAMC's decoupled training of the miniature experts (methods.md section 2).

Each DAMC expert starts from the shared base LLM and its modality's projector stage; the LLM's
trainable parameters are split into two sets applied per token (:mod:`workbench.routing`):

- the *modality* set (route 1): applied to the modality's tokens, including 5 learnable prefix and
  5 suffix tokens (zero-initialised) wrapped around every modality span;
- the *text* set (route 0): applied to every other token, trained with a 10x smaller learning rate.

Both sets are LoRA adapters on q,k,v,o,gate,up,down (as in the released code), or full-weight
deltas (``decouple="full"``, an option). Saved in the zoo as::

    experts/<modality>-damc-s<seed>/expert.json        {"kind": "damc", "decouple": "lora"|"full", ...}
    experts/<modality>-damc-s<seed>/adapter_text/      peft LoRA folder (route 0)
    experts/<modality>-damc-s<seed>/adapter_modality/  peft LoRA folder (route 1)
      (full: llm_text/ and llm_modality/ - HF Llama folders θ0 + Δ)
    experts/<modality>-damc-s<seed>/projector/         DamcProjector: projector + prefix + suffix

Importing this module registers the zoo job kind ``"damc"`` (and its planner: one job per modality
and seed of the preset; settings from ``cfg["damc"]`` or derived from the preset's LoRA/expert
settings, see :func:`damc_settings`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..mllm import MultimodalLM
from ..routing import (DEFAULT_LORA_TARGETS, add_dense_routes, add_lora_routes, materialize_route, route_parameters,
                       save_route_adapter)
from .concepts import PLACEHOLDERS
from .encoders import Projector, Tower, load_encoder, load_projector, save_module

N_PREFIX = 5
N_SUFFIX = 5
TEXT_LR_RATIO = 0.1


class DamcProjector(nn.Module):
    """A projector whose output span is wrapped in learnable prefix and suffix tokens.

    ``feats [.., n, d_enc] -> [.., n_prefix + n + n_suffix, hidden]``; prefix/suffix are
    zero-initialised parameters. All of the span's tokens are modality tokens (route k)."""

    def __init__(self, in_dim: int, out_dim: int, modality: str = "", n_prefix: int = N_PREFIX,
                 n_suffix: int = N_SUFFIX) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.modality = in_dim, out_dim, modality
        self.n_prefix, self.n_suffix = n_prefix, n_suffix
        self.proj = nn.Linear(in_dim, out_dim)
        self.prefix = nn.Parameter(torch.zeros(n_prefix, out_dim))
        self.suffix = nn.Parameter(torch.zeros(n_suffix, out_dim))

    @classmethod
    def from_projector(cls, p: Projector, n_prefix: int = N_PREFIX, n_suffix: int = N_SUFFIX) -> "DamcProjector":
        d = cls(p.in_dim, p.out_dim, p.modality, n_prefix, n_suffix)
        d.proj.load_state_dict(p.proj.state_dict())
        return d

    def config(self) -> dict:
        return {"class": "DamcProjector", "in_dim": self.in_dim, "out_dim": self.out_dim, "modality": self.modality,
                "n_prefix": self.n_prefix, "n_suffix": self.n_suffix}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        lead = h.shape[:-2]
        pre = self.prefix.to(h.dtype).expand(*lead, -1, -1)
        suf = self.suffix.to(h.dtype).expand(*lead, -1, -1)
        return torch.cat([pre, h, suf], dim=-2)


def load_damc_projector(folder: str | Path) -> DamcProjector:
    """Load a :class:`DamcProjector` saved with :func:`workbench.world.encoders.save_module`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("class") != "DamcProjector":
        raise ValueError(f"{folder}/config.json: class {cfg.get('class')!r} is not DamcProjector")
    p = DamcProjector(cfg["in_dim"], cfg["out_dim"], cfg.get("modality", ""), cfg["n_prefix"], cfg["n_suffix"])
    p.load_state_dict(load_file(str(folder / "model.safetensors")))
    return p.eval()


def load_damc_tower(zoo, name: str) -> Tower:
    """The tower (frozen encoder + DAMC projector with prefix/suffix) of a zoo DAMC expert."""
    from .zoo import Zoo

    z = Zoo.coerce(zoo)
    info = z.info(name)
    t = Tower(z.load_encoder(info["modality"]), load_damc_projector(z.expert_path(name) / "projector"))
    return t.eval().requires_grad_(False)


def damc_settings(cfg: Mapping) -> dict:
    """DAMC training settings of a preset: ``cfg["damc"]`` if present, else derived: the expert
    stage's steps/batch/replay/caption mix, LoRA rank/alpha/lr of ``cfg["lora"]``, projector lr
    ``cfg["expert"]["lr_proj"]``, text lr = 0.1 x modality lr, 5 + 5 prefix/suffix tokens."""
    e, lo = cfg["expert"], cfg["lora"]
    d = {"enabled": True, "steps": e["steps"], "batch": e["batch"], "replay": e["replay"],
         "caption": e.get("caption", 0.0), "r": lo["r"], "alpha": lo["alpha"], "lr": lo["lr"], "lr_full": e["lr_llm"],
         "lr_proj": e["lr_proj"], "text_lr_ratio": TEXT_LR_RATIO, "n_prefix": N_PREFIX, "n_suffix": N_SUFFIX,
         "decouple": "lora", "targets": list(DEFAULT_LORA_TARGETS)}
    d.update(dict(cfg.get("damc") or {}))
    return d


def build_damc_model(llm, tokenizer, encoder: nn.Module, projector: Projector, modality: str, c: Mapping,
                     seed: int = 0) -> tuple[MultimodalLM, DamcProjector, list[dict]]:
    """The trainable DAMC model: routes 0 (text) / 1 (modality) added to ``llm``, a DAMC projector
    from ``projector``. Returns (model, damc projector, optimizer parameter groups)."""
    dproj = DamcProjector.from_projector(projector, c["n_prefix"], c["n_suffix"])
    if c["decouple"] == "lora":
        add_lora_routes(llm, 2, c["r"], c["alpha"], c["targets"], seed=seed)
        lr_llm = c["lr"]
    elif c["decouple"] == "full":
        add_dense_routes(llm, 2, c["targets"])
        lr_llm = c["lr_full"]
    else:
        raise ValueError(f"decouple must be 'lora' or 'full', got {c['decouple']!r}")
    encoder.requires_grad_(False)
    model = MultimodalLM(llm, tokenizer, {modality: Tower(encoder, dproj)}, {modality: PLACEHOLDERS[modality]})
    groups = [{"params": route_parameters(llm, 1), "lr": lr_llm},
              {"params": list(dproj.parameters()), "lr": c["lr_proj"]},
              {"params": route_parameters(llm, 0), "lr": lr_llm * c["text_lr_ratio"]}]
    return model, dproj, groups


def save_damc_llm(llm, tokenizer, folder: Path, decouple: str) -> None:
    """Write the two parameter sets: peft adapters, or full HF folders θ0 + Δ (full-weight option)."""
    if decouple == "lora":
        save_route_adapter(llm, 0, folder / "adapter_text")
        save_route_adapter(llm, 1, folder / "adapter_modality")
        return
    from ..routing import remove_routes
    import copy

    for route, sub in ((0, "llm_text"), (1, "llm_modality")):
        w = materialize_route(llm, route)
        plain = remove_routes(copy.deepcopy(llm))
        sd = plain.state_dict()
        for k, v in w.items():
            sd[k] = v.to(sd[k].dtype)
        plain.load_state_dict(sd)
        plain.save_pretrained(str(folder / sub))
        tokenizer.save_pretrained(str(folder / sub))


def _job_damc(job, ctx: dict) -> dict:
    """Zoo job: DAMC decoupled training of one modality expert (see the module docstring)."""
    from .tasks import batches
    from .training import seed_everything, train_mllm
    from .recipes import _evaluate, _n_params, _own_records, _sampler_mix, _tok, _write_expert_json
    from .zoo import MODALITY_BASE, _load_llm

    c = job.config
    m, seed = c["modality"], c["seed"]
    seed_everything(6000 + seed)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm = _load_llm(root / MODALITY_BASE)
    proj = load_projector(root / c["projector_from"] / "projector")
    enc = load_encoder(root / "encoders" / m)
    model, dproj, groups = build_damc_model(llm, tok, enc, proj, m, c, seed=6000 + seed)
    sampler = _sampler_mix([m], c)
    log = train_mllm(model, batches(sampler, c["batch"], 6000 + 17 * seed), groups, c["steps"],
                     desc=f"damc {job.name}", progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_module(dproj, dproj.config(), folder / "projector")
    save_damc_llm(llm, tok, folder, c["decouple"])
    scores = _evaluate(model, _own_records(ctx, m), ctx, job.name, seed, folder / "predictions.csv")
    info = {"name": job.name, "modality": m, "kind": "damc", "seed": seed, "base": MODALITY_BASE,
            "encoder": f"encoders/{m}", "decouple": c["decouple"], "own_task": scores,
            "seconds": round(log["seconds"], 1),
            "trainable_params": int(sum(p.numel() for g in groups for p in g["params"])),
            "params_text": int(sum(p.numel() for p in route_parameters(llm, 0))),
            "params_modality": int(sum(p.numel() for p in route_parameters(llm, 1))),
            "projector_params": _n_params(dproj), "final_loss": log["losses"][-1][1],
            "settings": {k: c[k] for k in ("r", "alpha", "lr", "lr_proj", "text_lr_ratio", "n_prefix", "n_suffix",
                                          "steps", "batch", "targets")}}
    _write_expert_json(folder, info)
    return {"manifest": info}


def plan_damc(preset: str, cfg: dict) -> list:
    """One DAMC job per modality and seed of the preset (none if ``cfg["damc"]["enabled"]`` is false)."""
    from .scheduler import Job
    from .zoo import MODALITY_BASE

    d = damc_settings(cfg)
    if not d.get("enabled", True):
        return []
    jobs = []
    for seed in cfg["seeds"]:
        for m in cfg["modalities"]:
            name = f"{m}-damc-s{seed}"
            conf = dict(d, modality=m, seed=seed, projector_from=f"experts/{m}-projector-s{seed}")
            deps = ["tokenizer", MODALITY_BASE, "data", f"encoder-{m}", f"{m}-projector-s{seed}"]
            jobs.append(Job(name, "damc", conf, deps, f"experts/{name}"))
    return jobs


def _register() -> None:
    from .recipes import MODALITY_PATH, path_entries
    from .scheduler import register_job_kind

    path = (MODALITY_PATH
            + path_entries("workbench.routing", "_module_name _matches _get_parent routed_linear routed_modules "
                       "linear_names DEFAULT_LORA_TARGETS _new_route_targets add_lora_routes add_dense_routes "
                       "route_parameters remove_routes materialize_route save_route_adapter")
            + path_entries(__name__, "N_PREFIX N_SUFFIX TEXT_LR_RATIO DamcProjector build_damc_model save_damc_llm"))
    register_job_kind("damc", _job_damc, plan_damc, version=1, training_path=path)


_register()

__all__ = ["DamcProjector", "build_damc_model", "damc_settings", "load_damc_projector", "load_damc_tower",
           "plan_damc", "save_damc_llm"]
