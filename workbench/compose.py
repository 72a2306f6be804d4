"""Composed multimodal LLMs over one shared base LLM: single experts, frozen-LLM, NaiveMC, DAMC, MMER.

Every composition returns a :class:`workbench.mllm.MultimodalLM`: one causal LM plus, per modality,
the expert's frozen tower (encoder + projector) reused unchanged. Route ``k`` of the routed layers
is the ``k``-th expert given (= ``MultimodalLM.route_order``), route 0 is text.

Experts are described by :class:`ExpertSource` (what the LLM of the expert is, and its tower):

- :func:`zoo_expert` - an expert of the miniature zoo (kinds ``projector``, ``full``, ``lora``, ``damc``);
- :func:`family_expert` - a checkpoint of any family of :mod:`workbench.families` (LLaVA in both
  layouts, Qwen2-VL / Qwen2.5-VL, InternVL in both layouts), with the family's placeholder and chat
  template; ``key=`` names its tower when two experts share a modality; optionally with DAMC
  adapters, or its LLM frozen (a projector-only expert);
- :func:`hf_expert` - any causal LM folder / peft adapter plus a tower you built.

Compositions (methods.md sections 1-3):

- :func:`compose_frozen`: θ0 and the experts' towers (projector-only MLLMs).
- :func:`compose_naive_mc`: NaiveMC. θ = θ0 + Σ λi τi with λi = 1/N (the weight average); LoRA experts
  contribute their product delta ``s · Bi Ai`` (never A and B averaged separately); projector-only
  experts contribute τ = 0. Streamed tensor by tensor by the engine's one merge loop
  (:func:`merge_llm` -> :func:`workbench.engine.merge_into`, the registry's ``weight_average``):
  memory holds the base model and a few tensors of each expert. Any method of
  :mod:`workbench.merging` can replace the average.
- :func:`compose_damc`: text tokens use W0 + Σ λi si Bi^t Ai^t, tokens of modality m use
  W0 + μ_m sm Bm^mod Am^mod (μ = 1); λ is searched by :mod:`workbench.studies.search` (a grid on a
  multi-modality validation split, or the own-task fallback), which re-weights the composed model
  with :func:`set_damc_coefficients`.
- :func:`compose_mmer`: τ* from a merge of the τi (default TIES, keep 20% - **unverified**), one
  mask per expert ``m_i = 1[|τi| > λ |τi − τ*|]`` (**unverified** reading, λ a parameter); modality
  i's tokens use θ0 + α m_i ⊙ τ*, text tokens θ0 + τ* (``text_route="merged"``, **unverified**;
  ``"base"`` uses θ0). Tensors that are not routed linear weights (embeddings, norms, ``lm_head``)
  take the text route's value. The parts can also come from the engine's output folder
  (:func:`mmer_parts_from_merge`: merged θ0+τ* and ``mmer/masks.safetensors``).

Storage (:func:`disk_bytes`, :func:`storage_comparison`; MMER's parts are saved by
:func:`workbench.io.mmer_store.write_parts`) is here too; the studies that use these compositions are in
:mod:`workbench.studies.composition`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .io.mmer_store import MMERParts
from .io.packing import pack_mask
from .mllm import MultimodalLM
from .routing import (DEFAULT_LORA_TARGETS, Dense, LowRank, Masked, apply_routes, fuse_routes_for_inference,
                      load_route_adapter, route_components, set_route_coefficients)

TEXT_ROUTE = 0
KINDS = ("projector", "full", "lora", "damc", "damc-full")


# ================================================================================================ sources
@dataclass
class ExpertSource:
    """One expert MLLM as a composition input.

    Attributes:
        name: a label.
        modality: its modality (one tower, one route).
        kind: ``"projector"`` (LLM frozen = θ0), ``"full"`` (``llm`` is a full causal-LM or LLaVA
            folder), ``"lora"`` (``adapter`` is a peft LoRA folder on θ0), ``"damc"`` (``adapter_text``
            and ``adapter_modality`` peft folders) or ``"damc-full"`` (``llm_text`` / ``llm_modality``
            full folders: DAMC's full-weight option).
        tower: the frozen encoder + projector (one raw input -> ``[n_tokens, hidden]``).
        placeholder: the prompt token replaced by the tower's tokens (experts sharing one get
            distinct tokens from the composition: :func:`assign_placeholders`).
        key: the tower's name in the composed model (``modal_inputs`` key, route); default
            ``modality``. Two experts of one modality (e.g. two image experts) need distinct keys.
        template: the chat template of the expert's family (``"...{prompt}..."``), or ``None``.
        family: the :mod:`workbench.families` layout of the ``llm`` folder when it is a multimodal
            checkpoint (``None``: detected from its ``config.json``).
    """

    name: str
    modality: str
    kind: str
    tower: nn.Module
    placeholder: str
    llm: Path | None = None
    adapter: Path | None = None
    adapter_text: Path | None = None
    adapter_modality: Path | None = None
    llm_text: Path | None = None
    llm_modality: Path | None = None
    info: dict = field(default_factory=dict)
    key: str | None = None
    template: str | None = None
    family: str | None = None

    @property
    def tower_key(self) -> str:
        """The name of this expert's tower and route in a composed model (``key`` or ``modality``)."""
        return self.key or self.modality

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"expert {self.name!r}: unknown kind {self.kind!r}; expected one of {KINDS}")
        need = {"full": ["llm"], "lora": ["adapter"], "damc": ["adapter_text", "adapter_modality"],
                "damc-full": ["llm_text", "llm_modality"]}.get(self.kind, [])
        for attr in need:
            p = getattr(self, attr)
            if p is None or not Path(p).exists():
                raise ConfigError(f"expert {self.name!r} of kind {self.kind!r} needs an existing {attr} (got {p})")
        self.tower.eval().requires_grad_(False)


