"""LLaVA's image tower as a module, and a tiny random LLaVA family on disk for demos and tests.

- :class:`LlavaTower`: vision tower + projector with the config's ``vision_feature_layer`` (an int or
  a list of layers, concatenated) and ``vision_feature_select_strategy`` (``"default"`` drops the CLS
  token, ``"full"`` keeps it) - the features ``LlavaForConditionalGeneration.get_image_features``
  computes; one image ``[3, H, W]`` -> ``[n_tokens, hidden]`` (a stacked batch works too);
- :func:`make_tiny_llava_family`: a random ``LlavaForConditionalGeneration`` base and experts.

A LLaVA checkpoint (either layout) is read like every other multimodal checkpoint, by
:class:`workbench.families.FamilyCheckpoint`: its language model (``language_model``, ``lm_tensor``),
its tower (a :class:`LlavaTower`), its placeholder and tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class LlavaTower(nn.Module):
    """Vision tower + projector of a LLaVA model: one image -> ``[n_tokens, hidden]``.

    Args:
        vision_tower: a CLIP-like vision model returning ``hidden_states`` with
            ``output_hidden_states=True``.
        projector: maps the selected features to the LLM's hidden size.
        feature_layer: index (or list of indices, concatenated on the feature axis) into the
            tower's hidden states (``config.vision_feature_layer``).
        select_strategy: ``"default"`` (drop the CLS token) or ``"full"``.
    """

    supports_batch = True

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, feature_layer: int | Sequence[int] = -2,
                 select_strategy: str = "default") -> None:
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {select_strategy!r}")
        self.vision_tower, self.projector = vision_tower, projector
        self.feature_layer = feature_layer if isinstance(feature_layer, int) else list(feature_layer)
        self.select_strategy = select_strategy

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        pool = [hs[i] for i in layers]
        if self.select_strategy == "default":
            pool = [h[:, 1:] for h in pool]
        return torch.cat(pool, dim=-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        single = pixel_values.dim() == 3
        x = pixel_values.unsqueeze(0) if single else pixel_values
        dt = next(self.vision_tower.parameters()).dtype
        feats = self.projector(self.features(x.to(dt)))
        return feats[0] if single else feats


def make_tiny_llava_family(out_dir: str | Path, n_experts: int = 2, seed: int = 0, *, std: float = 0.02,
                           placeholders: Sequence[str] = ("<image>", "<video>", "<audio>", "<point>")) -> dict:
    """A tiny random LLaVA family on disk, for trying the workbench without real checkpoints.

    Writes ``out_dir/base`` (a random ``LlavaForConditionalGeneration``: CLIP vision tower 16x16 images,
    2-layer Llama, word-level tokenizer whose vocabulary holds every placeholder) and
    ``out_dir/expert<i>`` (i = 1..n): the base with seeded N(0, std²) noise on every tensor, its
    ``image_token_index`` set to ``placeholders[i-1]`` (so each expert has its own placeholder). Returns
    ``{"base": Path, "experts": [Path], "placeholders": [str]}``. Seconds on a CPU; for notebooks and demos.
    """
    import shutil

    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              PreTrainedTokenizerFast)

    if not 1 <= n_experts <= len(placeholders):
        raise ValueError(f"n_experts must be in 1..{len(placeholders)} (one placeholder each)")
    out = Path(out_dir)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{p: 4 + i for i, p in enumerate(placeholders)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), 96)})
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    base = out / "base"
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=4,
                                              vision_feature_layer=-1, vision_feature_select_strategy="full",
                                              projector_hidden_act="gelu")).save_pretrained(base)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=list(placeholders))
    fast.save_pretrained(base)
    g = torch.Generator().manual_seed(seed + 1)
    sd = load_file(str(base / "model.safetensors"))
    experts = []
    for i in range(1, n_experts + 1):
        d = out / f"expert{i}"
        d.mkdir(parents=True, exist_ok=True)
        noisy = {k: v + std * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
                 for k, v in sorted(sd.items())}
        save_file(noisy, str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, d / f.name)
        cfg = json.loads((d / "config.json").read_text())
        cfg["image_token_index"] = vocab[placeholders[i - 1]]
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        experts.append(d)
    return {"base": base, "experts": experts, "placeholders": list(placeholders[:n_experts])}


__all__ = ["LlavaTower", "make_tiny_llava_family"]
