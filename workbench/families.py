"""Model families: where a multimodal checkpoint keeps its language model, vision tower and projector.

One registry (:data:`FAMILIES`) that the merge engine (which tensors are kept from the base),
the composition (language model, tower, placeholder, chat template) and the analysis use.
Each :class:`Family` states, for one checkpoint layout:

- ``keep``: regexes of the non-LLM tensors kept from the base (vision tower, projector), added
  to the LLM's own kept tensors (:data:`LLM_KEEP`: embeddings, ``lm_head``, norms, biases) - the
  merging benchmark's rule (Wei et al., ICLR 2026: only the LLM's linear weights are merged);
- ``lm_prefixes``: ``(checkpoint prefix, causal-LM prefix)`` pairs that rename the language
  model's tensors to a plain causal LM's names (``model.layers.0...``, ``lm_head.weight``);
- ``placeholder`` and ``template``: the image token and the chat template of the family's
  released chat models (from their model cards / processors' ``chat_template``);
- how to build the tower: ``one image [3, H, W] -> [n_tokens, hidden]`` (:meth:`FamilyCheckpoint.tower`).

Families (checked against transformers' own classes by ``tests/test_families.py``):

==================  ===========================================  ==========================================
name                detected from ``config.json``                layout
==================  ===========================================  ==========================================
``llava``           ``LlavaForConditionalGeneration``            ``vision_tower``, ``multi_modal_projector``
``llava-original``  ``LlavaLlamaForCausalLM`` (LLaVA repo)       ``model.vision_tower``, ``model.mm_projector``
``qwen2-vl``        ``Qwen2VLForConditionalGeneration``,         ``visual`` (incl. ``visual.merger``)
                    ``Qwen2_5_VLForConditionalGeneration``
``internvl``        ``InternVLForConditionalGeneration``         ``vision_tower``, ``multi_modal_projector``
``internvl-original`` ``InternVLChatModel`` (remote code)        ``vision_model``, ``mlp1``, ``language_model``
``generic``         a text-only LLM, or no ``config.json``       :data:`workbench.io.filters.DEFAULT_KEEP`
==================  ===========================================  ==========================================

Composition: a composed model with a Qwen2-VL tower (:class:`workbench.compose.MRopeMultimodalLM`)
gives its image tokens the family's 3-D M-RoPE positions (time, height, width) when scoring and
generating (:meth:`HFVisionTower.mrope_positions`; checked against transformers' ``get_rope_index``
and logits by the tests); its training forward keeps 1-D positions. The language model alone
(:meth:`FamilyCheckpoint.language_model`) has plain RoPE: M-RoPE with equal position streams (text)
is RoPE. The ``<|vision_start|>``/``<|vision_end|>`` (InternVL: ``<img>``/``</img>``) markers around
an image are not added: write them around the placeholder in the prompt.

Nothing here runs a checkpoint's remote code: the original InternVL layout is read by renaming
its tensors to transformers' ``InternVLForConditionalGeneration`` names (:func:`internvl_original_to_hf`,
following the key mapping of transformers' InternVL conversion script). An InternLM2 language
model (InternVL2.5-8B: ``tok_embeddings``, ``attention.wqkv``, ``feed_forward.w1/w2/w3``, ``output``)
is read as a Llama causal LM, its fused ``wqkv`` split into q, k, v per key-value group
(:func:`internlm2_llama_names`, :func:`split_wqkv`, :func:`internlm2_config`: the same conversion
script, ``src/transformers/models/internvl/convert_internvl_weights_to_hf.py``); merges work on the
checkpoint's own tensors (``wqkv`` merged as one tensor, the keep list unchanged).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .io.filters import DEFAULT_KEEP

#: the language model's own tensors kept from the base (embeddings, output head, norms, biases).
LLM_KEEP: tuple[str, ...] = (
    r"(^|\.)embed_tokens(\.|$)",
    r"(^|\.)tok_embeddings(\.|$)",  # InternLM2 (InternVL2.5-8B's LLM)
    r"(^|\.)lm_head(\.|$)",
    r"^language_model\.output\.weight$",  # InternLM2's output head
    r"norm[^.]*\.(weight|bias)$",
    r"\.bias$",
)


@dataclass(frozen=True)
class Family:
    """One checkpoint layout (see the module docstring)."""

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    keep: tuple[str, ...]
    lm_prefixes: tuple[tuple[str, str], ...]
    placeholder: str
    template: str
    hf_class: str | None
    doc: str

    @property
    def keep_patterns(self) -> tuple[str, ...]:
        """Every regex of tensors kept from the base (the family's modules + :data:`LLM_KEEP`)."""
        return DEFAULT_KEEP if self.name == "generic" else self.keep + LLM_KEEP

    def chat(self, prompt: str) -> str:
        """``prompt`` in the family's chat template (one user turn, the assistant's turn opened)."""
        return self.template.format(prompt=prompt)


_LLAVA_TEMPLATE = "USER: {prompt} ASSISTANT:"  # LLaVA-1.5 (Vicuna v1 style), llava-hf model cards
_CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # Qwen2-VL, InternVL2.5 (Qwen2.5 LLMs)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llava", ("LlavaForConditionalGeneration",), ("llava",),
           (r"(^|\.)vision_tower(\.|$)", r"(^|\.)multi_modal_projector(\.|$)"),
           (("model.language_model.", "model."), ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")),
           "<image>", _LLAVA_TEMPLATE, "LlavaForConditionalGeneration",
           "LLaVA-1.5 in transformers' layout (llava-hf/*)"),
    Family("llava-original", ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"), ("llava_llama",),
           (r"^model\.vision_tower(\.|$)", r"^model\.mm_projector(\.|$)"),
           (("model.", "model."), ("lm_head.", "lm_head.")),
           "<image>", _LLAVA_TEMPLATE, None,
           "LLaVA-1.5 in the original LLaVA repository's layout (liuhaotian/llava-v1.5-*)"),
    Family("qwen2-vl", ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
           ("qwen2_vl", "qwen2_5_vl"),
           (r"(^|\.)visual(\.|$)",),
           (("model.language_model.", "model."), ("model.", "model."), ("lm_head.", "lm_head.")),
           "<|image_pad|>", _CHATML, None,
           "Qwen2-VL / Qwen2.5-VL (vision tower and its merger under visual.*)"),
    Family("internvl", ("InternVLForConditionalGeneration",), ("internvl",),
           (r"(^|\.)vision_tower(\.|$)", r"(^|\.)multi_modal_projector(\.|$)"),
           (("model.language_model.", "model."), ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")),
           "<IMG_CONTEXT>", _CHATML, "InternVLForConditionalGeneration",
           "InternVL2.5 / InternVL3 in transformers' layout (OpenGVLab/*-hf)"),
    Family("internvl-original", ("InternVLChatModel",), ("internvl_chat",),
           (r"^vision_model(\.|$)", r"^mlp1(\.|$)"),
           (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
           "<IMG_CONTEXT>", _CHATML, None,
           "InternVL2.5 / InternVL3 in the original remote-code layout (OpenGVLab/InternVL2_5-*)"),
    Family("generic", (), (), (), (("", ""),), "<image>", "{prompt}", None,
           "a text-only LLM or a folder without config.json: the generic keep list"),
)}
_QWEN_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
#: config.json keys that mark a multimodal model (an unknown one is an error, not the generic list).
_MULTIMODAL_MARKERS = ("vision_config", "mm_vision_tower", "vision_tower", "audio_config", "visual")


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name``; an unknown name raises :class:`ConfigError` listing the known ones."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _unknown(cfg: Mapping, where: str | Path) -> ConfigError:
    return ConfigError(
        f"{where}: a multimodal checkpoint of an unknown family (model_type {cfg.get('model_type')!r}, "
        f"architectures {cfg.get('architectures')}); known families: {', '.join(FAMILIES)}. Name one with "
        "`family: <name>` in the merge YAML, or give the keep list by hand: `keep_defaults: false` and "
        "`exclude: [<regexes of the tensors kept from the base, e.g. the vision tower and projector>]`, "
        "or `family: generic` for the generic list")


def detect_family(config: Mapping | str | Path | None, *, where: str | Path = "config.json") -> Family:
    """The family of a ``config.json`` (a dict, a folder or the file); ``architectures`` first, then
    ``model_type``. A text-only config or ``None`` is ``generic``; an unrecognised multimodal one
    raises :class:`ConfigError` (listing the families and how to give the keep list by hand)."""
    if isinstance(config, (str, Path)):
        p = Path(config)
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file() or f.suffix != ".json":  # a lone weight file: no config to read
            return FAMILIES["generic"]
        try:
            config = json.loads(f.read_text())
        except ValueError as e:
            raise CheckpointError(f"unreadable config.json: {e}", file=f) from e
        where = f
    if not config:
        return FAMILIES["generic"]
    archs = list(config.get("architectures") or [])
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    for fam in FAMILIES.values():
        if config.get("model_type") in fam.model_types:
            return fam
    if any(k in config for k in _MULTIMODAL_MARKERS) or any("ConditionalGeneration" in a for a in archs):
        raise _unknown(config, where)
    return FAMILIES["generic"]


def family_of(folder: str | Path, name: str | None = None) -> Family:
    """``get_family(name)`` if a name is given (the YAML's ``family:``), else :func:`detect_family`."""
    return get_family(name) if name else detect_family(folder)


# ---------------------------------------------------------------------------------- original InternVL
#: original InternVL (remote code) -> transformers ``InternVLForConditionalGeneration`` names, as in
#: transformers' ``convert_internvl_weights_to_hf.py`` (vision part; ``attn.qkv`` is split in three).
_INTERNVL_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.(q|k)_norm\.", r"model.vision_tower.encoder.layer.\1.attention.\2_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)
_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")