def _tensor_key(x: torch.Tensor) -> tuple:
    """Exact identity of a tensor's value: dtype, shape, device and a digest of its bytes."""
    import hashlib

    t = x.detach()
    raw = t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return (str(t.dtype), tuple(t.shape), str(t.device), hashlib.blake2b(raw.data, digest_size=16).digest())


def _module_key(module: nn.Module) -> tuple:
    """Exact identity of a module's weights: its class and each state-dict entry's name and
    :func:`_tensor_key`."""
    return (type(module).__qualname__, tuple((name, _tensor_key(t)) for name, t in sorted(module.state_dict().items())))


class EncoderOutputs:
    """Outputs of frozen encoders, kept by the exact identity of the encoder's weights and of the
    input (:func:`_module_key`, :func:`_tensor_key`), least recently used dropped beyond
    ``max_bytes``.

    In the zoo every tower of a modality - the projector-only, full, LoRA, DAMC and oracle models
    of every seed - is the same frozen encoder under its own projector, so one encoding of a batch
    serves every :class:`CachedTower` built on that encoder in the process (each still applies its
    own projector). A pure memo: the same weights and input give the same tensor as calling the
    encoder."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._memo: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        out = self._memo.get(key)
        if out is not None:
            self.hits += 1
            self._memo.move_to_end(key)
            return out
        self.misses += 1
        out = compute().detach()
        if out.nbytes <= self.max_bytes:
            self._memo[key] = out
            self.bytes += out.nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._memo.popitem(last=False)[1].nbytes
        return out

    def clear(self) -> None:
        self._memo.clear()
        self.bytes = 0


#: The process's shared :class:`EncoderOutputs` (used by every :class:`CachedTower` over a
#: :class:`workbench.world.encoders.Tower`).
ENCODER_OUTPUTS = EncoderOutputs()


class CachedTower(nn.Module):
    """A frozen tower whose outputs are memoised by the exact value of their input.

    Composed models re-encode the same records for every composition and grid point; the towers
    are frozen, so the output for an identical input tensor (the same bytes, shape, dtype and
    device - a stacked batch is one key) is returned from memory instead of recomputed: bit-identical
    to calling the tower. A :class:`workbench.world.encoders.Tower` (frozen encoder + projector)
    takes its encoder's output from :data:`ENCODER_OUTPUTS`, shared with every other tower on the
    same encoder weights, and applies its own projector - the same operations as calling it. While
    gradients are enabled and the tower has trainable parameters it is called directly.
    ``supports_batch`` is the wrapped tower's. Outputs are held until :meth:`clear` (memory: one
    ``[n_tokens, hidden]`` tensor per distinct input)."""

    def __init__(self, tower: nn.Module) -> None:
        from .world.encoders import Tower

        super().__init__()
        self.tower = tower
        self.supports_batch = bool(getattr(tower, "supports_batch", False))
        self._encoder_key = _module_key(tower.encoder) if type(tower) is Tower else None
        self._memo: dict[tuple, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.tower.parameters()):
            return self.tower(x)
        k = _tensor_key(x)
        out = self._memo.get(k)
        if out is None:
            self.misses += 1
            with torch.no_grad():
                if self._encoder_key is None:
                    out = self.tower(x)
                else:
                    feats = ENCODER_OUTPUTS.get((self._encoder_key, k), lambda: self.tower.encoder(x))
                    out = self.tower.projector(feats)
                out = self._memo[k] = out.detach()
        else:
            self.hits += 1
        return out

    def clear(self) -> None:
        self._memo.clear()


class _Encoding(dict):
    """A memoised tokenizer result: a dict whose keys also read as attributes (``enc.input_ids``),
    like a ``BatchEncoding`` (which is slow to construct)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CachedTokenizer:
    """A tokenizer whose plain calls ``tok(text)`` / ``tok(text, add_special_tokens=...)`` on one
    string are memoised (the same ids; each call gets its own copy of the lists). Every other call
    and attribute goes to the wrapped tokenizer. Composed models tokenise the same prompts and
    options for every composition and grid point."""

    _MEMO_KWARGS = frozenset({"add_special_tokens"})

    def __init__(self, tokenizer) -> None:
        self.__dict__["_tok"] = tokenizer
        self.__dict__["_memo"] = {}

    def __call__(self, text=None, *args, **kwargs):
        if args or not isinstance(text, str) or not set(kwargs) <= self._MEMO_KWARGS:
            return self._tok(text, *args, **kwargs)
        key = (text, tuple(sorted(kwargs.items())))
        enc = self._memo.get(key)
        if enc is None:
            enc = self._memo[key] = {k: v for k, v in self._tok(text, **kwargs).items()}
        return _Encoding({k: (list(v) if isinstance(v, list) else v) for k, v in enc.items()})

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __len__(self) -> int:
        return len(self._tok)


def cached_source(src: "ExpertSource") -> "ExpertSource":
    """``src`` with its tower wrapped in a :class:`CachedTower` (itself if it already is)."""
    if isinstance(src.tower, CachedTower):
        return src
    return dataclasses_replace(src, tower=CachedTower(src.tower))


def hf_expert(name: str, modality: str, tower: nn.Module, *, llm: str | Path | None = None,
              adapter: str | Path | None = None, placeholder: str | None = None) -> ExpertSource:
    """An expert from a causal-LM folder (full fine-tuning), a peft adapter, or neither (frozen LLM)."""
    kind = "full" if llm is not None else "lora" if adapter is not None else "projector"
    return ExpertSource(name, modality, kind, tower, placeholder or f"<{modality}>",
                        llm=Path(llm) if llm else None, adapter=Path(adapter) if adapter else None)


