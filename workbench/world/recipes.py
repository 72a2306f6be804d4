"""The world's training recipes: one build function per zoo job kind (tokenizer, data, encoders,
base LLM, projectors, modality experts full/LoRA, oracles, the capability family), the training
helpers they share, each kind's declared training path (what its cache key hashes, see
:mod:`workbench.world.scheduler`) and :func:`plan_jobs`, the jobs of a preset.

Importing this module registers those job kinds. Zoo layout the jobs write (``zoo/<preset>/``)::

    zoo.json                          manifest: every model, its scores, params, seconds, hash
    tokenizer/                        HF PreTrainedTokenizerFast
    base/                             HF LlamaForCausalLM (text-only pretrained) + tokenizer
    instruct/                         the modality family's base LLM: base/ instruction-tuned on text questions
    encoders/<modality>/              frozen encoder (model.safetensors + config.json)
    experts/<name>/expert.json        {"modality", "kind": "projector"|"full"|"lora"|"damc", "seed", ...}
    experts/<name>/llm/ | adapter/    HF Llama folder (full FT) | peft LoRA folder
    experts/<name>/projector/         model.safetensors + config.json
    oracle-s<seed>/                   llm/ + projectors/<modality>/ (joint training on all modalities)
    capability/encoder/               the capability family's vision encoder
    capability/base/                  instruct base VLM: llm/ (the family's theta_0) + projector/
    capability/experts/<task>-<full|lora>-s<seed>/   narrow experts fine-tuned from it
    capability/experts/mixture-s<seed>/              mixture training on every task (zoo name capability-oracle-s<seed>)

Generated inputs and evaluation records live under ``data/generated/<preset>/``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .concepts import CAP_SHAPES, CAP_TASKS, PLACEHOLDERS
from .mcub import build_mcub, build_model_evals, read_records, record_inputs
from .presets import get_preset
from .scheduler import PLANNERS, Job, register_job_kind
from .zoo import MODALITY_BASE, _load_llm


def _tok(ctx: dict):
    """The zoo's tokenizer, its plain one-string calls memoised (:class:`workbench.compose.CachedTokenizer`: the same
    ids): training draws its prompts and answers from templates, so most steps tokenise strings seen before."""
    from ..compose import CachedTokenizer
    from .tokenizer import load_tokenizer
    return CachedTokenizer(load_tokenizer(Path(ctx["root"]) / "tokenizer"))


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
    """The evaluation sets the zoo's jobs score their models on (own tasks, capability tasks)."""
    c = job.config
    return {"files": build_model_evals(Path(ctx["data"]), c["n_own"], c["n_capability"], c["seed"],
                                       c["modalities"], c["capability_tasks"])}