#: InternLM2 causal-LM names -> Llama names (the conversion script's ``..._TEXT_LLAMA`` mapping).
_INTERNLM2_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^output\.", "lm_head."),
)
_WQKV = re.compile(r"^(model\.layers\.\d+\.)attention\.wqkv\.weight$")
#: InternLM2 config keys a Llama config does not take (the conversion script's list, plus remote-code keys).
_INTERNLM2_DROP = ("architectures", "model_type", "auto_map", "_name_or_path", "attn_implementation",
                   "_attn_implementation_autoset", "use_bfloat16", "use_flash_attn", "bias", "transformers_version")


def is_internlm2(llm_config: Mapping) -> bool:
    """``True`` for an InternLM2 ``llm_config`` (InternVL2.5-8B / 26B's language model)."""
    archs = llm_config.get("architectures") or []
    return llm_config.get("model_type") == "internlm2" or "InternLM2ForCausalLM" in archs


def internlm2_config(llm_config: Mapping):
    """An InternLM2 ``llm_config`` as a ``LlamaConfig`` (InternLM2 is a Llama with fused q, k, v)."""
    from transformers import LlamaConfig

    if llm_config.get("bias"):
        raise CheckpointError("InternLM2 with biases (bias: true) is not supported: the Llama mapping has none")
    return LlamaConfig(**{k: v for k, v in llm_config.items() if k not in _INTERNLM2_DROP})