def family_expert(folder: str | Path, *, modality: str = "image", key: str | None = None, name: str | None = None,
                  placeholder: str | None = None, family: str | None = None, template: str | None = None,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  adapter_text: str | Path | None = None, adapter_modality: str | Path | None = None,
                  llm_frozen: bool = False) -> ExpertSource:
    """An expert checkpoint of any family of :mod:`workbench.families` (LLaVA in both layouts,
    Qwen2-VL / Qwen2.5-VL, InternVL in both layouts; detected from its ``config.json`` unless
    ``family`` names one - a multimodal config of no known family is an error that says so, as in the
    merge engine): its tower (one image ``[3, H, W]`` -> ``[n_tokens, hidden]``, built in ``dtype`` on
    ``device``), its language model (read tensor by tensor), the family's placeholder and chat template
    (``template`` overrides it; ``"{prompt}"`` applies none).

    With ``adapter_text`` and ``adapter_modality`` (peft folders on θ0) it is a DAMC expert; with
    ``llm_frozen`` a projector-only one (its LLM is θ0: only the tower is the folder's)."""
    from .families import FamilyCheckpoint

    if (adapter_text is None) != (adapter_modality is None):
        raise ConfigError(f"{folder}: a DAMC expert needs both adapter_text and adapter_modality")
    if llm_frozen and adapter_text is not None:
        raise ConfigError(f"{folder}: llm_frozen and DAMC adapters exclude each other")
    ck = FamilyCheckpoint(folder, family)
    fam = ck.family
    common = dict(key=key, template=template if template is not None else fam.template, family=fam.name,
                  info={"family": fam.name, "folder": str(folder)})
    args = (name or Path(folder).name, modality)
    tower, ph = ck.tower(dtype, device), placeholder or fam.placeholder
    if adapter_text is not None:
        return ExpertSource(*args, "damc", tower, ph, llm=Path(folder), adapter_text=Path(adapter_text),
                            adapter_modality=Path(adapter_modality), **common)
    if llm_frozen:
        return ExpertSource(*args, "projector", tower, ph, **common)
    return ExpertSource(*args, "full", tower, ph, llm=Path(folder), **common)


def zoo_expert(zoo, name: str) -> ExpertSource:
    """An expert of the miniature zoo (:class:`workbench.world.Zoo` or its path) by name."""
    from .io.experts import expert_folder_layout
    from .world import PLACEHOLDERS, Zoo

    z = Zoo.coerce(zoo)
    info = z.info(name)
    kind = info.get("kind")
    path = z.expert_path(name)
    if info.get("family") == "capability":
        modality = "image"
    else:
        modality = info["modality"]
    ph = PLACEHOLDERS.get(modality, f"<{modality}>")
    llm_kind, llm = expert_folder_layout(path) or (None, {})
    if kind == "damc":
        from .world.damc import load_damc_tower

        tower = load_damc_tower(z, name)
        if llm_kind == "damc":
            return ExpertSource(name, modality, "damc", tower, ph, adapter_text=llm["text"],
                                adapter_modality=llm["modality"], info=info)
        return ExpertSource(name, modality, "damc-full", tower, ph, llm_text=llm.get("text"),
                            llm_modality=llm.get("modality"), info=info)
    tower = z.load_tower(name)
    if kind == "projector":
        return ExpertSource(name, modality, "projector", tower, ph, info=info)
    if llm_kind == "lora":
        return ExpertSource(name, modality, "lora", tower, ph, adapter=llm["adapter"], info=info)
    if llm_kind == "full":
        return ExpertSource(name, modality, "full", tower, ph, llm=llm["llm"], info=info)
    raise CheckpointError(f"zoo expert {name!r} of kind {kind!r} has neither llm/ nor adapter/", file=path)


def zoo_expert_model(zoo, name: str) -> MultimodalLM:
    """A zoo expert alone as a :class:`MultimodalLM` (DAMC experts included: text route + modality
    route, λ = 1) - what ``Zoo.load_expert`` can return for kind ``"damc"``."""
    from .world import Zoo

    z = Zoo.coerce(zoo)
    return compose_expert(z.base_path, zoo_expert(z, name), z.tokenizer())


# ================================================================================================ loading
def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   device_map: str | Mapping[str, Any] | None = None, family: str | None = None) -> nn.Module:
    """A causal LM from a Hugging Face folder, in ``dtype`` on ``device``; for a multimodal folder, its
    language model, read by :class:`workbench.families.FamilyCheckpoint` (the folder's family detected
    from its ``config.json``, or ``family``; a multimodal config of no known family raises
    :class:`ConfigError` naming the families - load its LLM with ``family=`` and pass the module as a
    composition's base).

    ``device_map`` (accelerate's: ``"auto"``, ``{"": 0}``, a module -> device dict) places the model
    instead of ``device``: a causal-LM folder gets it in ``from_pretrained``; a multimodal folder's
    language model (built on the CPU from the checkpoint's tensors) is placed by accelerate's
    ``dispatch_model`` (:func:`_dispatch`)."""
    from .families import FamilyCheckpoint, family_of

    p = Path(path)
    build_on = device if device_map is None else "cpu"
    if family_of(p, family).name != "generic":  # (an unknown multimodal config raises, naming the families)
        return _dispatch(FamilyCheckpoint(p, family).language_model(dtype, build_on), device_map, dtype)
    from transformers import AutoModelForCausalLM

    if not (p / "config.json").exists():
        raise CheckpointError("no config.json: not a Hugging Face model folder", file=p)
    if device_map is not None:
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, device_map=device_map).eval()
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).to(device).eval()


def _dispatch(llm: nn.Module, device_map: str | Mapping[str, Any] | None, dtype: torch.dtype) -> nn.Module:
    """``llm`` placed by accelerate's ``dispatch_model`` (``device_map`` ``None``: as it is). A string
    map (``"auto"``, ``"balanced"``, ``"sequential"``) is resolved by ``infer_auto_device_map`` over the
    visible devices (balanced memory unless ``"sequential"``), as ``from_pretrained`` does."""
    if device_map is None:
        return llm
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = list(getattr(llm, "_no_split_modules", None) or [])
        mem = (None if device_map == "sequential"
               else get_balanced_memory(llm, dtype=dtype, no_split_module_classes=no_split))
        device_map = infer_auto_device_map(llm, max_memory=mem, no_split_module_classes=no_split, dtype=dtype)
    return dispatch_model(llm, device_map=dict(device_map)).eval()


