"""Shared test fixtures: tiny random Hugging Face models on disk and perturbed "experts".

Everything is built in code (no network), once per test session, in pytest's temporary folder.
Treat the fixture folders as **read-only inputs** (tests check that merges never write them);
copy one with :func:`shutil.copytree` before changing it.

Fixtures (session scope):

- ``tiny_llama``: folder of a random ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads / 2 KV
  heads, vocab 64, float32, untied ``lm_head``) saved with ``save_pretrained``, plus a small
  ``PreTrainedTokenizerFast`` (word-level, the same 64-token vocabulary) and generation config.
- ``tiny_llama_experts``: three folders, each the base plus seeded Gaussian noise
  (std 0.02) on *every* floating tensor (so tensors kept from the base are tell-tale).
- ``tiny_llava`` / ``tiny_llava_experts``: the same for a ``LlavaForConditionalGeneration``
  (CLIP vision tower hidden 16, 2 layers, 16x16 images, patch 8; the Llama above as text model;
  image token id 63).
- ``tiny_lora_adapters``: two peft LoRA adapter folders (r=4, alpha=8, q/v/down projections) on
  ``tiny_llama``, with random non-zero B so their deltas are not zero.
- ``toy_base_and_experts``: a five-tensor base (``TOY_SHAPES``) and experts a, b, c (base + noise),
  for the analysis pictures (no config, one ``model.safetensors`` each).

Helpers (plain functions, importable as ``from conftest import ...``): :func:`state_dict_of`,
:func:`tree_digest`, :func:`perturb_checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 64
N_EXPERTS = 3
IMAGE_TOKEN = 63


def tiny_llama_config():
    """The tiny ``LlamaConfig`` of the fixtures."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llava_config():
    """The tiny ``LlavaConfig`` of the fixtures (CLIP vision tower + tiny Llama)."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    return LlavaConfig(vision_config=vc, text_config=tiny_llama_config(), image_token_index=IMAGE_TOKEN,
                       projector_hidden_act="gelu", vision_feature_layer=-1,
                       vision_feature_select_strategy="full")


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, VOCAB - 1):
        vocab[f"w{i}"] = i
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)


def perturb_checkpoint(base: Path, out: Path, seed: int, std: float = 0.02) -> Path:
    """Copy checkpoint folder ``base`` to ``out`` with seeded N(0, std²) noise on every floating tensor."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(base / "model.safetensors"))
    noisy = {k: (v + std * torch.randn(v.shape, generator=g, dtype=v.dtype)) if v.is_floating_point() else v
             for k, v in sorted(sd.items())}
    save_file(noisy, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.suffix == ".json" and "tokenizer" not in f.name and "special" not in f.name:
            shutil.copy2(f, out / f.name)
    return out


def state_dict_of(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder or file (via the workbench reader), on CPU."""
    from workbench.io import CheckpointReader

    r = CheckpointReader(folder)
    return {k: r.get(k).clone() for k in r.keys()}


def tree_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest)."""
    folder = Path(folder)
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a tiny random LlamaForCausalLM + tokenizer (see module docstring)."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama") / "base"
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_experts(tiny_llama, tmp_path_factory) -> list[Path]:
    """Three perturbed copies of ``tiny_llama`` (seeds 1, 2, 3)."""
    root = tmp_path_factory.mktemp("tiny_llama_experts")
    return [perturb_checkpoint(tiny_llama, root / f"expert{i}", seed=i) for i in range(1, N_EXPERTS + 1)]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """Folder of a tiny random LlavaForConditionalGeneration + tokenizer."""
    from transformers import LlavaForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_llava") / "base"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config())
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llava_experts(tiny_llava, tmp_path_factory) -> list[Path]:
    """Three perturbed copies of ``tiny_llava`` (seeds 11, 12, 13)."""
    root = tmp_path_factory.mktemp("tiny_llava_experts")
    return [perturb_checkpoint(tiny_llava, root / f"expert{i}", seed=10 + i) for i in range(1, N_EXPERTS + 1)]


@pytest.fixture(scope="session")
def tiny_lora_adapters(tiny_llama, tmp_path_factory) -> list[Path]:
    """Two peft LoRA adapters (r=4, alpha=8 on q_proj, v_proj, down_proj) of ``tiny_llama``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_lora")
    out = []
    for i in range(2):
        torch.manual_seed(100 + i)
        model = LlamaForCausalLM.from_pretrained(tiny_llama)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        peft_model.save_pretrained(root / f"adapter{i}")
        out.append(root / f"adapter{i}")
    return out


def run_forward_llama(folder: Path) -> torch.Tensor:
    """Load a causal LM folder with ``AutoModelForCausalLM`` and return the logits of one batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.arange(4, 12).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


def run_forward_llava(folder: Path) -> torch.Tensor:
    """Load a LLaVA folder with ``LlavaForConditionalGeneration`` and return logits on one image."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    if cfg.vision_feature_select_strategy == "full":
        n_img += 1  # "full" keeps the CLS token; "default" drops it
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * n_img + [5, 6, 7]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def model_config_of(folder: Path) -> dict:
    """``config.json`` of a folder."""
    return json.loads((Path(folder) / "config.json").read_text())


# ------------------------------------------------------------------------------------------------
# A minimal stand-in method registry, so engine tests do not depend on workbench.merging's numerics.
class StandInSpec:
    """Duck-typed ``MethodSpec`` (name, fn, defaults, doc, batched_fn, needs_generator, check_params)."""

    def __init__(self, name, fn, defaults=None, batched_fn=None, needs_generator=False):
        self.name, self.fn, self.defaults = name, fn, dict(defaults or {})
        self.doc, self.batched_fn, self.needs_generator = fn.__doc__ or "", batched_fn, needs_generator

    def check_params(self, params):
        from workbench.errors import ConfigError

        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {sorted(unknown)} for method {self.name!r}")


class StandInOutput:
    """Duck-typed ``MergeOutput``."""

    def __init__(self, merged, extras):
        self.merged, self.extras = merged, extras


def _sa_average(base, experts, *, name="", generator=None):
    """Mean of the experts."""
    return torch.stack(list(experts)).mean(0)


def _sa_dare(base, experts, *, name="", generator=None, p=0.5, lam=1.0):
    """Task arithmetic on DARE-dropped task vectors (random: uses the generator)."""
    out = torch.zeros_like(base)
    for e in experts:
        keep = torch.rand(base.shape, generator=generator, device=base.device) >= p
        out += (e - base) * keep / (1 - p)
    return base + lam * out


def _sa_ties(base, experts, *, name="", generator=None, density=0.2, trim="tensor"):
    """Per-tensor TIES (trim top-k by magnitude, elect sign, disjoint mean)."""
    taus = torch.stack([e - base for e in experts])
    if density < 1.0:
        k = max(1, int(round(density * base.numel())))
        flat = taus.abs().reshape(len(experts), -1)
        thr = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values
        taus = taus * (taus.abs() >= thr.view(-1, *[1] * base.dim()))
    sign = torch.sign(taus.sum(0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    return base + (taus * agree).sum(0) / agree.sum(0).clamp(min=1)


def _sa_masked(base, experts, *, name="", generator=None, lam=1.0):
    """Sum of task vectors plus one mask per expert (|tau_i| > lam * |tau_i - tau*|)."""
    taus = [e - base for e in experts]
    star = sum(taus)
    return StandInOutput(base + star, {f"mask_{i}": t.abs() > lam * (t - star).abs() for i, t in enumerate(taus)})


def standin_methods() -> dict:
    """A registry of four simple methods (average, dare, ties, masked) for engine tests."""
    return {
        "average": StandInSpec("average", _sa_average),
        "dare": StandInSpec("dare", _sa_dare, {"p": 0.5, "lam": 1.0}, needs_generator=True),
        "ties": StandInSpec("ties", _sa_ties, {"density": 0.2, "trim": "tensor"}),
        "masked": StandInSpec("masked", _sa_masked, {"lam": 1.0}),
    }


# ------------------------------------------------------------------------------------------------
# Five-tensor base + three experts for the analysis pictures (tests/test_plots.py, test_explorers.py).
#: tensor name -> shape of :func:`toy_base_and_experts` (embedding, q and up projections of 2 layers).
TOY_SHAPES = {"model.embed_tokens.weight": (12, 6), "model.layers.0.self_attn.q_proj.weight": (6, 6),
              "model.layers.0.mlp.up_proj.weight": (8, 6), "model.layers.1.self_attn.q_proj.weight": (6, 6),
              "model.layers.1.mlp.up_proj.weight": (8, 6)}


@pytest.fixture(scope="session")
def toy_base_and_experts(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """``(base folder, {"a"|"b"|"c": expert folder})``: a N(0, 1) base of :data:`TOY_SHAPES` and experts
    ``base + 0.1 * N(0, 1)``, one generator seeded 0 drawing in that order, one ``model.safetensors`` each."""
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("toy_experts")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in TOY_SHAPES.items()}
    (tmp / "base").mkdir()
    save_file(base, str(tmp / "base" / "model.safetensors"))
    paths = {}
    for e in ("a", "b", "c"):
        (tmp / e).mkdir()
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp / e / "model.safetensors"))
        paths[e] = tmp / e
    return tmp / "base", paths