def internlm2_llama_names(name: str) -> list[tuple[str, int | None]]:
    """The Llama names of one InternLM2 causal-LM tensor (``model.layers.0.attention.wqkv.weight``...):
    ``[(llama name, part)]`` - ``part`` 0/1/2 of a fused ``wqkv`` (q, k, v: :func:`split_wqkv`), else ``None``."""
    m = _WQKV.match(name)
    if m:
        return [(f"{m[1]}self_attn.{p}_proj.weight", i) for i, p in enumerate("qkv")]
    for pat, rep in _INTERNLM2_RENAMES:
        if re.search(pat, name):
            return [(re.sub(pat, rep, name), None)]
    return [(name, None)]  # model.norm.weight


def split_wqkv(wqkv: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused ``wqkv`` ``[(n_kv · (g + 2) · d), hidden]`` -> q, k, v weights: per key-value
    head, its ``g`` query heads, then its key head, then its value head (``g`` = heads / kv heads)."""
    n_kv, heads = config.num_key_value_heads, config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    g = heads // n_kv
    w = wqkv.reshape(n_kv, g + 2, d, wqkv.shape[-1])
    return (w[:, :g].reshape(-1, w.shape[-1]).contiguous(), w[:, g].reshape(-1, w.shape[-1]).contiguous(),
            w[:, g + 1].reshape(-1, w.shape[-1]).contiguous())


def internvl_original_to_hf(state: Mapping[str, torch.Tensor], llm_config: Mapping | None = None
                            ) -> dict[str, torch.Tensor]:
    """Rename an original-layout InternVL state dict to transformers' names (``qkv`` split in q, k, v);
    an InternLM2 language model (``llm_config``, the checkpoint's) becomes a Llama one."""
    out = {}
    internlm2 = llm_config is not None and is_internlm2(llm_config)
    for k, v in state.items():
        m = _QKV.match(k)
        if m:
            for part, t in zip("qkv", v.chunk(3, dim=0)):
                out[f"model.vision_tower.encoder.layer.{m[1]}.attention.{part}_proj.{m[2]}"] = t
            continue
        if internlm2 and k.startswith("language_model."):
            lm_name = k[len("language_model."):]
            for name, part in internlm2_llama_names(lm_name):
                t = v if part is None else split_wqkv(v, internlm2_config(llm_config))[part]
                out[("" if name.startswith("lm_head.") else "model.language_") + name] = t
            continue
        for pat, rep in _INTERNVL_RENAMES:
            if re.search(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise CheckpointError("tensor of an unknown kind in an original-layout InternVL checkpoint", tensor=k)
    return out


# ---------------------------------------------------------------------------------- towers
class HFVisionTower(nn.Module):
    """A family's image features through transformers' own ``get_image_features``: one image
    ``[3, H, W]`` (pixels as the family's processor leaves them) -> ``[n_tokens, hidden]``.

    ``core`` is the family's ``*Model`` built with an empty language model (0 layers), holding the
    checkpoint's vision tower and projector; Qwen2-VL images are cut into patches by its own image
    processor (no resizing or normalisation: give pixels already prepared)."""

    supports_batch = False

    def __init__(self, core: nn.Module, family: str, processor=None) -> None:
        super().__init__()
        self.core, self.family, self.processor = core, family, processor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dt = next(self.core.parameters()).dtype
        if self.family == "qwen2-vl":
            enc = self.processor(image.float().cpu(), return_tensors="pt")
            out = self.core.get_image_features(enc["pixel_values"].to(image.device, dt),
                                               enc["image_grid_thw"].to(image.device))
            return out.pooler_output[0]
        out = self.core.get_image_features(image.unsqueeze(0).to(dt))
        return out.pooler_output[0]

    @property
    def uses_mrope(self) -> bool:
        """``True`` for Qwen2-VL / Qwen2.5-VL towers: their tokens take 3-D M-RoPE positions."""
        return self.family == "qwen2-vl"

    def mrope_positions(self, image: torch.Tensor, start: int) -> tuple[torch.Tensor, int]:
        """Qwen2-VL's 3-D (t, h, w) positions ``[3, n_tokens]`` of one image's tokens placed at
        ``start``, and the position where the text after it continues - as transformers'
        ``Qwen2VLModel.get_rope_index`` places an image: ``get_vision_position_ids`` on the image's
        grid (t = 1; h, w after the merger's spatial merge), text resuming at ``start + max(h, w)``."""
        grid = self.processor(image.float().cpu(), return_tensors="pt")["image_grid_thw"][0]
        merge = self.core.config.vision_config.spatial_merge_size
        pos = self.core.get_vision_position_ids(start, grid, 1, merge, device=image.device)
        return pos, start + int(max(grid[1], grid[2])) // merge


# ---------------------------------------------------------------------------------- checkpoints
class FamilyCheckpoint:
    """A multimodal checkpoint folder of any family, read lazily: its language model as a plain
    causal LM (:meth:`language_model`, :meth:`lm_tensor`), its tower (:meth:`tower`), placeholder
    and chat template (the :attr:`family`'s)."""

    def __init__(self, path: str | Path, family: str | None = None) -> None:
        from .io import CheckpointReader

        self.path = Path(path)
        self.family = family_of(self.path, family)
        if self.family.name == "generic":
            raise CheckpointError(f"not a multimodal checkpoint of a known family ({', '.join(FAMILIES)})",
                                  file=self.path / "config.json")
        cfg_file = self.path / "config.json"
        try:
            self.config_dict = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable config.json: {e}", file=cfg_file) from e
        self.reader = CheckpointReader(self.path)
        keys = self.reader.keys()
        self._keys = set(keys)
        self.internlm2 = self.family.name == "internvl-original" and is_internlm2(self.config_dict["llm_config"])
        self._parts: dict[str, int] = {}  # causal-LM name -> its part of a fused InternLM2 wqkv
        self._lm_map = self._build_lm_map(keys)

    def _build_lm_map(self, keys: Sequence[str]) -> dict[str, str]:
        non_lm = [re.compile(p) for p in self.family.keep]
        out: dict[str, str] = {}
        for k in keys:
            if any(p.search(k) for p in non_lm):
                continue
            if self.internlm2 and k.startswith("language_model."):
                for name, part in internlm2_llama_names(k[len("language_model."):]):
                    out[name] = k
                    if part is not None:
                        self._parts[name] = part
                continue
            for src, dst in self.family.lm_prefixes:
                if k.startswith(src):
                    out.setdefault(dst + k[len(src):], k)
                    break
        if not out:
            raise CheckpointError(f"no language-model tensors found (family {self.family.name}: prefixes "
                                  f"{[s for s, _ in self.family.lm_prefixes]})", file=self.path)
        return out

    # ---- language model
    def lm_names(self) -> list[str]:
        return sorted(self._lm_map)

    def has_lm_tensor(self, name: str) -> bool:
        return name in self._lm_map

    def lm_tensor(self, name: str) -> torch.Tensor:
        if name not in self._lm_map:
            raise CheckpointError("language-model tensor not in the checkpoint", file=self.path, tensor=name)
        t = self.reader.get(self._lm_map[name])
        if name in self._parts:
            if not hasattr(self, "_llama_config"):
                self._llama_config = self.text_config()
            t = split_wqkv(t, self._llama_config)[self._parts[name]]
        return t

    def text_config(self):
        """The language model's config as a causal-LM config (Qwen2-VL's text part becomes a
        ``Qwen2Config`` with plain RoPE: M-RoPE with equal position streams, the text case, is RoPE)."""
        from transformers import AutoConfig, LlamaConfig, Qwen2Config

        name = self.family.name
        if name == "llava-original":
            cfg = {k: v for k, v in self.config_dict.items() if not k.startswith("mm_") and k not in
                   ("model_type", "architectures", "auto_map")}
            return LlamaConfig(**cfg)
        if name == "internvl-original":
            llm_config = self.config_dict["llm_config"]
            return internlm2_config(llm_config) if self.internlm2 else AutoConfig.for_model(**llm_config)
        cfg = AutoConfig.from_pretrained(str(self.path))
        tc = cfg.text_config
        if name == "qwen2-vl":
            d = tc.to_dict()
            rope = dict(d.pop("rope_parameters", None) or {})
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": rope.get("rope_theta", 1e6)}
            for k in ("model_type", "architectures"):
                d.pop(k, None)
            return Qwen2Config(**d)
        return tc

    def language_model(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
        """The language model as a plain causal LM, built directly in ``dtype`` on ``device``
        (one copy of the weights in memory)."""
        from transformers import AutoModelForCausalLM

        tc = self.text_config()
        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(tc, dtype=dtype)
        tied = bool(getattr(tc, "tie_word_embeddings", False)) or bool(self.config_dict.get("tie_word_embeddings"))
        sd = lm.state_dict()
        new = {}
        for name, t in sd.items():
            if name not in self._lm_map:
                if name == "lm_head.weight" and tied:
                    continue
                raise CheckpointError("language-model tensor missing from the checkpoint", file=self.path, tensor=name)
            v = self.lm_tensor(name)
            if tuple(v.shape) != tuple(t.shape):
                raise CheckpointError(f"shape {list(v.shape)} differs from the text config's {list(t.shape)}",
                                      file=self.path, tensor=name)
            new[name] = v.to(t.dtype)
        lm.load_state_dict(new, strict=False)
        if tied:
            lm.tie_weights()
        return lm.eval()

    # ---- tower
    def _vision_state(self) -> dict[str, torch.Tensor]:
        pats = [re.compile(p) for p in self.family.keep]
        sd = {k: self.reader.get(k) for k in self.reader.keys() if any(p.search(k) for p in pats)}
        if self.family.name == "internvl-original":
            sd = internvl_original_to_hf(sd, self.config_dict["llm_config"])
        return sd

    def tower(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
        """The frozen tower: one image ``[3, H, W]`` -> ``[n_tokens, hidden]``.

        LLaVA (both layouts): :class:`workbench.llava.LlavaTower`. Qwen2-VL and InternVL:
        :class:`HFVisionTower` over transformers' own ``get_image_features``."""
        name = self.family.name
        if name == "llava":
            return self._llava_tower().to(device=device, dtype=dtype)
        if name == "llava-original":
            return self._llava_original_tower().to(device=device, dtype=dtype)
        import transformers

        if name == "internvl-original":
            from transformers import InternVLConfig

            c = self.config_dict
            cfg = InternVLConfig(vision_config=_internvit_vision_config(c["vision_config"]),
                                 text_config=self.text_config().to_dict(),
                                 downsample_ratio=c.get("downsample_ratio", 0.5),
                                 vision_feature_layer=c.get("select_layer", -1))
            cls_name = "InternVLForConditionalGeneration"
        else:
            cfg = transformers.AutoConfig.from_pretrained(str(self.path))
            cls_name = _QWEN_CLASSES.get(cfg.model_type, self.family.hf_class)
        cfg.text_config.num_hidden_layers = 0
        cfg.text_config.vocab_size = 1
        if hasattr(cfg.text_config, "layer_types"):
            cfg.text_config.layer_types = []
        model = getattr(transformers, cls_name)(cfg)
        core = model.model
        core.language_model = None  # the tower never runs the language model
        want = {k: v for k, v in core.state_dict().items()}
        # transformers-5 names carry "model."; older Qwen2-VL checkpoints keep visual.* at the top level
        got = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in self._vision_state().items()}
        missing = sorted(set(want) - set(got))
        if missing:
            raise CheckpointError("vision tensor missing from the checkpoint", file=self.path, tensor=missing[0])
        for k, v in want.items():
            if tuple(got[k].shape) != tuple(v.shape):
                raise CheckpointError(f"shape {list(got[k].shape)} differs from the config's {list(v.shape)}",
                                      file=self.path, tensor=k)
        core.load_state_dict({k: got[k] for k in want}, strict=True)
        proc = None
        if name == "qwen2-vl":
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            vc = cfg.vision_config
            proc = Qwen2VLImageProcessorPil(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                            temporal_patch_size=vc.temporal_patch_size, do_resize=False,
                                            do_rescale=False, do_normalize=False)
        tower = HFVisionTower(core, name, proc)
        return tower.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def _llava_tower(self) -> nn.Module:
        """The vision tower (``AutoModel`` of ``vision_config``) + ``LlavaMultiModalProjector`` of a
        ``LlavaForConditionalGeneration`` folder, with the config's ``vision_feature_layer`` and
        ``vision_feature_select_strategy``: ``get_image_features``' features. Both key layouts
        (``vision_tower.*`` as ``save_pretrained`` writes it, ``model.vision_tower.*`` as transformers 5
        holds it); a vision key may or may not carry CLIP's ``vision_model.`` level."""
        from transformers import AutoConfig, AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        from .llava import LlavaTower

        cfg = AutoConfig.from_pretrained(str(self.path))
        vt = AutoModel.from_config(cfg.vision_config)
        self._load_part(vt, ("vision_tower.", "model.vision_tower."), "vision_model.", "vision tower")
        proj = LlavaMultiModalProjector(cfg)
        self._load_part(proj, ("multi_modal_projector.", "model.multi_modal_projector."), "", "projector")
        tower = LlavaTower(vt, proj, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
        return tower.eval().requires_grad_(False)

    def _load_part(self, module: nn.Module, prefixes: Sequence[str], optional_level: str, what: str) -> None:
        """Load every tensor of ``module`` from the checkpoint key ``prefix + name`` (the first prefix
        that has it; with ``optional_level`` also without / with that level), shapes checked."""
        new = {}
        for name, t in module.state_dict().items():
            cands = []
            for p in prefixes:
                cands.append(p + name)
                if optional_level:  # the level may be in the module's names, the checkpoint's, or neither
                    bare = name[len(optional_level):] if name.startswith(optional_level) else optional_level + name
                    cands.append(p + bare)
            key = next((c for c in cands if c in self._keys), None)
            if key is None:
                raise CheckpointError(f"{what} tensor missing from the checkpoint (tried prefixes {list(prefixes)})",
                                      file=self.path, tensor=name)
            v = self.reader.get(key)
            if tuple(v.shape) != tuple(t.shape):
                raise CheckpointError(f"{what} tensor shape {list(v.shape)} differs from the config's {list(t.shape)}",
                                      file=self.path, tensor=key)
            new[name] = v.to(t.dtype)
        module.load_state_dict(new, strict=True)

    def _llava_original_tower(self) -> nn.Module:
        """CLIP (from ``model.vision_tower.vision_tower.*``; its config from ``mm_vision_tower``, a
        folder or hub id) + the ``mlp2x_gelu`` projector ``model.mm_projector.{0,2}``."""
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaConfig
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        from .llava import LlavaTower

        c = self.config_dict
        if c.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise CheckpointError(f"projector type {c.get('mm_projector_type')!r} not supported (mlp2x_gelu only)",
                                  file=self.path / "config.json")
        vcfg = CLIPVisionConfig.from_pretrained(c["mm_vision_tower"])
        vt = CLIPVisionModel(vcfg)
        prefix = "model.vision_tower.vision_tower."
        vt_state = {re.sub(r"^vision_model\.", "", k[len(prefix):]): self.reader.get(k)  # CLIP's level, if any
                    for k in self.reader.keys() if k.startswith(prefix)}
        if not vt_state:  # the released LLaVA-1.5 checkpoints hold no CLIP weights: read them from mm_vision_tower
            vt = CLIPVisionModel.from_pretrained(c["mm_vision_tower"])
        else:
            vt.load_state_dict(vt_state, strict=True)
        proj = LlavaMultiModalProjector(LlavaConfig(vision_config=vcfg.to_dict(),
                                                    text_config={"hidden_size": c["hidden_size"]},
                                                    projector_hidden_act="gelu"))
        p = "model.mm_projector."
        proj.load_state_dict({"linear_1.weight": self.reader.get(p + "0.weight"), "linear_1.bias": self.reader.get(p + "0.bias"),
                              "linear_2.weight": self.reader.get(p + "2.weight"), "linear_2.bias": self.reader.get(p + "2.bias")})
        select = "default" if c.get("mm_vision_select_feature", "patch") == "patch" else "full"
        return LlavaTower(vt, proj, c.get("mm_vision_select_layer", -2), select).eval().requires_grad_(False)

    def placeholder(self, tokenizer=None) -> str:
        """The image placeholder token: the one the config's ``image_token_index`` / ``image_token_id``
        names in ``tokenizer`` (each expert of :func:`workbench.llava.make_tiny_llava_family` has its
        own), else the family's (:attr:`Family.placeholder`)."""
        idx = self.config_dict.get("image_token_index", self.config_dict.get("image_token_id"))
        if tokenizer is not None and idx is not None:
            tok = tokenizer.convert_ids_to_tokens(int(idx))
            if tok:
                return tok
        return self.family.placeholder

    def tokenizer(self):
        """The folder's tokenizer (``AutoTokenizer``; an original layout's ``config.json`` names a
        model type transformers does not know, so it is not read)."""
        from transformers import AutoTokenizer, PretrainedConfig

        if self.family.name.endswith("-original"):
            return AutoTokenizer.from_pretrained(str(self.path), config=PretrainedConfig())
        return AutoTokenizer.from_pretrained(str(self.path))


def _internvit_vision_config(v: Mapping) -> dict:
    """An original InternViT ``vision_config`` as transformers' ``InternVLVisionConfig`` fields."""
    size = v["image_size"]
    patch = v["patch_size"]
    return {"hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
            "image_size": [size, size], "patch_size": [patch, patch], "attention_bias": v.get("qkv_bias", True),
            "use_qk_norm": v.get("qk_normalization", False), "layer_norm_eps": v.get("layer_norm_eps", 1e-6),
            "norm_type": v.get("norm_type", "layer_norm"), "layer_scale_init_value": v.get("initializer_factor", 0.1),
            "hidden_act": v.get("hidden_act", "gelu")}


__all__ = ["FAMILIES", "Family", "FamilyCheckpoint", "HFVisionTower", "LLM_KEEP", "detect_family", "family_of",
           "get_family", "internlm2_config", "internlm2_llama_names", "internvl_original_to_hf", "is_internlm2",
           "split_wqkv"]