def _as_llm(base: str | Path | nn.Module, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            device_map: str | Mapping[str, Any] | None = None) -> nn.Module:
    if isinstance(base, nn.Module):
        return copy.deepcopy(base).eval()
    return load_causal_lm(base, dtype, device, device_map)


def _open_llm(src: ExpertSource | str | Path | None):
    """The :class:`~workbench.io.experts.Expert` of an expert's LLM (its task vectors ``tau``): a
    full folder, the language model of a multimodal folder (:class:`workbench.families.FamilyCheckpoint`:
    the source's ``family``, else detected), a LoRA adapter, or ``None`` / a projector-only expert
    (``tau = 0``)."""
    from .families import FamilyCheckpoint, family_of
    from .io.experts import Expert, open_expert

    path, family = None, None
    if isinstance(src, ExpertSource):
        family = src.family
        if src.kind == "full":
            path = src.llm
        elif src.kind == "lora":
            path = src.adapter
        elif src.kind != "projector":
            raise ConfigError(f"expert {src.name!r} is a {src.kind} expert: its LLM is decoupled into text and "
                              "modality parameters and has no single task vector (use compose_damc)")
    elif src is not None:
        path = Path(src)
    if path is not None and Path(path).is_dir() and family_of(path, family).name != "generic":
        return Expert("mllm", Path(path), checkpoint=FamilyCheckpoint(path, family))
    return open_expert(path)


# ================================================================================================ merging
@torch.no_grad()
def merge_llm(base: str | Path | nn.Module, experts: Sequence[ExpertSource | str | Path | None], *,
              method: str | Callable = "weight_average", params: Mapping[str, Any] | None = None,
              coefficients: Sequence[float] | None = None, keep: Sequence[str] = (), seed: int = 0,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              device_map: str | Mapping[str, Any] | None = None, progress: bool = False) -> nn.Module:
    """Merge the experts' LLMs into a copy of the base, streaming tensor by tensor through the
    engine's one merge loop (:func:`workbench.engine.merge_into`: in memory, in place).

    ``method`` is a name of :mod:`workbench.merging` (default ``"weight_average"``: NaiveMC, the mean
    of the θi; ``coefficients`` λ give θ0 + Σ λi τi, its ``weights``) or a callable
    ``fn(base, experts, name=, generator=, **params)``; it gets each tensor's θi (LoRA experts:
    θ0 + s·B@A; projector-only experts: θ0). ``keep``: regexes of tensors left at θ0; every other
    floating parameter is merged. Memory: the base model (loaded in ``dtype`` on ``device``, or placed
    by ``device_map``: :func:`load_causal_lm`; the arithmetic is float32 per tensor, where the tensor
    is) plus a few tensors per expert: in bfloat16 on one GPU a 7B LLM is ~14 GB.
    """
    from .engine import merge_into

    llm = _as_llm(base, dtype, device, device_map)
    readers = [_open_llm(e) for e in experts]
    n = len(readers)
    if n == 0:
        raise ConfigError("merge_llm needs at least one expert")
    params = dict(params or {})
    if coefficients is not None:
        if method != "weight_average":
            raise ConfigError("coefficients apply to method 'weight_average' only")
        if len(coefficients) != n:
            raise ConfigError(f"{len(coefficients)} coefficients for {n} experts")
        params["weights"] = [float(c) for c in coefficients]
    merge_into(llm, readers, method, params, keep=keep, seed=seed, progress=progress)
    return llm


def _towers(experts: Sequence[ExpertSource]) -> dict[str, nn.Module]:
    towers = {}
    for e in experts:
        if e.tower_key in towers:
            raise ConfigError(f"two experts for modality {e.modality!r} under one name {e.tower_key!r}: each tower is "
                              "one route; give experts of one modality distinct names with key=..., e.g. key='image_2'")
        towers[e.tower_key] = e.tower
    return towers


@torch.no_grad()
def assign_placeholders(llm: nn.Module, tokenizer, experts: Sequence[ExpertSource]):
    """Distinct placeholders for the experts' towers: returns ``(tokenizer, {tower key: token})``.

    Experts that share a placeholder (every LLaVA-1.5 expert uses ``<image>``) keep it for the
    first one; each later one gets a new special token ``<key>`` (``<key_2>``... if taken) added
    to a copy of ``tokenizer``. The LLM's embeddings are resized to the tokenizer (never shrunk)
    and each new row - input and, when untied, output embedding - is a copy of the original
    placeholder's row (chosen here: the token then starts where its model's placeholder was; its
    input row is replaced by the tower's tokens anyway). The user's tokenizer is not modified;
    a placeholder the tokenizer does not know raises :class:`ConfigError`."""
    phs: dict[str, str] = {}
    new: list[tuple[str, str]] = []  # (new token, original placeholder)
    vocab = tokenizer.get_vocab()
    for e in experts:
        if e.placeholder not in vocab:
            raise ConfigError(f"expert {e.name!r}: placeholder {e.placeholder!r} is not a token of the tokenizer")
        ph = e.placeholder
        if ph in phs.values():
            ph = f"<{e.tower_key}>"
            i = 2
            while ph in vocab or ph in phs.values():
                ph, i = f"<{e.tower_key}_{i}>", i + 1
            new.append((ph, e.placeholder))
        phs[e.tower_key] = ph
    if not new:
        return tokenizer, phs
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([t for t, _ in new], special_tokens=True)
    emb = llm.get_input_embeddings()
    rows = max(len(tokenizer), emb.weight.shape[0])
    if rows > emb.weight.shape[0]:
        llm.resize_token_embeddings(rows, mean_resizing=False)
    ins, outs = llm.get_input_embeddings().weight, llm.get_output_embeddings()
    for tok, orig in new:
        i, j = tokenizer.convert_tokens_to_ids(tok), tokenizer.convert_tokens_to_ids(orig)
        ins[i] = ins[j]
        if outs is not None and outs.weight is not ins:
            outs.weight[i] = outs.weight[j]
    return tokenizer, phs


