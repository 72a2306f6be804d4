"""Hugging Face LLaVA-style experts (``LlavaForConditionalGeneration`` folders) as composition inputs.

A LLaVA checkpoint holds three parts: the vision tower (CLIP), the ``multi_modal_projector`` and the
language model. :class:`LlavaCheckpoint` reads them lazily and separately:

- :meth:`LlavaCheckpoint.tower` -> :class:`LlavaTower`: vision tower + projector with the config's
  ``vision_feature_layer`` (an int or a list of layers, concatenated) and
  ``vision_feature_select_strategy`` (``"default"`` drops the CLS token, ``"full"`` keeps it) -
  the same features ``LlavaForConditionalGeneration.get_image_features`` computes; one image
  ``[3, H, W]`` -> ``[n_tokens, hidden]`` (a stacked batch works too);
- :meth:`LlavaCheckpoint.language_model` -> a plain causal LM (``AutoModelForCausalLM`` of
  ``config.text_config``) holding the checkpoint's language-model weights;
- :meth:`LlavaCheckpoint.lm_tensor` -> one language-model tensor by its causal-LM name
  (``model.layers.0.self_attn.q_proj.weight``), for streaming merges that never hold N models.

Both key layouts are understood: the legacy one that ``save_pretrained`` writes
(``language_model.model.layers...``, ``language_model.lm_head.weight``, ``vision_tower...``,
``multi_modal_projector...``) and the in-memory transformers-5 one (``model.language_model.layers...``,
``lm_head.weight``, ``model.vision_tower...``, ``model.multi_modal_projector...``); a vision-tower key
may or may not carry CLIP's ``vision_model.`` level.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import CheckpointError

_LM_PREFIXES = ("language_model.", "model.language_model.")
_VT_PREFIXES = ("vision_tower.", "model.vision_tower.")
_PROJ_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


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


class LlavaCheckpoint:
    """A ``LlavaForConditionalGeneration`` folder on disk, read lazily (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        from .io import CheckpointReader

        self.path = Path(path)
        cfg_file = self.path / "config.json"
        try:
            self.config_dict = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable config.json: {e}", file=cfg_file) from e
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(str(self.path))
        if not hasattr(self.config, "vision_config") or not hasattr(self.config, "text_config"):
            raise CheckpointError("not a LLaVA-style config (needs vision_config and text_config)", file=cfg_file)
        self.reader = CheckpointReader(self.path)
        self._keys = set(self.reader.keys())
        self._lm_map = self._build_lm_map()

    # ---- name mapping
    def _build_lm_map(self) -> dict[str, str]:
        out = {}
        for k in self._keys:
            for p in _LM_PREFIXES:
                if k.startswith(p):
                    rest = k[len(p):]
                    if p == "model.language_model.":
                        name = "model." + rest
                    else:  # legacy: language_model.model.* / language_model.lm_head.weight
                        name = rest
                    out[name] = k
        for k in ("lm_head.weight",):
            if k in self._keys and k not in out:
                out[k] = k
        if not out:
            raise CheckpointError("no language-model tensors found (expected keys under 'language_model.' or "
                                  "'model.language_model.')", file=self.path)
        return out

    def lm_names(self) -> list[str]:
        """Language-model tensor names as a causal LM names them, sorted."""
        return sorted(self._lm_map)

    def has_lm_tensor(self, name: str) -> bool:
        return name in self._lm_map

    def lm_tensor(self, name: str) -> torch.Tensor:
        """One language-model tensor by its causal-LM name."""
        if name not in self._lm_map:
            raise CheckpointError("language-model tensor not in the LLaVA checkpoint", file=self.path, tensor=name)
        return self.reader.get(self._lm_map[name])

    def _find(self, name: str, prefixes: Sequence[str], optional_level: str = "") -> str | None:
        cands = []
        for p in prefixes:
            cands.append(p + name)
            if optional_level:  # the level may be in the module's names, the checkpoint's, or neither
                if name.startswith(optional_level):
                    cands.append(p + name[len(optional_level):])
                else:
                    cands.append(p + optional_level + name)
        for c in cands:
            if c in self._keys:
                return c
        return None

    # ---- parts
    def placeholder(self, tokenizer) -> str:
        """The image placeholder token string (``config.image_token_index``)."""
        idx = getattr(self.config, "image_token_index", None) or getattr(self.config, "image_token_id", None)
        tok = tokenizer.convert_ids_to_tokens(int(idx)) if idx is not None else None
        return tok or "<image>"

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))

    def _load_into(self, module: nn.Module, prefixes: Sequence[str], optional_level: str, what: str) -> None:
        sd = module.state_dict()
        new = {}
        for name, t in sd.items():
            key = self._find(name, prefixes, optional_level)
            if key is None:
                raise CheckpointError(f"{what} tensor missing from the checkpoint (tried prefixes {list(prefixes)})",
                                      file=self.path, tensor=name)
            v = self.reader.get(key)
            if tuple(v.shape) != tuple(t.shape):
                raise CheckpointError(f"{what} tensor shape {list(v.shape)} differs from the config's {list(t.shape)}",
                                      file=self.path, tensor=key)
            new[name] = v.to(t.dtype)
        module.load_state_dict(new, strict=True)

    def tower(self, dtype: torch.dtype = torch.float32) -> LlavaTower:
        """The frozen :class:`LlavaTower` (vision tower + projector) of this checkpoint."""
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        cfg = self.config
        vt = AutoModel.from_config(cfg.vision_config)
        self._load_into(vt, _VT_PREFIXES, "vision_model.", "vision tower")
        proj = LlavaMultiModalProjector(cfg)
        self._load_into(proj, _PROJ_PREFIXES, "", "projector")
        tower = LlavaTower(vt, proj, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        tower.to(dtype).eval().requires_grad_(False)
        return tower

    def language_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The language model as a plain causal LM (``AutoModelForCausalLM.from_config(text_config)``)."""
        from transformers import AutoModelForCausalLM

        tc = self.config.text_config
        lm = AutoModelForCausalLM.from_config(tc)
        sd = lm.state_dict()
        tied = bool(getattr(tc, "tie_word_embeddings", False)) or bool(getattr(self.config, "tie_word_embeddings", False))
        new = {}
        for name, t in sd.items():
            if name not in self._lm_map:
                if name == "lm_head.weight" and tied:
                    continue
                raise CheckpointError("language-model tensor missing from the LLaVA checkpoint", file=self.path,
                                      tensor=name)
            v = self.lm_tensor(name)
            if tuple(v.shape) != tuple(t.shape):
                raise CheckpointError(f"shape {list(v.shape)} differs from the text config's {list(t.shape)}",
                                      file=self.path, tensor=name)
            new[name] = v.to(t.dtype)
        lm.load_state_dict(new, strict=False)
        if tied and hasattr(lm, "tie_weights"):
            lm.tie_weights()
        return lm.to(dtype).eval()


def is_llava_folder(path: str | Path) -> bool:
    """``True`` when ``path/config.json`` describes a LLaVA-style model (vision + text config)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text())
    except ValueError:
        return False
    return "vision_config" in cfg and "text_config" in cfg


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


__all__ = ["LlavaCheckpoint", "LlavaTower", "is_llava_folder", "make_tiny_llava_family"]