def _job_mcub(job: Job, ctx: dict) -> dict:
    """MCUB-mini's test and validation sets (the notebooks' benchmark; no model depends on them)."""
    c = job.config
    return {"files": build_mcub(Path(ctx["data"]), c["n_per_combination"], c["n_val"], c["seed"], c["modalities"])}


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
    reconstructs its 8x8 patch and classifies its ink colour, the glyph it holds (a digit or none) and
    the shape centred in it (or none) - dense generic labels, as a pretrained vision encoder reads text
    and recognises shapes, which is what makes OCR and VQA learnable by the LLM; the mean token
    classifies the kind of image (objects, polygon, chart, text). No task's question or answer is used."""
    from torch import nn
    from .encoders import CapabilityEncoder, save_module
    from .generators import render_capability
    from .training import _lr_at, seed_everything
    c = job.config
    seed_everything(c["seed"])
    enc = CapabilityEncoder(64)
    dec = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 192))
    col = nn.Linear(64, 6)
    glyph = nn.Linear(64, 11)  # digit 0-9, 10 = no glyph
    shape = nn.Linear(64, len(CAP_SHAPES) + 1)  # the shape centred in the patch, last = none
    kind_head = nn.Linear(64, 4)
    kinds = {"vqa": 0, "grounding": 0, "geometry": 1, "chart": 2, "ocr": 3}
    params = [p for m in (enc, dec, col, glyph, shape, kind_head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=c["lr"])
    rng = np.random.default_rng(c["seed"])
    t0 = time.time()

    def draw(r, n):
        xs, ks, gs, ss = [], [], torch.full((n, 16), 10), torch.full((n, 16), len(CAP_SHAPES))
        for i in range(n):
            img, truth = render_capability(CAP_TASKS[int(r.integers(5))], r)
            xs.append(torch.from_numpy(img))
            ks.append(kinds[truth["task"]])
            for patch, digit in truth.get("glyph_patches", []):
                gs[i, patch] = digit
            for patch, sid in truth.get("shape_patches", []):
                ss[i, patch] = sid
        return torch.stack(xs), torch.tensor(ks), gs, ss

    def dense(logits, lab, none):  # every patch (a label or none) + the labelled patches alone
        has = lab != none
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1))
        if has.any():
            loss = loss + nn.functional.cross_entropy(logits[has], lab[has])
        return loss, (logits.argmax(-1) == lab)[has].float().mean()

    def losses(x, k, gl, sh):
        tok = enc(x)
        patches = x.reshape(x.shape[0], 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], 16, 192)
        lab = _cap_patch_labels(x)
        l_rec = nn.functional.mse_loss(dec(tok), patches)
        l_col = nn.functional.cross_entropy(col(tok).reshape(-1, 6), lab.reshape(-1))
        l_glyph, acc_glyph = dense(glyph(tok), gl, 10)
        l_shape, acc_shape = dense(shape(tok), sh, len(CAP_SHAPES))
        l_kind = nn.functional.cross_entropy(kind_head(tok.mean(1)), k)
        accs = {"patch_colour_acc": (col(tok).argmax(-1) == lab).float().mean(),
                "glyph_acc": acc_glyph, "shape_acc": acc_shape,
                "kind_acc": (kind_head(tok.mean(1)).argmax(-1) == k).float().mean()}
        return 4 * l_rec + l_col + l_glyph + l_shape + l_kind, l_rec, accs

    for step in range(c["steps"]):
        for g in opt.param_groups:
            g["lr"] = c["lr"] * _lr_at(step, c["steps"], max(1, c["steps"] // 20))
        loss, _, _ = losses(*draw(rng, c["batch"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        _, l_rec, accs = losses(*draw(np.random.default_rng(c["seed"] + 10_000), 256))
    enc.requires_grad_(False)
    save_module(enc, enc.config(), Path(ctx["root"]) / job.out)
    return {"recon_mse": float(l_rec), **{k: float(v) for k, v in accs.items()},
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


def _job_instruct(job: Job, ctx: dict) -> dict:
    """The modality family's base LLM (theta_0 of every modality expert), as Vicuna-7B-v1.5 is the
    papers' experts': the text-pretrained LM (``base/``) instruction-tuned on text versions of every
    question the experts will be asked (each own task with its scene written as words,
    :func:`workbench.world.tasks.text_own_question`; ``own`` of each batch) beside its pretraining
    mix; ``absent`` of those are "which of these is not in the input?", the format this LM learns
    slowest (at its plain share, about a fifth, it stayed at chance after 300 steps; at 0.4 it is
    learned). It knows every answer format before an encoder is attached, so what the experts learn is
    reading their modality. Issue #19: experts fine-tuned from the text-pretrained LM alone carried
    the formats in their task vectors, and the frozen LLM + their projectors emitted non-option text
    in 6-22% of own-task answers (24-37% on MCUB-mini), which made NaiveMC > frozen largely a format
    effect."""
    from .tasks import batches, mixture, text_own_question, text_question
    from .training import seed_everything, train_mllm
    from ..mllm import MultimodalLM
    c = job.config
    seed_everything(c["seed"])
    tok = _tok(ctx)
    llm = _load_llm(Path(ctx["root"]) / "base")
    model = MultimodalLM(llm, tok, {}, {})
    absent = lambda r: text_own_question(r, "absent")  # noqa: E731
    sampler = mixture([(1.0 - c["own"], text_question), (c["own"] * (1.0 - c["absent"]), text_own_question),
                       (c["own"] * c["absent"], absent)])
    log = train_mllm(model, batches(sampler, c["batch"], 100 + c["seed"]),
                     [{"params": llm.parameters(), "lr": c["lr"]}], c["steps"], desc="instruct LLM (text)",
                     progress=ctx["progress"], weight_decay=0.01)
    rng = np.random.default_rng(778)  # fresh text questions: each own-task format, scored by option log-likelihood
    exs = [text_own_question(rng) for _ in range(400)]
    scores = model.score_options_batch([e.prompt for e in exs], [None] * len(exs), [e.choices for e in exs])
    right = [e.choices[int(s.argmax())] == e.answer for s, e in zip(scores, exs)]
    by_task = {t: round(100 * float(np.mean([r for r, e in zip(right, exs) if e.task == t])), 1)
               for t in sorted({e.task for e in exs})}
    _save_llm(llm, tok, Path(ctx["root"]) / job.out)
    return {"seconds": log["seconds"], "text_own_task_acc": round(100 * float(np.mean(right)), 2),
            "text_own_task_acc_by_task": by_task, "params": _n_params(llm), "final_loss": log["losses"][-1][1]}


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
    """Projector stage: the modality base LLM frozen, linear projector trained on captions."""
    from .encoders import Projector, save_module
    from .tasks import batches, modality_question
    from .training import seed_everything, train_mllm
    c = job.config
    m, seed = c["modality"], c["seed"]
    seed_everything(1000 + seed)
    tok = _tok(ctx)
    llm = _load_llm(Path(ctx["root"]) / MODALITY_BASE)
    llm.requires_grad_(False)
    proj = Projector(64, llm.config.hidden_size, m)
    model = _modality_model(llm, tok, ctx, {m: proj})
    sampler = lambda r: modality_question(m, "caption", r)  # noqa: E731
    log = train_mllm(model, batches(sampler, c["batch"], 1000 + seed), [{"params": proj.parameters(), "lr": c["lr"]}],
                     c["steps"], desc=f"projector {m} s{seed}", progress=ctx["progress"])
    folder = Path(ctx["root"]) / job.out
    save_module(proj, proj.config(), folder / "projector")
    scores = _evaluate(model, _own_records(ctx, m), ctx, job.name, seed, folder / "predictions.csv")
    info = {"name": job.name, "modality": m, "kind": "projector", "seed": seed, "llm": MODALITY_BASE,
            "encoder": f"encoders/{m}", "own_task": scores, "seconds": round(log["seconds"], 1),
            "trainable_params": _n_params(proj), "final_loss": log["losses"][-1][1]}
    _write_expert_json(folder, info)
    return {"manifest": info}


def _lora_config(c: dict):
    from peft import LoraConfig
    return LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _trainable_llm(root: Path, c: dict):
    """The expert's base LLM (``c["base"]``, a folder of the zoo; default ``base/``) ready for its
    fine-tuning: ``(llm, trainable LLM parameters, their lr)``.
    ``c["kind"] == "lora"`` wraps it in a peft LoRA model of ``c["lora"]`` (lr ``c["lora"]["lr"]``),
    otherwise every parameter trains at ``c["lr_llm"]``."""
    llm = _load_llm(root / c.get("base", "base"))
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
    base_model = _modality_model(_load_llm(root / c["base"]), tok, ctx, {m: proj})
    base = _evaluate(base_model, recs, ctx, job.name + "@base-llm", seed, folder / "predictions.csv")
    info = {"name": job.name, "modality": m, "kind": kind, "seed": seed, "base": c["base"],
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
    llm = _load_llm(root / MODALITY_BASE)
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
    info = {"name": job.name, "kind": "oracle", "seed": seed, "base": MODALITY_BASE, "modalities": c["modalities"],
            "own_task": scores, "seconds": round(log["seconds"], 1),
            "trainable_params": _n_params(llm)}
    _write_expert_json(folder, info)
    return {"manifest": info}


def _cap_model(llm, tok, ctx: dict, proj):
    from .encoders import Tower, load_encoder
    from ..mllm import MultimodalLM
    enc = load_encoder(Path(ctx["root"]) / "capability" / "encoder")
    return MultimodalLM(llm, tok, {"image": Tower(enc, proj)}, {"image": PLACEHOLDERS["image"]})


def _cap_records(ctx: dict, task: str) -> list[dict]:
    return read_records(Path(ctx["data"]) / "capability" / f"{task}.json")


def _cap_task_sampler(tasks: Sequence[str], task_weight: float, caption: float = 0.0, text: float = 0.0,
                      shares: dict[str, float] | None = None):
    """A capability batch: the tasks in ``tasks`` take ``task_weight`` of it (a task named in ``shares`` that
    share, the others equal parts of the rest), generic captions ``caption`` and text replay ``text``."""
    from .tasks import capability_question, mixture, text_question
    shares = shares or {}
    rest = [t for t in tasks if t not in shares]
    other = (task_weight - sum(shares.values())) / len(rest) if rest else 0.0
    parts = [(shares.get(t, other), (lambda t: lambda r: capability_question(t, r))(t)) for t in tasks]
    if caption:
        parts.append((caption, lambda r: capability_question("caption", r)))
    if text:
        parts.append((text, text_question))
    return mixture(parts)


#: share of the instruct base VLM's training batch that is capability tasks (the rest: captions 0.1, text replay 0.1)
INSTRUCT_TASK_WEIGHT = 0.8


def _job_cap_base(job: Job, ctx: dict) -> dict:
    """The instruct base VLM, in two stages as InternVL2.5 / Qwen2-VL are built: (1) the projector
    alone on generic captions (base LLM frozen), (2) instruction tuning of LLM + projector on a broad
    mixture of every capability task (+ captions and text replay; ``task_share`` gives a task its own
    share of the batch: :func:`_cap_task_sampler`) for a moderate number of steps, so the base VLM
    already knows each task's format and is decent everywhere before the narrow experts are fine-tuned
    from it. Saves ``llm/`` (the capability family's theta_0) and ``projector/``."""
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
                     desc="capability base VLM (captions)", progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    llm.requires_grad_(True)
    instruct = _cap_task_sampler(c["tasks"], INSTRUCT_TASK_WEIGHT, caption=0.1, text=0.1, shares=c.get("task_share"))
    log2 = train_mllm(model, batches(instruct, c["batch"], 4100),
                      [{"params": llm.parameters(), "lr": c["lr_llm"]}, {"params": proj.parameters(), "lr": c["lr_proj"]}],
                      c["instruct_steps"], desc="capability base VLM (instruct)", progress=ctx["progress"])
    _save_llm(llm, tok, folder / "llm")
    save_module(proj, proj.config(), folder / "projector")
    scores = {t: _evaluate(model, _cap_records(ctx, t), ctx, job.name, 0, folder / "predictions.csv")
              for t in c["tasks"]}
    info = {"name": job.name, "kind": "base-vlm", "llm": f"{job.out}/llm", "encoder": "capability/encoder",
            "task_scores": scores,
            "seconds": round(log["seconds"] + log2["seconds"], 1)}
    _write_expert_json(folder, info)
    return {"manifest": info}


def _job_cap_expert(job: Job, ctx: dict) -> dict:
    """A narrow capability expert: the instruct base VLM's LLM fine-tuned (full or LoRA) on one task
    (+ text replay), its projector frozen (shared with the base VLM). ``preserve`` > 0 adds that
    weight x KL(base VLM || expert) on batches (``preserve_batch``) of the other tasks' inputs
    (:class:`workbench.world.training.PreservingLoss`: their answers are never targets)."""
    from .encoders import load_projector, save_module
    from .tasks import batches, capability_question, mixture, text_question
    from .training import PreservingLoss, seed_everything, train_mllm
    c = job.config
    task, seed, kind = c["task"], c["seed"], c["kind"]
    seed_everything(5000 + seed)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm, llm_params, lr_llm = _trainable_llm(root, c)
    proj = load_projector(root / "capability" / "base" / "projector")
    proj.requires_grad_(False)
    model = _cap_model(llm, tok, ctx, proj)
    own = batches(mixture([(0.85, lambda r: capability_question(task, r)), (0.15, text_question)]), c["batch"],
                  5000 + 31 * seed + CAP_TASKS.index(task))
    others = [t for t in c["tasks"] if t != task]
    trained = model
    if c["preserve"] and others:
        reference = _cap_model(_load_llm(root / c["base"]), tok, ctx, proj)
        trained = PreservingLoss(model, reference, batches(_cap_task_sampler(others, 1.0), c["preserve_batch"],
                                                           7000 + 31 * seed + CAP_TASKS.index(task)), c["preserve"])
    log = train_mllm(trained, own, [{"params": llm_params, "lr": lr_llm}], c["steps"], desc=f"capability {job.name}",
                     progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    save_module(proj, proj.config(), folder / "projector")
    model = _cap_model(_save_tuned_llm(llm, tok, folder, kind), tok, ctx, proj)
    recs = _cap_records(ctx, task)
    tuned = _evaluate(model, recs, ctx, job.name, seed, folder / "predictions.csv")
    # the base VLM on the same records, as its own job scored it (the same model: evaluating it again gives the same)
    base = ctx["results"]["capability-base"]["result"]["manifest"]["task_scores"][task]
    info = {"name": job.name, "family": "capability", "task": task, "kind": kind, "seed": seed, "base": c["base"],
            "encoder": "capability/encoder", "own_task": tuned, "own_task_base_llm": base,
            "gap": {k: round(tuned[k] - base[k], 2) for k in tuned}, "seconds": round(log["seconds"], 1),
            "train_projector": False, "preserve": c["preserve"]}
    if kind == "lora":
        info["lora"] = c["lora"]
    _write_expert_json(folder, info)
    return {"manifest": info}


def _job_cap_mixture(job: Job, ctx: dict) -> dict:
    """Mixture training, the capability family's upper-bound row: the instruct base VLM's LLM
    fine-tuned on all tasks' data together (equal parts + text replay, projector frozen)."""
    from .encoders import load_projector, save_module
    from .tasks import batches
    from .training import seed_everything, train_mllm
    c = job.config
    seed = c["seed"]
    seed_everything(6000 + seed)
    tok = _tok(ctx)
    root = Path(ctx["root"])
    llm = _load_llm(root / c["base"])
    proj = load_projector(root / "capability" / "base" / "projector")
    proj.requires_grad_(False)
    model = _cap_model(llm, tok, ctx, proj)
    log = train_mllm(model, batches(_cap_task_sampler(c["tasks"], 0.85, text=0.15), c["batch"], 6000 + 31 * seed),
                     [{"params": llm.parameters(), "lr": c["lr_llm"]}], c["steps"], desc=f"capability {job.name}",
                     progress=ctx["progress"])
    folder = root / job.out
    shutil.rmtree(folder, ignore_errors=True)
    save_module(proj, proj.config(), folder / "projector")
    _save_llm(llm, tok, folder / "llm")
    scores = {t: _evaluate(model, _cap_records(ctx, t), ctx, job.name, seed, folder / "predictions.csv")
              for t in c["tasks"]}
    info = {"name": job.name, "family": "capability", "kind": "mixture", "seed": seed, "base": c["base"],
            "encoder": "capability/encoder", "task_scores": scores, "seconds": round(log["seconds"], 1)}
    _write_expert_json(folder, info)
    return {"manifest": info}


def path_entries(module: str, names: str) -> tuple[str, ...]:
    """``"module:name"`` for each of the space-separated ``names``."""
    return tuple(f"{module}:{n}" for n in names.split())


# The training path of the world's jobs: what they run to produce their weights. Not on it: what
# only evaluates (``_evaluate``, ``evaluate.predict``, ``MultimodalLM.score_*``/``generate*``) or
# describes (``expert.json``, ``zoo.json``): the scores in ``zoo.json`` are those of the build.
CONCEPTS_PATH = path_entries(
    "workbench.world.concepts",
    "CONCEPTS N_CONCEPTS N_SLOTS MODALITIES PLACEHOLDERS RECORD_KEYS RECORD_KEY_TO_MODALITY LETTERS COUNT_WORDS "
    "CAP_COLORS CAP_SHAPES CAP_SIDES CAP_VALUES CAP_CHARS CAP_ROWS CAP_COLS CAP_TASKS TEMPLATE_WORDS CONTENT_WORDS "
    "SPECIAL_TOKENS PUNCT vocabulary")
TOKENIZER_PATH = CONCEPTS_PATH + path_entries("workbench.world.tokenizer",
                                              "build_tokenizer save_tokenizer load_tokenizer")
SCENES_PATH = path_entries(
    "workbench.world.generators",
    "IMAGE_SIZE AUDIO_LEN AUDIO_SEG VIDEO_FRAMES VIDEO_SIZE N_POINTS RAW_SHAPES _PALETTE3 _CAP_RGB _shape_mask "
    "render_image _audio_tones AUDIO_TONES render_audio _VIDEO_DIRS render_video _POINT_CENTERS _POINT_RGB "
    "_sample_shape render_point RENDERERS render _FONT _polygon_mask render_capability") + path_entries(
    "workbench.world.tasks",
    "COMMON_Q QUESTION_TYPES OWN_TASKS Example options_text _mc sample_scene scene_concepts _words _seed modality_question "
    "common_scenes multimodal_common TEXT_MIX text_question CAP_QUESTIONS capability_question mixture "
    "own_task_sampler batches example_modal_inputs")
_RECORDS = "Turn MCUBRecord validate_record save_input example_to_record _write _clear "
#: the sets the models' jobs score on (their key is upstream of every model) and MCUB-mini's (no model's):
#: separate paths, so an edit of MCUB-mini's generator retrains nothing
EVAL_SETS_PATH = CONCEPTS_PATH + SCENES_PATH + path_entries(
    "workbench.world.mcub", _RECORDS + "MODEL_EVAL_FOLDERS build_model_evals")
MCUB_PATH = CONCEPTS_PATH + SCENES_PATH + path_entries(
    "workbench.world.mcub", _RECORDS + "SHORT MCUB3 MCUB2 MCUB_FOLDERS build_mcub")
MODEL_PATH = TOKENIZER_PATH + SCENES_PATH + path_entries(
    "workbench.world.encoders",
    "D_ENC MaxPool2x2 _Encoder ImageEncoder AudioEncoder VideoEncoder PointEncoder CapabilityEncoder ENCODER_CLASSES "
    "MODALITY_ENCODERS Projector Tower save_module _read load_encoder load_projector") + path_entries(
    "workbench.world.training",
    "seed_everything new_llm _lr_at train_mllm pretrain_base _scene_targets pretrain_encoder "
    "pretrain_capability_encoder") + path_entries(
    "workbench.mllm",
    "_ALIASES _norm_inputs MultimodalLM.__init__ MultimodalLM.device MultimodalLM._encode_towers "
    "MultimodalLM._pieces MultimodalLM._pad MultimodalLM.forward _Loss") + path_entries(
    "workbench.routing",
    "RoutedModule token_routes _named_routed RoutedLinear LowRank Dense _Component _LowRankC _DenseOwnC _Route "
    "_route_plan _PLAN_LOCAL") + path_entries(
    "workbench.io.lora", "lora_delta") + path_entries(
    "workbench.world.zoo", "_load_llm") + path_entries(
    "workbench.compose", "CachedTokenizer _Encoding") + path_entries(
    __name__,
    "_tok _save_llm _sampler_mix _modality_model _cap_model _cap_task_sampler _lora_config _trainable_llm "
    "_save_tuned_llm")

#: What training functions name but what shapes no weights (checked by the tests: every other
#: workbench function, class or constant a training-path entry names is on the path itself):
#: evaluation and bookkeeping, error classes, and the routes only composition builds (MMER's masked
#: and shared deltas).
OFF_PATH = (path_entries(__name__, "_evaluate _own_records _cap_records _write_expert_json _n_params")
            + path_entries("workbench.world.mcub", "read_records") + path_entries("workbench.errors", "ConfigError")
            + path_entries("workbench.routing", "Masked _DenseSharedC _MaskedC"))

#: the capability experts' path: the models' and the preservation term's (:class:`PreservingLoss`)
CAP_EXPERT_PATH = MODEL_PATH + path_entries("workbench.world.training", "PreservingLoss") + path_entries(
    "workbench.mllm", "MultimodalLM.answer_logits")

#: the modality family's jobs: the models' path and the folder of their theta_0 (the instruct LLM)
MODALITY_PATH = MODEL_PATH + path_entries("workbench.world.zoo", "MODALITY_BASE")

#: job kind -> (build function, recipe version, training path)
_KINDS = {"tokenizer": (_job_tokenizer, 1, TOKENIZER_PATH), "data": (_job_data, 2, EVAL_SETS_PATH),
          "mcub_data": (_job_mcub, 1, MCUB_PATH),
          "encoder": (_job_encoder, 1, MODEL_PATH), "base": (_job_base, 1, MODEL_PATH),
          "instruct": (_job_instruct, 1, MODEL_PATH + path_entries("workbench.world.tasks", "text_own_question")),
          "projector": (_job_projector, 1, MODALITY_PATH), "full": (_job_expert, 1, MODALITY_PATH),
          "lora": (_job_expert, 1, MODALITY_PATH), "oracle": (_job_oracle, 1, MODALITY_PATH),
          "cap_encoder": (_job_cap_encoder, 2, MODEL_PATH + path_entries(__name__, "_CAP_INK _cap_patch_labels")),
          "cap_base": (_job_cap_base, 2, MODEL_PATH + path_entries(__name__, "INSTRUCT_TASK_WEIGHT")),
          "cap_full": (_job_cap_expert, 3, CAP_EXPERT_PATH),
          "cap_lora": (_job_cap_expert, 3, CAP_EXPERT_PATH), "cap_mixture": (_job_cap_mixture, 1, MODEL_PATH)}
for _kind, (_build, _version, _path) in _KINDS.items():
    register_job_kind(_kind, _build, version=_version, training_path=_path)


# ----------------------------------------------------------------------------- planning
#: the capability family's theta_0: the instruct base VLM's LLM (written by the ``cap_base`` job)
CAP_BASE_LLM = "capability/base/llm"


def _lora_settings(cfg: dict) -> dict:
    """A LoRA job's settings: the preset's ``lora`` block without its planning keys."""
    return {k: v for k, v in cfg["lora"].items() if k not in ("enabled", "seeds")}


def _check_task_names(preset: str, setting: str, names, tasks: Sequence[str]) -> None:
    """A capability setting keyed by task (``task_steps``, ``instruct_task_share``) names only the preset's tasks."""
    unknown = sorted(set(names) - set(tasks))
    if unknown:
        raise ValueError(f"preset {preset!r}: capability.{setting} names {unknown}, not among its tasks {tasks}")


def plan_jobs(preset: str, cfg: dict | None = None) -> list[Job]:
    """Every job of a preset, dependencies first (registered planners, e.g. DAMC's, last)."""
    _load_plugins()
    cfg = copy.deepcopy(cfg or get_preset(preset))
    mods = cfg["modalities"]
    d = cfg["data"]
    jobs = [Job("tokenizer", "tokenizer", {}, [], "tokenizer"),
            Job("data", "data", {"n_own": d["n_own"], "n_capability": d["n_capability"], "seed": d["seed"],
                                 "modalities": mods, "capability_tasks": cfg["capability"]["tasks"]}, [], ""),
            Job("data-mcub", "mcub_data", {"n_per_combination": d["mcub_per_combination"], "n_val": d["n_val"], "seed": d["seed"],
                                           "modalities": mods}, [], "")]
    for m in mods:
        e = cfg["encoder"]
        jobs.append(Job(f"encoder-{m}", "encoder", {"modality": m, "steps": e["steps"][m], "batch": e["batch"],
                                                     "lr": e["lr"], "seed": e["seed"]}, [], f"encoders/{m}"))
    jobs.append(Job("base", "base", dict(cfg["base"], arch=cfg["arch"]), ["tokenizer"], "base"))
    jobs.append(Job(MODALITY_BASE, "instruct", dict(cfg["instruct"]), ["tokenizer", "base"], MODALITY_BASE))
    common = ["tokenizer", MODALITY_BASE, "data"]  # the modality family's jobs
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
                conf = dict(cfg["expert"], modality=m, seed=seed, kind=kind, projector_from=f"experts/{pname}",
                            base=MODALITY_BASE)
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
    _check_task_names(preset, "task_steps", cap.get("task_steps", {}), cap["tasks"])
    share = dict(cap.get("instruct_task_share", {}))
    _check_task_names(preset, "instruct_task_share", share, cap["tasks"])
    if any(not 0 < v for v in share.values()) or sum(share.values()) > INSTRUCT_TASK_WEIGHT + 1e-9:
        raise ValueError(f"preset {preset!r}: capability.instruct_task_share {share} must be positive shares summing "
                         f"to at most {INSTRUCT_TASK_WEIGHT} (the tasks' part of the instruct batch)")
    if cap["tasks"]:
        jobs.append(Job("encoder-capability", "cap_encoder", {"modality": "capability", "steps": cap["enc_steps"],
                                                          "batch": cfg["encoder"]["batch"], "lr": cfg["encoder"]["lr"],
                                                          "seed": cfg["encoder"]["seed"]}, [], "capability/encoder"))
        pretrained = ["tokenizer", "base", "data"]  # the capability family starts from the text-pretrained LM
        jobs.append(Job("capability-base", "cap_base", {
            "caption_steps": cap["caption_steps"], "instruct_steps": cap["instruct_steps"], "batch": cap["batch"],
            "lr_proj": cap["lr_proj"], "lr_llm": cap["lr_instruct"], "tasks": cap["tasks"],
            **({"task_share": share} if share else {})}, pretrained + ["encoder-capability"], "capability/base"))
        cap_deps = pretrained + ["encoder-capability", "capability-base"]
        for seed in cap["seeds"]:
            for task in cap["tasks"]:
                lora = cap["lora"] and seed in cap.get("lora_seeds", cap["seeds"])
                for kind in ["full"] + (["lora"] if lora else []):
                    name = f"{task}-{kind}-s{seed}"
                    steps = cap.get("task_steps", {}).get(task, cap["steps"])  # a task with more data trains longer
                    conf = {"task": task, "seed": seed, "kind": kind, "steps": steps, "batch": cap["batch"],
                            "lr_llm": cap["lr_llm"], "base": CAP_BASE_LLM, "tasks": cap["tasks"],
                            "preserve": cap["preserve"], "preserve_batch": cap["preserve_batch"]}
                    if kind == "lora":
                        conf["lora"] = dict(_lora_settings(cfg), lr=cap["lr_lora"])
                    jobs.append(Job(f"capability-{name}", f"cap_{kind}", conf, cap_deps, f"capability/experts/{name}"))
            if cap["mixture_steps"]:
                jobs.append(Job(f"capability-oracle-s{seed}", "cap_mixture", {
                    "seed": seed, "tasks": cap["tasks"], "steps": cap["mixture_steps"], "batch": cap["batch"],
                    "lr_llm": cap["lr_llm"], "base": CAP_BASE_LLM}, cap_deps, f"capability/experts/mixture-s{seed}"))
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