class TemplatedMultimodalLM(MultimodalLM):
    """A :class:`MultimodalLM` whose prompts are wrapped in a chat template (``"...{prompt}..."``,
    e.g. LLaVA-1.5's ``"USER: {prompt} ASSISTANT:"``) before tokenisation, in every path
    (scoring, generation, training); answers are appended after it unchanged."""

    def __init__(self, llm, tokenizer, towers, placeholders, template: str = "{prompt}") -> None:
        super().__init__(llm, tokenizer, towers, placeholders)
        if "{prompt}" not in template:
            raise ConfigError(f"chat template {template!r} has no '{{prompt}}' field")
        self.template = template

    def _pieces(self, prompts, modal_inputs, answers=None, answer_eos=True):
        return super()._pieces([self.template.format(prompt=p) for p in prompts], modal_inputs, answers, answer_eos)


def _mrope_tower(tower: nn.Module):
    """The Qwen2-VL tower inside ``tower`` (a :class:`CachedTower` is looked through), or ``None``."""
    inner = tower.tower if isinstance(tower, CachedTower) else tower
    return inner if getattr(inner, "uses_mrope", False) else None


class MRopeMultimodalLM(TemplatedMultimodalLM):
    """A composition with Qwen2-VL / Qwen2.5-VL towers: their image tokens get the family's 3-D
    M-RoPE positions (time, height, width) when scoring and generating, as transformers'
    ``get_rope_index`` gives them (:meth:`workbench.families.HFVisionTower.mrope_positions`); text
    and the tokens of other towers take one position each, on all three streams.

    The LLM's rotary embedding is replaced by the family's M-RoPE one (``rope_config``: the
    family's text config, with its ``mrope_section``); with equal streams (text alone) it is RoPE.
    The training forward (:meth:`MultimodalLM.forward`) keeps 1-D positions."""

    def __init__(self, llm, tokenizer, towers, placeholders, template: str = "{prompt}", *, rope_config) -> None:
        super().__init__(llm, tokenizer, towers, placeholders, template)
        import transformers

        cls = {"qwen2_5_vl": "Qwen2_5_VLRotaryEmbedding"}.get(getattr(rope_config, "model_type", ""),
                                                               "Qwen2VLRotaryEmbedding")
        rotary = getattr(transformers.models.qwen2_5_vl.modeling_qwen2_5_vl if "2_5" in cls
                         else transformers.models.qwen2_vl.modeling_qwen2_vl, cls)(config=rope_config)
        llm.model.rotary_emb = rotary.to(self.device)

    def _prompt_positions(self, prompts, modal_inputs, pieces) -> list[torch.Tensor]:
        from .mllm import _norm_inputs

        out = []
        for b, (p, mi) in enumerate(zip(prompts, modal_inputs)):
            ids = self.tokenizer(self.template.format(prompt=p))["input_ids"]
            mi = _norm_inputs(mi)
            used = {m: 0 for m in mi}
            parts, cur, text = [], 0, 0
            for t in ids:
                m = self._ph_ids.get(int(t))
                if m is None:
                    text += 1
                    continue
                parts.append(torch.arange(cur, cur + text).expand(3, -1))
                cur, text = cur + text, 0
                x = mi[m][used[m]]
                used[m] += 1
                tower = _mrope_tower(self.towers[m])
                if tower is None:  # another family's tower: its tokens are text-like
                    n = int(self.towers[m](x).shape[0])
                    parts.append(torch.arange(cur, cur + n).expand(3, -1))
                    cur += n
                else:
                    pos, cur = tower.mrope_positions(x, cur)
                    parts.append(pos.cpu())
            parts.append(torch.arange(cur, cur + text).expand(3, -1))
            pos = torch.cat(parts, 1).to(self.device)
            if pos.shape[1] != pieces[b][0].shape[0]:
                raise ValueError(f"prompt {b}: {pos.shape[1]} positions for {pieces[b][0].shape[0]} tokens")
            out.append(pos)
        return out


def _mllm(llm: nn.Module, tokenizer, experts: Sequence[ExpertSource]) -> MultimodalLM:
    """The composed model: one tower per expert (by :attr:`ExpertSource.tower_key`), distinct
    placeholders (:func:`assign_placeholders`), the experts' chat template if they have one; with a
    Qwen2-VL tower, a :class:`MRopeMultimodalLM` (3-D M-RoPE positions for its image tokens)."""
    towers = _towers(experts)
    llm.eval().requires_grad_(False)
    fuse_routes_for_inference(llm)  # DAMC / MMER: each route's W0 + delta formed once for evaluation
    tokenizer, phs = assign_placeholders(llm, tokenizer, experts)
    templates = {e.template for e in experts if e.template is not None}
    if len(templates) > 1:
        raise ConfigError(f"the experts have different chat templates {sorted(templates)}; compose experts of one family")
    mrope = [t for t in map(_mrope_tower, towers.values()) if t is not None]
    if mrope:
        return MRopeMultimodalLM(llm, tokenizer, towers, phs, templates.pop() if templates else "{prompt}",
                                 rope_config=mrope[0].core.config.text_config)
    if templates:
        return TemplatedMultimodalLM(llm, tokenizer, towers, phs, templates.pop())
    return MultimodalLM(llm, tokenizer, towers, phs)


def compose_expert(base: str | Path | nn.Module, expert: ExpertSource, tokenizer) -> MultimodalLM:
    """One expert alone (its LLM and its tower); DAMC experts get their two routes (text, modality)."""
    if expert.kind in ("damc", "damc-full"):
        return compose_damc(base, [expert], tokenizer, coefficients=[1.0])
    if expert.kind == "full":
        llm = load_causal_lm(expert.llm)
    else:
        llm = merge_llm(base, [expert], coefficients=[1.0]) if expert.kind == "lora" else _as_llm(base)
    return _mllm(llm, tokenizer, [expert])


