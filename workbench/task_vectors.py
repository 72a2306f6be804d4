"""Task vectors and the parsing of tensor names into (layer, module type).

A task vector is ``tau_i = theta_i - theta_0`` (methods.md, notation). A LoRA expert's delta is the
*product* ``s * B @ A`` (``s = alpha / r``), never the factors averaged separately (methods.md 1):
:func:`workbench.io.lora.lora_delta`.
"""
from __future__ import annotations

import re

import torch

from .errors import CheckpointError

__all__ = ["MODULE_TYPES", "task_vector", "parse_tensor_name"]

#: Every module type :func:`parse_tensor_name` can return.
MODULE_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down", "embed", "head", "norm", "vision",
                                 "projector", "other")


def task_vector(base: torch.Tensor, expert: torch.Tensor, *, name: str | None = None) -> torch.Tensor:
    """``tau = expert - base`` in float32 (on ``expert``'s device).

    Args:
        base: the base weight ``theta_0``.
        expert: the expert's weight ``theta_i`` (same shape).
        name: the tensor's name, used in the error message only.

    Raises:
        CheckpointError: the shapes differ (the tensor is named).
    """
    if tuple(base.shape) != tuple(expert.shape):
        raise CheckpointError(f"expert shape {list(expert.shape)} differs from the base's {list(base.shape)}",
                              tensor=name)
    return expert.to(torch.float32) - base.to(device=expert.device, dtype=torch.float32)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
_VISION = re.compile(r"(?:^|\.)(?:vision_tower|vision_model|visual|image_encoder)(?:\.|$)")
_PROJECTOR = re.compile(r"(?:^|\.)(?:mm_projector|multi_modal_projector|projector|merger|mlp1)(?:\.|$)")
_MODULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), m) for p, m in (
    (r"(?:^|\.)(?:q_proj|query|wq)(?:\.|$)", "q"),
    (r"(?:^|\.)(?:k_proj|key|wk)(?:\.|$)", "k"),
    (r"(?:^|\.)(?:v_proj|value|wv)(?:\.|$)", "v"),
    (r"(?:^|\.)(?:o_proj|out_proj|wo|dense)(?:\.|$)", "o"),
    (r"(?:^|\.)(?:gate_proj|w1)(?:\.|$)", "gate"),
    (r"(?:^|\.)(?:up_proj|w3)(?:\.|$)", "up"),
    (r"(?:^|\.)(?:down_proj|w2)(?:\.|$)", "down"),
    (r"(?:^|\.)(?:embed_tokens|wte|tok_embeddings|word_embeddings)(?:\.|$)", "embed"),
    (r"(?:^|\.)(?:lm_head|output)(?:\.|$)", "head"),
    (r"norm[^.]*(?:\.|$)|(?:^|\.)ln_[^.]*(?:\.|$)", "norm"),
))


def parse_tensor_name(name: str) -> tuple[int | None, str]:
    """``(layer, module type)`` of a Hugging Face Llama / LLaVA / Qwen(2-VL) tensor name.

    The layer is the decoder-layer index of the *language model* (``...layers.<i>.``), ``None``
    for tensors outside a decoder layer and for the vision tower and projector (whose block
    indices are not LLM layers). The module type is one of :data:`MODULE_TYPES`; the vision tower
    and the projector are recognised first, so a vision ``q_proj`` is ``"vision"``.

    Examples::

        model.layers.3.self_attn.q_proj.weight                  -> (3, "q")
        language_model.model.layers.0.mlp.down_proj.weight      -> (0, "down")
        model.language_model.layers.2.input_layernorm.weight    -> (2, "norm")
        lm_head.weight                                          -> (None, "head")
        model.embed_tokens.weight                               -> (None, "embed")
        vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight -> (None, "vision")
        multi_modal_projector.linear_1.weight                   -> (None, "projector")
        visual.merger.mlp.0.weight (Qwen2-VL)                   -> (None, "projector")
        visual.blocks.0.attn.qkv.weight (Qwen2-VL)              -> (None, "vision")
    """
    if _PROJECTOR.search(name):
        # tested before the vision tower: Qwen2-VL's projector (``visual.merger``) lives inside ``visual``
        return None, "projector"
    if _VISION.search(name):
        return None, "vision"
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for pat, mod in _MODULES:
        if pat.search(name):
            return layer, mod
    return layer, "other"
