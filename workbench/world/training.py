"""Training loops of the miniature world (CPU, deterministic from seeds).

Reusable pieces (DAMC training in :mod:`workbench.world.damc` uses them):

- :func:`train_mllm` - AdamW over explicit parameter groups, linear warm-up + cosine decay,
  gradient clipping, tqdm progress; the model is a :class:`workbench.mllm.MultimodalLM` (or any
  module with the same ``forward(prompts, modal_inputs, answers)``) and the batches are lists of
  :class:`workbench.world.tasks.Example`;
- :func:`new_llm` - a fresh ``LlamaForCausalLM`` for the world's tokenizer;
- :func:`pretrain_base`, :func:`pretrain_encoder`, :func:`pretrain_capability_encoder`.
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ..mllm import MultimodalLM, _Loss
from .concepts import N_CONCEPTS
from .encoders import MODALITY_ENCODERS, CapabilityEncoder
from .generators import render, render_capability
from .tasks import Example, batches, example_modal_inputs, sample_scene, text_question


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32 - 1))


def new_llm(tokenizer, hidden: int, layers: int, heads: int, ffn: int, seed: int, max_len: int = 128
            ) -> LlamaForCausalLM:
    """A freshly initialised Llama (untied embeddings, no biases) sized for the world."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.05)
    return LlamaForCausalLM(cfg)