def compose_frozen(base: str | Path | nn.Module, experts: Sequence[ExpertSource], tokenizer, *,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   device_map: str | Mapping[str, Any] | None = None) -> MultimodalLM:
    """The frozen-LLM composition: θ0 (in ``dtype`` on ``device``, or placed by ``device_map``:
    :func:`load_causal_lm`) with every expert's tower."""
    return _mllm(_as_llm(base, dtype, device, device_map), tokenizer, experts)


def compose_naive_mc(base: str | Path | nn.Module, experts: Sequence[ExpertSource], tokenizer, *,
                     coefficients: Sequence[float] | None = None, method: str | Callable = "weight_average",
                     params: Mapping[str, Any] | None = None, keep: Sequence[str] = (),
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     device_map: str | Mapping[str, Any] | None = None, progress: bool = False) -> MultimodalLM:
    """NaiveMC: the (λ-weighted) average of the experts' LLMs + every tower (see :func:`merge_llm`;
    one LLM in memory, in ``dtype`` on ``device`` or placed by ``device_map``: bfloat16 on a GPU for
    7B experts)."""
    llm = merge_llm(base, experts, method=method, params=params, coefficients=coefficients, keep=keep,
                    dtype=dtype, device=device, device_map=device_map, progress=progress)
    return _mllm(llm, tokenizer, experts)


