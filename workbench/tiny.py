"""Tiny random checkpoints of every model family (:mod:`workbench.families`), for tests and demos.

Each is built with transformers' own config and model classes (hidden size 32, one or two LLM
layers, a 16x16-pixel vision tower), saved with ``save_pretrained``; the original LLaVA and
InternVL layouts are the transformers-layout model with its tensors renamed to the original
repositories' names (:func:`to_original_layout`); ``internvl-original-internlm2`` (InternVL2.5-8B's
layout) is an InternVL with a Llama language model whose tensors are renamed to InternLM2's, q, k
and v packed into ``wqkv`` (:func:`pack_wqkv`). Seconds on a CPU; the outputs are meaningless,
the layouts and code paths are the real ones.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch

#: the buildable layouts (a family name, plus ``qwen2.5-vl`` for the Qwen2.5-VL classes).
TINY_KINDS = ("llava", "llava-original", "qwen2-vl", "qwen2.5-vl", "internvl", "internvl-original",
              "internvl-original-internlm2")
#: tokens of the word-level tokenizer (placeholders, chat-template words, then filler words).
_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image_pad|>", "<IMG_CONTEXT>", "<|vision_start|>",
            "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>")
_WORDS = ("USER:", "ASSISTANT:", "user", "assistant")
VOCAB_SIZE = 96
IMAGE_SIZE = 16


def tiny_vocab() -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(_SPECIAL + _WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB_SIZE)})
    return vocab


def save_tiny_tokenizer(folder: str | Path) -> None:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`tiny_vocab` (placeholders are special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", additional_special_tokens=list(_SPECIAL[4:])).save_pretrained(folder)


def _text(**extra) -> dict:
    v = tiny_vocab()
    return dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                bos_token_id=v["<s>"], eos_token_id=v["</s>"], pad_token_id=v["<pad>"], **extra)


def tiny_model(kind: str):
    """A random transformers model of ``kind`` (the transformers-layout class for the original layouts)."""
    import transformers as tf

    v = tiny_vocab()
    if kind in ("llava", "llava-original"):
        cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                               num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8,
                                                               projection_dim=16),
                             text_config=tf.LlamaConfig(**_text()), image_token_index=v["<image>"],
                             projector_hidden_act="gelu", vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        return tf.LlavaForConditionalGeneration(cfg)
    if kind == "qwen2-vl":
        cfg = tf.Qwen2VLConfig(text_config=_text(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                                  "rope_theta": 10000.0}),
                               vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                                                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
                               image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
                               vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])
        return tf.Qwen2VLForConditionalGeneration(cfg)
    if kind == "qwen2.5-vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=_text(rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                                     "rope_theta": 10000.0}),
                                  vision_config=dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32,
                                                     num_heads=2, patch_size=4, spatial_merge_size=2,
                                                     temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1]),
                                  image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
                                  vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"])
        return tf.Qwen2_5_VLForConditionalGeneration(cfg)
    if kind in ("internvl", "internvl-original", "internvl-original-internlm2"):
        text = tf.LlamaConfig(**_text()) if kind.endswith("internlm2") else tf.Qwen2Config(**_text())
        cfg = tf.InternVLConfig(text_config=text,
                                vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=[IMAGE_SIZE] * 2, patch_size=[4, 4],
                                                   attention_bias=True),
                                image_token_id=v["<IMG_CONTEXT>"], tie_word_embeddings=False)
        return tf.InternVLForConditionalGeneration(cfg)
    raise ValueError(f"unknown tiny kind {kind!r}; known: {TINY_KINDS}")


# ---------------------------------------------------------------------------------- original layouts
_LLAVA_TO_ORIGINAL = ((r"^model\.language_model\.", "model."),
                      (r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
                      (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
                      (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
                      (r"^lm_head\.", "lm_head."))


_V = r"^model\.vision_tower\."
_INTERNVL_TO_ORIGINAL = ((_V + r"embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
                         (_V + r"embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
                         (_V + r"embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
                         (_V + r"encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
                         (_V + r"encoder\.layer\.(\d+)\.attention\.(q|k)_norm\.", r"vision_model.encoder.layers.\1.attn.\2_norm."),
                         (_V + r"encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
                         (_V + r"encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
                         (_V + r"encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
                         (_V + r"encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
                         (_V + r"encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
                         (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
                         (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
                         (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
                         (r"^model\.language_model\.", "language_model.model."),
                         (r"^lm_head\.", "language_model.lm_head."))


_LLAMA_TO_INTERNLM2 = ((r"^model\.language_model\.embed_tokens\.", "language_model.model.tok_embeddings."),
                       (r"\.self_attn\.o_proj\.", ".attention.wo."),
                       (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
                       (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
                       (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
                       (r"\.input_layernorm\.", ".attention_norm."),
                       (r"\.post_attention_layernorm\.", ".ffn_norm."),
                       (r"^lm_head\.", "language_model.output."))


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """q, k, v weights -> InternLM2's fused ``wqkv``: per key-value head, its query heads, its key
    head, its value head (the inverse of :func:`workbench.families.split_wqkv`)."""
    hidden = q.shape[-1]
    d = k.shape[0] // n_kv_heads
    parts = [q.reshape(n_kv_heads, -1, d, hidden), k.reshape(n_kv_heads, 1, d, hidden),
             v.reshape(n_kv_heads, 1, d, hidden)]
    return torch.cat(parts, 1).reshape(-1, hidden)


def _llama_to_internlm2(state: Mapping[str, torch.Tensor], n_kv_heads: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in state.items():
        m = re.match(r"^model\.language_model\.(layers\.\d+)\.self_attn\.(q|k|v)_proj\.weight$", k)
        if m:
            qkv.setdefault(m[1], {})[m[2]] = t
            continue
        for pat, rep in _LLAMA_TO_INTERNLM2:
            if re.search(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[re.sub(r"^model\.language_model\.", "language_model.model.", k)] = t
    for layer, p in qkv.items():
        out[f"language_model.model.{layer}.attention.wqkv.weight"] = pack_wqkv(p["q"], p["k"], p["v"], n_kv_heads)
    return out


def to_original_layout(kind: str, state: Mapping[str, torch.Tensor], n_kv_heads: int | None = None
                       ) -> dict[str, torch.Tensor]:
    """A transformers-layout state dict (in-memory names) renamed to the original repository's
    layout: ``llava-original`` (LLaVA repo) or ``internvl-original`` (InternVL remote code; q, k, v
    fused into ``attn.qkv``); ``internvl-original-internlm2`` also renames the Llama language model
    to InternLM2's names (``n_kv_heads`` for packing ``wqkv``). The inverse of
    :func:`workbench.families.internvl_original_to_hf`."""
    out: dict[str, torch.Tensor] = {}
    if kind == "llava-original":
        for k, t in state.items():
            for pat, rep in _LLAVA_TO_ORIGINAL:
                if re.search(pat, k):
                    out[re.sub(pat, rep, k)] = t
                    break
            else:
                raise KeyError(k)
        return out
    if kind not in ("internvl-original", "internvl-original-internlm2"):
        raise ValueError(f"{kind!r} has no original layout here")
    if kind.endswith("internlm2"):
        lm = {k: t for k, t in state.items() if k.startswith(("model.language_model.", "lm_head."))}
        out.update(_llama_to_internlm2(lm, n_kv_heads))
        state = {k: t for k, t in state.items() if k not in lm}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, t in state.items():
        m = re.match(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
            continue
        for pat, rep in _INTERNVL_TO_ORIGINAL:
            if re.search(pat, k):
                out[re.sub(pat, rep, k)] = t
                break
        else:
            raise KeyError(k)
    for (layer, what), parts in qkv.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{what}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def _original_config(kind: str, model, folder: Path) -> dict:
    if kind == "llava-original":
        clip = folder / "clip_vision"
        model.config.vision_config.save_pretrained(clip)
        d = model.config.text_config.to_dict()
        for k in ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype"):
            d.pop(k, None)
        return {**d, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
                "mm_vision_tower": str(clip), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 16,
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    vc = model.config.vision_config
    llm = {**model.config.text_config.to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    if kind.endswith("internlm2"):
        llm = {**llm, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
               "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            "vision_config": {"model_type": "intern_vit_6b", "hidden_size": vc.hidden_size,
                              "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_hidden_layers,
                              "num_attention_heads": vc.num_attention_heads, "image_size": vc.image_size[0],
                              "patch_size": vc.patch_size[0], "qkv_bias": True, "qk_normalization": False,
                              "norm_type": "layer_norm", "layer_norm_eps": vc.layer_norm_eps,
                              "initializer_factor": vc.layer_scale_init_value, "hidden_act": vc.hidden_act},
            "llm_config": llm,
            "downsample_ratio": 0.5, "select_layer": -1, "template": "internvl2_5", "ps_version": "v2"}


def make_tiny_checkpoint(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a random tiny checkpoint of ``kind`` (:data:`TINY_KINDS`) with its tokenizer to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    torch.manual_seed(seed)
    model = tiny_model(kind)
    if kind.startswith(("llava-original", "internvl-original")):
        folder.mkdir(parents=True, exist_ok=True)
        state = to_original_layout(kind, {k: v.clone().contiguous() for k, v in model.state_dict().items()},
                                   n_kv_heads=model.config.text_config.num_key_value_heads)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(_original_config(kind, model, folder), indent=2))
    else:
        model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def make_tiny_experts(base: str | Path, out_dir: str | Path, n: int = 2, seed: int = 1, std: float = 0.002) -> list[Path]:
    """``n`` experts of ``base``: copies with seeded N(0, std²) noise on every floating tensor. The default
    is a tenth of the tiny models' initialisation scale (0.02), so ``||tau|| / ||theta_0||`` is ~0.1, as a
    fine-tune's (the merge and profile checks call an expert at >= 0.5 foreign)."""
    from safetensors.torch import load_file, save_file

    base, out_dir = Path(base), Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(base / "model.safetensors"))
    out = []
    for i in range(1, n + 1):
        d = out_dir / f"expert{i}"
        shutil.copytree(base, d, dirs_exist_ok=True)
        noisy = {k: v + std * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
                 for k, v in sorted(sd.items())}
        save_file(noisy, str(d / "model.safetensors"), metadata={"format": "pt"})
        out.append(d)
    return out


__all__ = ["IMAGE_SIZE", "TINY_KINDS", "make_tiny_checkpoint", "make_tiny_experts", "pack_wqkv", "save_tiny_tokenizer",
           "tiny_model", "tiny_vocab", "to_original_layout"]