def _lr_at(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def train_mllm(model: nn.Module, batch_iter: Iterable[Sequence[Example]], param_groups: list[dict],
               steps: int, warmup: int | None = None, grad_clip: float = 1.0, weight_decay: float = 0.0,
               desc: str = "train", progress: bool = True, log_every: int = 25, length_buckets: int = 3) -> dict:
    """Train ``model`` for ``steps`` steps on ``batch_iter``; only ``param_groups`` are updated.

    ``param_groups``: ``[{"params": [...], "lr": float}, ...]`` (AdamW groups; each group's lr is
    scaled by the schedule). ``length_buckets``: passed to ``MultimodalLM.forward`` (same loss, less
    padding; 1 = one padded batch, what any module with ``forward(prompts, modal_inputs, answers)`` takes). Returns ``{"losses": [(step, loss)], "seconds": float}``.
    """
    groups = [dict(g) for g in param_groups]
    for g in groups:
        g["params"] = [p for p in list(g["params"]) if p.requires_grad]
        g["base_lr"] = g["lr"]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("train_mllm: no trainable parameters in param_groups")
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = warmup if warmup is not None else max(1, steps // 20)
    model.train()
    losses: list[tuple[int, float]] = []
    it: Iterator = iter(batch_iter)
    t0 = time.time()
    run = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0, leave=False)
    for step in bar:
        batch = next(it)
        f = _lr_at(step, steps, warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        args = ([e.prompt for e in batch], [example_modal_inputs(e) for e in batch], [e.answer for e in batch])
        out = model(*args, length_buckets=length_buckets) if length_buckets != 1 else model(*args)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
        opt.step()
        lv = float(loss.detach())
        run = lv if step == 0 else 0.95 * run + 0.05 * lv
        if step % log_every == 0 or step == steps - 1:
            losses.append((step, lv))
            bar.set_postfix(loss=f"{run:.3f}")
    model.eval()
    return {"losses": losses, "seconds": time.time() - t0}


class PreservingLoss(nn.Module):
    """A model to train whose loss keeps a reference model's answers elsewhere: ``model``'s own
    loss on the batch it is given plus ``weight`` x KL(reference || model), the mean over answer
    tokens of a second batch drawn from ``preserve`` (gold answers as context only - never as
    targets: the reference's distribution at each answer position is what is kept). With
    ``weight = 0`` it is ``model`` (no second batch is drawn). :func:`train_mllm` trains it like
    the model itself (``param_groups`` name the model's parameters; the reference stays frozen).

    Why the capability experts use it (issue #19): fine-tuned on one narrow task, a 4-layer,
    128-wide LLM overwrites what the other tasks use (one expert alone cost other tasks up to 30
    points) and its task vector is not disentangled from the others', so no merge kept the experts'
    gains; a multi-billion-parameter MLLM fine-tuned on narrow data changes its other tasks far
    less, because its capacity leaves room. This term stands in for that capacity: the expert
    still learns only its own task (its gain comes from its own data alone) while its outputs
    elsewhere stay the base's - the weight-disentanglement regime (Ortiz-Jimenez et al., 2023) in
    which task arithmetic and its successors work as published."""

    def __init__(self, model: nn.Module, reference: nn.Module, preserve: Iterator[Sequence[Example]],
                 weight: float) -> None:
        super().__init__()
        self.model = model
        self.weight = float(weight)
        self._reference = [reference.requires_grad_(False).eval()]  # a list: not a submodule (never trained)
        self._preserve = preserve

    def forward(self, prompts, modal_inputs, answers, **kwargs):
        out = self.model(prompts, modal_inputs, answers, **kwargs)
        if not self.weight:
            return out
        batch = next(self._preserve)
        args = ([e.prompt for e in batch], [example_modal_inputs(e) for e in batch], [e.answer for e in batch])
        with torch.no_grad():
            ref = torch.log_softmax(self._reference[0].answer_logits(*args).float(), -1)
        cur = torch.log_softmax(self.model.answer_logits(*args).float(), -1)
        kl = torch.nn.functional.kl_div(cur, ref, log_target=True, reduction="batchmean")
        return _Loss(out.loss + self.weight * kl)


# ----------------------------------------------------------------------------- base LLM
def pretrain_base(tokenizer, arch: dict, steps: int, batch_size: int, lr: float, seed: int,
                  progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Text-only pretraining (copy + commonality over word lists). Returns (llm, log)."""
    seed_everything(seed)
    llm = new_llm(tokenizer, arch["hidden"], arch["layers"], arch["heads"], arch["ffn"], seed)
    model = MultimodalLM(llm, tokenizer, {}, {})
    log = train_mllm(model, batches(text_question, batch_size, seed), [{"params": llm.parameters(), "lr": lr}],
                     steps, desc="base LLM (text)", progress=progress, weight_decay=0.01)
    return llm, log


# ----------------------------------------------------------------------------- encoders
def _scene_targets(scene: Sequence[int]) -> list[int]:
    return [k if k >= 0 else N_CONCEPTS for k in scene]


def pretrain_encoder(modality: str, steps: int, batch_size: int, lr: float, seed: int, d_enc: int = 64,
                     progress: bool = True, eval_n: int = 256) -> tuple[nn.Module, dict]:
    """Pretrain a modality encoder: each output token classifies its slot (12 concepts + empty).

    Returns (frozen encoder, {"set_accuracy", "slot_accuracy", "seconds"}) measured on ``eval_n``
    fresh scenes (seed + 10_000).
    """
    seed_everything(seed)
    enc = MODALITY_ENCODERS[modality](d_enc)
    head = nn.Linear(d_enc, N_CONCEPTS + 1)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    t0 = time.time()

    def draw(r: np.random.Generator, n: int):
        scenes = [sample_scene(r) for _ in range(n)]
        x = torch.stack([torch.from_numpy(render(modality, s, int(r.integers(2**31 - 1)))) for s in scenes])
        y = torch.tensor([_scene_targets(s) for s in scenes])
        return x, y

    for step in tqdm(range(steps), desc=f"encoder {modality}", disable=not progress, mininterval=2.0, leave=False):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_at(step, steps, max(1, steps // 20))
        x, y = draw(rng, batch_size)
        logits = head(enc(x))
        loss = nn.functional.cross_entropy(logits.reshape(-1, N_CONCEPTS + 1), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        x, y = draw(np.random.default_rng(seed + 10_000), eval_n)
        pred = head(enc(x)).argmax(-1)
    enc.requires_grad_(False)
    return enc, {"set_accuracy": float((pred == y).all(1).float().mean()),
                 "slot_accuracy": float((pred == y).float().mean()), "seconds": time.time() - t0,
                 "final_loss": float(loss.detach())}


def pretrain_capability_encoder(steps: int, batch_size: int, lr: float, seed: int, d_enc: int = 64,
                                progress: bool = True) -> tuple[nn.Module, dict]:
    """Generic (task-agnostic) pretraining of the capability vision encoder: each of its 16 patch
    tokens reconstructs its 8x8 patch (an autoencoder), on images of all five kinds."""
    from .concepts import CAP_TASKS
    seed_everything(seed)
    enc = CapabilityEncoder(d_enc)
    dec = nn.Sequential(nn.Linear(d_enc, 128), nn.GELU(), nn.Linear(128, 3 * 8 * 8))
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(seed)
    t0 = time.time()

    def draw(r: np.random.Generator, n: int) -> torch.Tensor:
        return torch.stack([torch.from_numpy(render_capability(CAP_TASKS[int(r.integers(5))], r)[0]) for _ in range(n)])

    def patches(x: torch.Tensor) -> torch.Tensor:  # [B,3,32,32] -> [B,16,192]
        b = x.shape[0]
        return x.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 192)

    for step in tqdm(range(steps), desc="encoder capability", disable=not progress, mininterval=2.0, leave=False):
        for g in opt.param_groups:
            g["lr"] = lr * _lr_at(step, steps, max(1, steps // 20))
        x = draw(rng, batch_size)
        loss = nn.functional.mse_loss(dec(enc(x)), patches(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        x = draw(np.random.default_rng(seed + 10_000), 128)
        mse = float(nn.functional.mse_loss(dec(enc(x)), patches(x)))
        var = float(patches(x).var())
    enc.requires_grad_(False)
    return enc, {"recon_mse": mse, "pixel_var": var, "seconds": time.time() - t0}