# ================================================================================================ DAMC
def _dense_deltas(base_llm: nn.Module, folder: Path, targets: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """θ − θ0 on the linear weights of ``base_llm`` that differ in the full folder ``folder``."""
    from .io.experts import open_expert

    e = open_expert(folder)
    out = {}
    for n, m in base_llm.named_modules():
        if isinstance(m, nn.Linear) and n.split(".")[-1] in (targets or DEFAULT_LORA_TARGETS):
            key = n + ".weight"
            if e.kind != "full" or key not in e.reader:
                raise CheckpointError("DAMC full-weight folder lacks a weight of the base", file=folder, tensor=key)
            d = e.tau(key, m.weight.detach().float())
            if bool((d != 0).any()):
                out[n] = d
    return out


@torch.no_grad()
def damc_llm(base: str | Path | nn.Module, experts: Sequence[ExpertSource], *,
             coefficients: Sequence[float] | None = None, mu: Sequence[float] | float = 1.0,
             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             device_map: str | Mapping[str, Any] | None = None) -> nn.Module:
    """The routed LLM of DAMC: route 0 (text) = W0 + Σ λi si Bi^t Ai^t (component tag ``i``),
    route i+1 = W0 + μi si Bi^m Ai^m (tag ``"mu"``). λ default 1/N. One base LLM in memory, loaded
    in ``dtype`` on ``device`` or placed by ``device_map`` (bfloat16 on a GPU for 7B experts); the
    routes' factors / deltas are held in the base weight's dtype and device, full-weight deltas
    computed in float32 first."""
    n = len(experts)
    lam = list(coefficients) if coefficients is not None else [1.0 / n] * n
    mus = [float(mu)] * n if isinstance(mu, (int, float)) else list(mu)
    if len(lam) != n or len(mus) != n:
        raise ConfigError(f"{len(lam)} coefficients / {len(mus)} mu values for {n} experts")
    llm = _as_llm(base, dtype, device, device_map)
    routes: dict[int, dict[str, list]] = {TEXT_ROUTE: {}}
    for i, e in enumerate(experts):
        if e.kind == "damc":
            text = load_route_adapter(e.adapter_text)
            mod = load_route_adapter(e.adapter_modality)
            for name, lr in text.items():
                routes[TEXT_ROUTE].setdefault(name, []).append(LowRank(lr.A, lr.B, lr.scale, tag=i))
            routes[i + 1] = {name: [LowRank(lr.A, lr.B, lr.scale, tag="mu")] for name, lr in mod.items()}
        elif e.kind == "damc-full":
            for name, d in _dense_deltas(llm, e.llm_text).items():
                routes[TEXT_ROUTE].setdefault(name, []).append(Dense(d, 1.0, tag=i))
            routes[i + 1] = {name: [Dense(d, 1.0, tag="mu")] for name, d in _dense_deltas(llm, e.llm_modality).items()}
        else:
            raise ConfigError(f"expert {e.name!r} is a {e.kind} expert; DAMC composes DAMC experts "
                              "(decoupled text and modality parameters)")
    apply_routes(llm, routes)
    set_route_coefficients(llm, TEXT_ROUTE, dict(enumerate(lam)))
    for i in range(n):
        set_route_coefficients(llm, i + 1, {"mu": mus[i]})
    llm.eval().requires_grad_(False)
    return llm


def compose_damc(base: str | Path | nn.Module, experts: Sequence[ExpertSource], tokenizer, *,
                 coefficients: Sequence[float] | None = None, mu: Sequence[float] | float = 1.0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 device_map: str | Mapping[str, Any] | None = None) -> MultimodalLM:
    """DAMC: merged text parameters (coefficients λi), each modality's own parameters on its tokens
    (:func:`damc_llm`; the base LLM in ``dtype`` on ``device`` or placed by ``device_map``)."""
    return _mllm(damc_llm(base, experts, coefficients=coefficients, mu=mu, dtype=dtype, device=device,
                          device_map=device_map), tokenizer, experts)


def set_damc_coefficients(model: MultimodalLM | nn.Module, coefficients: Sequence[float]) -> None:
    """Change the λi of a DAMC composition in place (no weights rebuilt)."""
    llm = model.llm if isinstance(model, MultimodalLM) else model
    set_route_coefficients(llm, TEXT_ROUTE, dict(enumerate(coefficients)))


# ================================================================================================ MMER
def mmer_mask(tau: torch.Tensor, tau_star: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """MMER's mask for one expert (methods.md section 3, **unverified** reading, λ a parameter):
    ``m = 1[|τi| > λ · |τi − τ*|]``; λ = 1 is the element-wise minimiser of ‖θi − (θ0 + m ⊙ τ*)‖₁.
    Delegates to :func:`workbench.merging.mmer_masks` (the rule the engine's ``mmer`` method uses)."""
    from .merging.masks import mmer_masks

    return mmer_masks([tau], tau_star, lam)[0]


def _with_masks(spec, mask_fn: Callable, lam: float):
    """``spec``'s method with MMER's masks as extras: ``mask_<i> = mask_fn(τi, τ*, lam)``, τ* = merged − θ0."""
    from .merging.registry import MergeOutput, MethodSpec

    def fn(base, experts, *, name="", generator=None, **params):
        out = spec.fn(base, experts, name=name, generator=generator, **params)
        merged = getattr(out, "merged", out)
        tau_star = merged.float() - base
        return MergeOutput(merged, {f"mask_{i}": mask_fn(e - base, tau_star, lam).bool() for i, e in enumerate(experts)})

    return MethodSpec(name=spec.name, fn=fn, defaults=dict(spec.defaults), doc=spec.doc)


@torch.no_grad()
def mmer_parts(base: str | Path | nn.Module, experts: Sequence[ExpertSource | str | Path | None], *,
               merge_method: str | Callable = "ties", merge_params: Mapping[str, Any] | None = None,
               lam: float = 1.0, mask_fn: Callable | None = None, keep: Sequence[str] = (), seed: int = 0,
               dtype: torch.dtype | None = None, progress: bool = False) -> MMERParts:
    """Stream over the base's tensors (the engine's one merge loop, :func:`workbench.engine.merge_into`):
    τ* = merge(θ0, θi) − θ0 (``merge_method``, default TIES with its registry defaults - **unverified**
    choice), then ``mask_fn(τi, τ*, lam)`` (default :func:`mmer_mask`) per expert. Masks are kept for
    every merged tensor (packed, 1 bit per entry, by the engine's
    :class:`~workbench.io.mmer_store.ExtrasRecorder`); τ* is held in ``dtype`` (default: the base
    parameter's dtype). Tensors no expert changes have neither."""
    from .engine import merge_into, method_params, resolve_method
    from .io.mmer_store import mask_key

    llm = base if isinstance(base, nn.Module) else load_causal_lm(base)
    readers = [_open_llm(e) for e in experts]
    spec = resolve_method(merge_method)
    params = method_params(spec, merge_params)
    sink = merge_into(llm, readers, _with_masks(spec, mask_fn or mmer_mask, lam), params, keep=keep, seed=seed,
                      task_vectors=True, dtype=dtype, progress=progress)
    masks = {n: [sink.extras.tensors[mask_key(n, i)] for i in range(len(readers))] for n in sink.tensors}
    return MMERParts(sink.tensors, masks, len(readers), {"merge_method": str(merge_method), "lam": lam,
                                                         **{k: v for k, v in params.items() if isinstance(v, (int, float, str))}})


@torch.no_grad()
def mmer_parts_from_merge(output: str | Path, base: str | Path | nn.Module, n_experts: int | None = None,
                          dtype: torch.dtype = torch.float32) -> MMERParts:
    """MMERParts from the engine's output folder: its MMER store ``<output>/mmer/``
    (:func:`workbench.io.mmer_store.read_parts`), τ* = merged − θ0 per masked tensor."""
    from .io.mmer_store import MMER_DIR, MMERStore, read_parts

    MMERStore(Path(output) / MMER_DIR)  # the masks are there, before the base LLM is loaded
    llm = base if isinstance(base, nn.Module) else load_causal_lm(base)
    return read_parts(Path(output) / MMER_DIR, base=dict(llm.named_parameters()), merged=output,
                      n_experts=n_experts, dtype=dtype)


def _is_routable(llm: nn.Module, name: str, target_modules: Sequence[str] | None) -> bool:
    if not name.endswith(".weight"):
        return False
    mod = name[: -len(".weight")]
    try:
        m = llm.get_submodule(mod)
    except AttributeError:
        return False
    if not isinstance(m, nn.Linear):
        return False
    last = mod.split(".")[-1]
    return last != "lm_head" and (target_modules is None or last in target_modules)


@torch.no_grad()
def mmer_llm(base: str | Path | nn.Module, parts: MMERParts, *, alpha: float = 1.0, text_route: str = "merged",
             routes: Sequence[int] | None = None, target_modules: Sequence[str] | None = DEFAULT_LORA_TARGETS,
             unrouted: str = "text", copy_base: bool = True) -> nn.Module:
    """The routed LLM of MMER: route ``routes[i]`` (default i+1) = θ0 + α m_i ⊙ τ* (tag ``"alpha"``),
    route 0 = θ0 + τ* (``text_route="merged"``) or θ0 (``"base"``) - **unverified** reading.
    Tensors that are not routed linear weights get θ0 + τ* (``unrouted="text"`` with a merged text
    route) or stay θ0 (``"base"``). τ* is stored once per module (shared by all routes). With
    ``copy_base=False`` a base module is modified in place."""
    if text_route not in ("merged", "base"):
        raise ConfigError(f"text_route must be 'merged' or 'base', got {text_route!r}")
    if unrouted not in ("text", "base"):
        raise ConfigError(f"unrouted must be 'text' or 'base', got {unrouted!r}")
    llm = base if (isinstance(base, nn.Module) and not copy_base) else _as_llm(base)
    rids = list(routes) if routes is not None else [i + 1 for i in range(parts.n_experts)]
    if len(rids) != parts.n_experts:
        raise ConfigError(f"{len(rids)} routes for {parts.n_experts} experts")
    params = dict(llm.named_parameters())
    spec: dict[int, dict[str, Any]] = {k: {} for k in [TEXT_ROUTE] + rids}
    for name, ts in parts.tau_star.items():
        if name not in params:
            raise CheckpointError("τ* has a tensor the base LLM does not have", tensor=name)
        if _is_routable(llm, name, target_modules):
            ts = ts.to(params[name].dtype)
            if text_route == "merged":
                spec[TEXT_ROUTE][name] = Dense(ts, 1.0)
            for i, k in enumerate(rids):
                spec[k][name] = Masked(ts, parts.masks[name][i], 1.0, tag="alpha")
        elif unrouted == "text" and text_route == "merged":
            params[name].data.add_(ts.to(params[name].dtype))
    apply_routes(llm, {k: v for k, v in spec.items() if v})
    for k in rids:
        set_route_coefficients(llm, k, {"alpha": alpha})
    llm.eval().requires_grad_(False)
    return llm


def compose_mmer(base: str | Path | nn.Module, experts: Sequence[ExpertSource], tokenizer, *,
                 parts: MMERParts | None = None, alpha: float = 1.0, lam: float = 1.0,
                 merge_method: str | Callable = "ties", merge_params: Mapping[str, Any] | None = None,
                 text_route: str = "merged", target_modules: Sequence[str] | None = DEFAULT_LORA_TARGETS,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 device_map: str | Mapping[str, Any] | None = None, progress: bool = False) -> MultimodalLM:
    """MMER composition (see :func:`mmer_parts` and :func:`mmer_llm`); ``parts`` may come from
    :func:`mmer_parts_from_merge` (the engine's output). The base LLM is loaded in ``dtype`` on
    ``device`` or placed by ``device_map`` (τ* and the masks are computed in float32 per tensor)."""
    base_llm = _as_llm(base, dtype, device, device_map)
    if parts is None:
        parts = mmer_parts(base_llm, experts, merge_method=merge_method, merge_params=merge_params, lam=lam,
                           progress=progress)
    if parts.n_experts != len(experts):
        raise ConfigError(f"MMER parts hold {parts.n_experts} masks per tensor for {len(experts)} experts")
    llm = mmer_llm(base_llm, parts, alpha=alpha, text_route=text_route, target_modules=target_modules,
                   copy_base=False)
    model = _mllm(llm, tokenizer, experts)
    model.mmer_parts = parts  # type: ignore[attr-defined]
    return model


def set_mmer_alpha(model: MultimodalLM | nn.Module, alpha: float) -> None:
    """Change MMER's α in place."""
    from .routing import routed_modules

    llm = model.llm if isinstance(model, MultimodalLM) else model
    routes = {int(k) for m in routed_modules(llm).values() for k in m.routes if int(k) != TEXT_ROUTE}
    for k in sorted(routes):
        set_route_coefficients(llm, k, {"alpha": alpha})


@torch.no_grad()
def set_mmer_masks(model: MultimodalLM | nn.Module, parts: MMERParts, routes: Sequence[int] | None = None) -> None:
    """Replace the masks of an MMER composition in place (e.g. recomputed with another λ)."""
    llm = model.llm if isinstance(model, MultimodalLM) else model
    rids = list(routes) if routes is not None else [i + 1 for i in range(parts.n_experts)]
    for i, k in enumerate(rids):
        for mod, comps in route_components(llm, k).items():
            name = mod + ".weight"
            for c in comps:
                if hasattr(c, "set_mask"):
                    c.set_mask(parts.masks[name][i])


@torch.no_grad()
def remask(parts: MMERParts, base: str | Path | nn.Module, experts: Sequence[ExpertSource | str | Path | None],
           lam: float, mask_fn: Callable | None = None) -> MMERParts:
    """The same τ* with masks recomputed for threshold ``lam`` (streams the experts again)."""
    llm = base if isinstance(base, nn.Module) else load_causal_lm(base)
    readers = [_open_llm(e) for e in experts]
    params = dict(llm.named_parameters())
    mask_fn = mask_fn or mmer_mask
    masks = {}
    for name, ts in parts.tau_star.items():
        b = params[name].detach().float()
        taus = [r.tau(name, b) for r in readers]
        masks[name] = [pack_mask(mask_fn(t if t is not None else torch.zeros_like(b), ts.float(), lam)) for t in taus]
    return MMERParts(parts.tau_star, masks, parts.n_experts, {**parts.params, "lam": lam})


# ================================================================================================ storage
def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a file, or of every file under a folder (apparent sizes, symlinks not followed)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def storage_comparison(mmer_paths: Sequence[str | Path], expert_paths: Sequence[str | Path]) -> dict:
    """Bytes on disk: MMER's stored parts (τ* + packed masks: the files/folders in ``mmer_paths``)
    vs. the N experts' LLMs (``expert_paths``). Returns the sizes and their ratio."""
    mm = sum(disk_bytes(p) for p in mmer_paths)
    ex = sum(disk_bytes(p) for p in expert_paths)
    return {"mmer_bytes": mm, "experts_bytes": ex, "n_experts": len(expert_paths),
            "ratio": mm / ex if ex else float("nan"), "saving": 1 - mm / ex if ex else float("nan")}


__all__ = [
    "CachedTokenizer", "CachedTower", "ENCODER_OUTPUTS", "EncoderOutputs", "ExpertSource", "MRopeMultimodalLM",
    "TemplatedMultimodalLM",
    "assign_placeholders",
    "cached_source", "family_expert", "compose_damc", "compose_expert",
    "compose_frozen", "compose_mmer",
    "compose_naive_mc", "damc_llm", "disk_bytes",
    "hf_expert", "load_causal_lm",
    "merge_llm", "mmer_llm", "mmer_mask", "mmer_parts", "mmer_parts_from_merge", "remask",
    "set_damc_coefficients", "set_mmer_alpha", "set_mmer_masks", "storage_comparison",
    "zoo_expert", "zoo_expert_model",
]
