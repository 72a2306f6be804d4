"""Per-token routing of linear layers (shared by DAMC and MMER).

Contract used by :mod:`workbench.mllm`: ``with token_routes(llm, route_ids): llm(...)`` sets the
route of every prompt token (0 = text, k >= 1 = the k-th modality route) on every routed
module of ``llm`` for the duration of the call. On an LLM without routed modules it is a
no-op, so the same forward code serves plain and routed models.

:class:`RoutedLinear` replaces an ``nn.Linear``: it keeps the base weight ``W0`` (the *same*
``Parameter`` object, under the same state-dict name ``<module>.weight``) and, per route ``k``, a
delta ``Δk`` given as a sum of components:

- :class:`LowRank` ``(A [r, in], B [out, r], scale)``: ``Δ = scale · B @ A`` (LoRA), computed as
  ``scale · (x Aᵀ) Bᵀ`` - the product is never formed;
- :class:`Dense` ``(delta [out, in], scale)``: a full delta;
- :class:`Masked` ``(shared [out, in], mask, alpha)``: ``Δ = alpha · mask ⊙ shared`` - the mask is
  stored bit-packed (1 bit per entry) and the shared tensor (MMER's τ*) is stored once per module
  however many routes use it (tensors are de-duplicated by identity of storage).

Forward: ``y = x W0ᵀ + b`` is computed once for all tokens; then for every route that has tokens in
the batch, the delta output of *those tokens only* is added (``index_add``). A route with no
tokens is skipped (it cannot touch the others' outputs). Tokens of a route without a delta use the
base weight. When the current input's token shape differs from the stored ``route_ids`` (KV-cache
decode steps) or no routes are set, every token uses route 0 (text).

Cost: a masked route forms ``mask ⊙ shared`` at its first forward call and keeps it until the mask
or the shared tensor changes (:func:`set_masked_cache` turns this off: then it is re-formed at every
call - measured on CPU, 1 thread, a 4-layer hidden-512 Llama, 512 tokens spread over 5 routes: 3.6x
the plain forward for MMER's dense text route + 4 masked routes, 1.6x for 5 LoRA routes of rank 16);
stored memory (state dict, :func:`storage_bytes`) is the base + one shared tensor per module + 1 bit
per entry per masked route; the cache adds one dense matrix per masked route while it is on, for
matrices up to ``MASKED_CACHE_MAX_NUMEL`` entries (the mini zoo's; not a 7B model's).

Evaluation: a composed model's routed layers are :class:`InferenceRoutedLinear` (:func:`fuse_routes_for_inference`,
called by :func:`workbench.compose._mllm`): without autograd each route's tokens go through ``W0 + Δk`` formed
once, kept until the route changes - one product per route instead of the base product plus a delta product and
an ``index_add``; float32 weights up to ``FUSED_MAX_NUMEL`` entries only.

Training: :func:`add_lora_routes` adds trainable LoRA factors per route (peft initialisation: A
Kaiming-uniform, B zero), :func:`add_dense_routes` trainable zero-initialised full deltas;
:func:`route_parameters` gives one route's trainable parameters; :func:`save_route_adapter` /
:func:`load_route_adapter` write/read one route's LoRA as a peft adapter folder.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from .io.packing import pack_mask, unpack_mask, unpack_mask_bits
from torch.nn import functional as F

from .errors import CheckpointError, ConfigError
from .io.lora import lora_delta


class RoutedModule(nn.Module):
    """Marker base class: a module whose output depends on the current token routes."""

    route_ids: torch.Tensor | None = None


@contextlib.contextmanager
def token_routes(model: nn.Module, route_ids: torch.Tensor | None) -> Iterator[None]:
    """Set ``route_ids`` ([batch, seq] long) on every :class:`RoutedModule` in ``model``."""
    routed = [m for _, m in _named_routed(model)]
    previous = [m.route_ids for m in routed]
    # a plain attribute: skip nn.Module.__setattr__'s parameter/buffer/module bookkeeping
    for m in routed:
        m.__dict__["route_ids"] = route_ids
    try:
        yield
    finally:
        for m, prev in zip(routed, previous):
            m.__dict__["route_ids"] = prev


def _named_routed(model: nn.Module) -> list[tuple[str, RoutedModule]]:
    """``(name, module)`` of every :class:`RoutedModule` in ``model``, in ``named_modules`` order
    (each module once) - without walking the route components inside a :class:`RoutedLinear`
    (they hold no routed module; walking them dominated the cost of every routed forward call)."""
    out: list[tuple[str, RoutedModule]] = []
    memo: set = set()

    def walk(module: nn.Module, prefix: str) -> None:
        if module in memo:
            return
        memo.add(module)
        if isinstance(module, RoutedModule):
            out.append((prefix, module))
        if isinstance(module, RoutedLinear):
            return
        for name, child in module._modules.items():
            if child is not None:
                walk(child, prefix + ("." if prefix else "") + name)

    walk(model, "")
    return out


# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# delta specifications (inputs of apply_routes)
@dataclass
class LowRank:
    """``Δ = scale · B @ A`` with ``A`` [r, in] and ``B`` [out, r] (peft's LoRA layout)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0
    tag: int | str | None = None

    def dense(self) -> torch.Tensor:
        return lora_delta(self.A, self.B, self.scale)


@dataclass
class Dense:
    """``Δ = scale · delta`` with ``delta`` [out, in]."""

    delta: torch.Tensor
    scale: float = 1.0
    tag: int | str | None = None

    def dense(self) -> torch.Tensor:
        return self.scale * self.delta.float()


@dataclass
class Masked:
    """``Δ = alpha · mask ⊙ shared``: ``shared`` (MMER's τ*) is stored once per module for all the
    routes that pass the same tensor object; ``mask`` is a bool tensor shaped like ``shared`` or a
    packed uint8 tensor (:func:`workbench.io.packing.pack_mask` format)."""

    shared: torch.Tensor
    mask: torch.Tensor
    alpha: float = 1.0
    tag: int | str | None = None

    def bool_mask(self) -> torch.Tensor:
        if self.mask.dtype == torch.bool:
            if tuple(self.mask.shape) != tuple(self.shared.shape):
                raise ConfigError(f"mask shape {list(self.mask.shape)} differs from the shared delta's "
                                  f"{list(self.shared.shape)}")
            return self.mask
        if self.mask.dtype != torch.uint8 or self.mask.numel() != (self.shared.numel() + 7) // 8:
            raise ConfigError(f"packed mask must be uint8 with {(self.shared.numel() + 7) // 8} bytes, got "
                              f"{self.mask.dtype} with {self.mask.numel()}")
        return unpack_mask(self.mask, self.shared.shape)

    def packed(self) -> torch.Tensor:
        """The mask packed (validated against the shared tensor's size)."""
        if self.mask.dtype == torch.bool:
            return pack_mask(self.bool_mask())
        if self.mask.dtype != torch.uint8 or self.mask.numel() != (self.shared.numel() + 7) // 8:
            raise ConfigError(f"packed mask must be uint8 with {(self.shared.numel() + 7) // 8} bytes, got "
                              f"{self.mask.dtype} with {self.mask.numel()}")
        return self.mask

    def dense(self) -> torch.Tensor:
        return self.alpha * self.bool_mask() * self.shared.float()


DeltaSpec = Union[LowRank, Dense, Masked]
RouteSpec = Union[DeltaSpec, Sequence[DeltaSpec]]


# ------------------------------------------------------------------------------------------------
# components held inside a RoutedLinear. Each has ``unit`` (the spec's scale / alpha), ``coef`` (a
# coefficient set later by set_route_coefficients, 1 by default) and ``tag`` (to address it).
class _Component(nn.Module):
    unit: float = 1.0
    coef: float = 1.0
    tag = None

    @property
    def scale(self) -> float:
        return self.unit * self.coef


class _LowRankC(_Component):
    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, trainable: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=trainable)
        self.B = nn.Parameter(B, requires_grad=trainable)
        self.unit = float(scale)

    def forward(self, x: torch.Tensor, owner: "RoutedLinear") -> torch.Tensor:
        x = x.to(self.A.dtype)
        return self.scale * F.linear(F.linear(x, self.A), self.B)

    def dense(self, owner: "RoutedLinear") -> torch.Tensor:
        return lora_delta(self.A.detach(), self.B.detach(), self.scale)


class _DenseOwnC(_Component):
    """A delta owned by this route (trainable full-weight routes)."""

    def __init__(self, delta: torch.Tensor, scale: float, trainable: bool) -> None:
        super().__init__()
        self.delta = nn.Parameter(delta, requires_grad=trainable)
        self.unit = float(scale)

    def forward(self, x: torch.Tensor, owner: "RoutedLinear") -> torch.Tensor:
        return self.scale * F.linear(x.to(self.delta.dtype), self.delta)

    def dense(self, owner: "RoutedLinear") -> torch.Tensor:
        return self.scale * self.delta.detach().float()


class _DenseSharedC(_Component):
    """``scale ·`` one of the owner's de-duplicated shared tensors."""

    def __init__(self, index: int, scale: float) -> None:
        super().__init__()
        self.index, self.unit = int(index), float(scale)

    def forward(self, x: torch.Tensor, owner: "RoutedLinear") -> torch.Tensor:
        d = owner.shared_tensor(self.index)
        return self.scale * F.linear(x.to(d.dtype), d)

    def dense(self, owner: "RoutedLinear") -> torch.Tensor:
        return self.scale * owner.shared_tensor(self.index).float()


class _MaskedC(_Component):
    """``alpha · unpack(mask) ⊙ shared``; the mask is a packed uint8 buffer (1 bit per entry).

    ``mask ⊙ shared`` (without ``alpha``) is cached after the first forward call (``cache_masked``,
    default :data:`MASKED_CACHE`; :func:`set_masked_cache` switches it per model) and re-formed only
    when the mask or the shared tensor changes: ``set_mask``, a new buffer (``.to()``), an in-place
    edit (the tensor's version counter). ``alpha`` is applied after the product, as without the cache,
    so the output is bit-identical and an α change needs no invalidation. The cache is a plain
    attribute (not a buffer): it is not saved and not counted by :func:`storage_bytes`, but holds one
    dense matrix per masked route while it lives - only for matrices of at most
    :data:`MASKED_CACHE_MAX_NUMEL` entries (larger ones are re-formed at every call)."""

    def __init__(self, index: int, packed: torch.Tensor, shape: Sequence[int], alpha: float) -> None:
        super().__init__()
        self.index, self.unit, self.shape = int(index), float(alpha), tuple(shape)
        self.register_buffer("mask_packed", packed.contiguous())
        self.cache_masked = MASKED_CACHE
        self._masked_cache: tuple | None = None

    @property
    def alpha(self) -> float:
        return self.scale

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (bool tensor of ``shape`` or packed uint8) in place."""
        if mask.dtype == torch.bool:
            if tuple(mask.shape) != self.shape:
                raise ConfigError(f"mask shape {list(mask.shape)} differs from {list(self.shape)}")
            mask = pack_mask(mask)
        if mask.dtype != torch.uint8 or mask.numel() != self.mask_packed.numel():
            raise ConfigError(f"packed mask must be uint8 with {self.mask_packed.numel()} bytes")
        self.mask_packed = mask.to(self.mask_packed.device).contiguous()
        self._masked_cache = None

    def clear_cache(self) -> None:
        self._masked_cache = None

    def masked(self, owner: "RoutedLinear") -> torch.Tensor:
        """``mask ⊙ shared`` (``alpha`` not applied); cached while mask and shared tensor are unchanged."""
        d = owner.shared_tensor(self.index)
        m = self.mask_packed
        c = self._masked_cache
        if c is not None and c[0] is d and c[1] == d._version and c[2] is m and c[3] == m._version:
            return c[4]
        w = d * unpack_mask_bits(m, self.shape)
        # the key holds the tensors themselves, so a freed tensor's address cannot be mistaken for it
        keep = self.cache_masked and d.numel() <= MASKED_CACHE_MAX_NUMEL
        self._masked_cache = (d, d._version, m, m._version, w) if keep else None
        return w

    def matrix(self, owner: "RoutedLinear") -> torch.Tensor:
        return self.masked(owner) * self.alpha

    def forward(self, x: torch.Tensor, owner: "RoutedLinear") -> torch.Tensor:
        w = self.masked(owner)
        return F.linear(x.to(w.dtype), w) * self.alpha

    def dense(self, owner: "RoutedLinear") -> torch.Tensor:
        return self.matrix(owner).float()


#: Default of ``_MaskedC.cache_masked`` for masked routes created from now on.
MASKED_CACHE = True
#: Largest matrix (entries) whose masked copy is cached: caching every route's dense matrix would
#: cost one full LLM per expert at 7B scale (what MMER's 1-bit masks exist to avoid), so matrices
#: above this (4 MB in float32; a 7B model's are 16M-45M entries) are re-formed at every call.
MASKED_CACHE_MAX_NUMEL = 1 << 20


def set_masked_cache(model: nn.Module, enabled: bool) -> int:
    """Switch the cache of the masked matrices (``mask ⊙ shared``) of every masked route of
    ``model`` on or off (off also frees what is cached). Returns how many components changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, _MaskedC):
            m.cache_masked = bool(enabled)
            m.clear_cache()
            n += 1
    return n


class _Route(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList()

    def forward(self, x: torch.Tensor, owner: "RoutedLinear") -> torch.Tensor:
        out = None
        for p in self.parts:
            o = p(x, owner)
            out = o if out is None else out + o
        return out


class RoutedLinear(RoutedModule):
    """A linear layer whose output, per token, is that of ``W0 + Δ_route``.

    Args:
        linear: the ``nn.Linear`` replaced; its ``weight`` and ``bias`` Parameters are reused (not
            copied), so the state-dict names of the base stay ``<module>.weight`` / ``.bias``.

    Routes are added with :meth:`set_route`. ``self.route_ids`` ([batch, seq] long) is set by
    :func:`token_routes`.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"RoutedLinear wraps an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.routes = nn.ModuleDict()
        self._n_shared = 0
        self._shared_ids: dict[tuple, tuple[int, weakref.ref]] = {}

    # ---- shared (de-duplicated) tensors
    def shared_tensor(self, index: int) -> torch.Tensor:
        return getattr(self, f"shared_{index}")

    def _add_shared(self, t: torch.Tensor) -> int:
        """Register ``t`` once: a tensor passed again (the same object, still alive) reuses it."""
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device.type)
        hit = self._shared_ids.get(key)
        if hit is not None and hit[1]() is t:
            return hit[0]
        idx = self._n_shared
        self.register_buffer(f"shared_{idx}", t.detach().to(self.weight.device))
        self._shared_ids[key] = (idx, weakref.ref(t))
        self._n_shared += 1
        return idx

    def _check_shape(self, t: torch.Tensor, what: str) -> None:
        if tuple(t.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"{what} of shape {list(t.shape)} does not fit a linear layer "
                              f"[{self.out_features}, {self.in_features}]")

    # ---- routes
    def set_route(self, route: int, spec: RouteSpec, *, trainable: bool = False,
                  dtype: torch.dtype | None = None) -> None:
        """Give ``route`` the delta ``spec`` (one spec or a list summed); replaces an existing one.

        Low-rank factors and owned dense deltas are stored in ``dtype`` (default: the base
        weight's dtype for frozen routes, float32 for trainable ones).
        """
        specs = [spec] if isinstance(spec, (LowRank, Dense, Masked)) else list(spec)
        dev = self.weight.device
        dt = dtype or (torch.float32 if trainable else self.weight.dtype)
        r = _Route()
        for s in specs:
            if isinstance(s, LowRank):
                A, B = s.A.detach(), s.B.detach()
                if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.in_features or B.shape[0] != self.out_features \
                        or A.shape[0] != B.shape[1]:
                    raise ConfigError(f"LoRA factors A{list(A.shape)} B{list(B.shape)} do not fit a linear layer "
                                      f"[{self.out_features}, {self.in_features}]")
                r.parts.append(_LowRankC(A.to(dev, dt).clone(), B.to(dev, dt).clone(), s.scale, trainable))
                r.parts[-1].tag = s.tag
            elif isinstance(s, Dense):
                self._check_shape(s.delta, "dense delta")
                if trainable:
                    r.parts.append(_DenseOwnC(s.delta.detach().to(dev, dt).clone(), s.scale, True))
                else:
                    r.parts.append(_DenseSharedC(self._add_shared(s.delta), s.scale))
                r.parts[-1].tag = s.tag
            elif isinstance(s, Masked):
                self._check_shape(s.shared, "masked shared delta")
                if trainable:
                    raise ConfigError("masked routes are not trainable")
                m = s.packed()
                r.parts.append(_MaskedC(self._add_shared(s.shared), m.to(dev), s.shared.shape, s.alpha))
                r.parts[-1].tag = s.tag
            else:
                raise ConfigError(f"unknown delta spec {type(s).__name__} for route {route}")
        self.routes[str(int(route))] = r

    def route_keys(self) -> list[int]:
        return sorted(int(k) for k in self.routes)

    def route_delta(self, route: int) -> torch.Tensor:
        """The materialised ``Δ_route`` (float32, zeros for a route without delta) - for checks."""
        r = self.routes[str(route)] if str(route) in self.routes else None
        out = torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        if r is not None:
            for p in r.parts:
                out = out + p.dense(self)
        return out

    def route_weight(self, route: int) -> torch.Tensor:
        """``W0 + Δ_route`` (float32)."""
        return self.weight.detach().float() + self.route_delta(route)

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not len(self.routes):
            return y
        lead = x.shape[:-1]
        n_tok = math.prod(lead)
        rid = self.route_ids
        if rid is None or rid.numel() != n_tok or (rid.dim() == len(lead) and tuple(rid.shape) != tuple(lead)):
            # no routes set, or a decode step whose length differs from the prompt's: text route.
            r0 = self.routes["0"] if "0" in self.routes else None
            return y if r0 is None else y + r0(x, self).to(y.dtype)
        xf = x.reshape(n_tok, x.shape[-1])
        yf = y.reshape(n_tok, y.shape[-1])
        # without autograd, y (a fresh output) is updated in place: the same sums, no copies
        inplace = not torch.is_grad_enabled()
        for key, cnt, idx in _route_plan(rid, x.device, tuple(self.routes.keys())):
            if cnt == 0:
                continue  # the empty-route trap: never touch the other routes' outputs
            route = self.routes[key]
            if cnt == n_tok:
                d = route(xf, self).to(yf.dtype)
                yf = yf.add_(d) if inplace else yf + d
                continue
            d = route(xf.index_select(0, idx), self).to(yf.dtype)
            yf = yf.index_add_(0, idx, d) if inplace else yf.index_add(0, idx, d)
        return yf.reshape(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"routes={self.route_keys()}, shared={self._n_shared}")


# The token positions of every route, shared by all the routed modules of one forward call (they
# see the same route_ids tensor): computed once per route_ids tensor instead of once per module.
# The key holds the tensor itself (identity + version counter), so it cannot match another tensor;
# one cache per thread.
_PLAN_LOCAL = threading.local()


def _route_plan(rid: torch.Tensor, device: torch.device, keys: tuple[str, ...]
                ) -> list[tuple[str, int, torch.Tensor | None]]:
    """``[(route key, n tokens, token indices)]`` for ``keys`` (in that order) under ``rid``."""
    c = getattr(_PLAN_LOCAL, "cache", None)
    if c is None:
        c = _PLAN_LOCAL.cache = {"rid": None}
    if c["rid"] is not rid or c["version"] != rid._version or c["device"] != device:
        c.clear()
        c.update(rid=rid, version=rid._version, device=device, flat=rid.reshape(-1).to(device), plans={})
    plan = c["plans"].get(keys)
    if plan is None:
        flat, n, plan = c["flat"], c["flat"].numel(), []
        for key in keys:
            sel = flat == int(key)
            cnt = int(sel.sum())
            plan.append((key, cnt, sel.nonzero().squeeze(1) if 0 < cnt < n else None))
        c["plans"][keys] = plan
    return plan


# ------------------------------------------------------------------------------------------------
# inference: each route's weight formed once
#: Largest weight (entries) whose per-route sum ``W0 + Δ_route`` an :class:`InferenceRoutedLinear` keeps: one
#: dense copy per route is nothing for the mini zoo and one whole LLM per route at 7B scale (the bound of
#: :data:`MASKED_CACHE_MAX_NUMEL`, for the same reason).
FUSED_MAX_NUMEL = MASKED_CACHE_MAX_NUMEL


class InferenceRoutedLinear(RoutedLinear):
    """A :class:`RoutedLinear` for evaluation (:func:`fuse_routes_for_inference` turns a composed model's
    routed layers into these; the parameters, buffers and state dict are the same objects).

    Without autograd, each route's tokens go through ``W0 + Δ_route``, formed once and kept until the
    route changes (a coefficient, a mask, a tensor edited in place or replaced, the route itself): one
    product per route instead of ``x W0ᵀ`` for every token plus each route's delta and an ``index_add``
    (``benchmarks/routed_eval.py``, default zoo, one thread: DAMC 5.61 -> 3.99 ms per item, MMER 3.74 -> 2.67).
    The sums differ only by float rounding (``x (W0 + Δ)ᵀ`` against ``x W0ᵀ + x Δᵀ``); every prediction of
    notebooks 02-07 on the default zoo came out the same. With autograd (training) it is exactly
    :class:`RoutedLinear`, and so is a layer whose weight is not float32 or has more than
    :data:`FUSED_MAX_NUMEL` entries: in bfloat16, ``W0 + Δ`` would round a small delta away where the separate
    product keeps it."""

    _fused: dict | None = None

    def fusable(self) -> bool:
        return self.weight.dtype == torch.float32 and self.weight.numel() <= FUSED_MAX_NUMEL

    def _route_state(self, key: str) -> tuple:
        """What ``W0 + Δ_key`` depends on: the route's identity, each component's scale and the
        identity and version of every tensor it reads (and of ``W0``)."""
        route = self.routes[key]
        tensors = [self.weight]
        scales = []
        for p in route.parts:
            scales.append(p.scale)
            tensors.extend(p._parameters.values())
            tensors.extend(p._buffers.values())
            if hasattr(p, "index"):
                tensors.append(self.shared_tensor(p.index))
        return (id(route), tuple(scales), tuple((id(t), t._version) for t in tensors)), tensors

    def fused_weight(self, key: str) -> torch.Tensor:
        """``W0 + Δ_key`` (float32), kept while nothing it depends on changes."""
        state, tensors = self._route_state(key)
        if self._fused is None:
            self._fused = {}
        hit = self._fused.get(key)
        if hit is not None and hit[0] == state:
            return hit[2]
        w = self.weight.detach() + self.route_delta(int(key))
        # the entry holds the tensors themselves, so a freed tensor's id cannot be mistaken for theirs
        self._fused[key] = (state, tensors, w)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not len(self.routes) or not self.fusable():
            return super().forward(x)
        lead = x.shape[:-1]
        n_tok = math.prod(lead)
        rid = self.route_ids
        if rid is None or rid.numel() != n_tok or (rid.dim() == len(lead) and tuple(rid.shape) != tuple(lead)):
            # no routes set, or a decode step whose length differs from the prompt's: text route.
            return F.linear(x, self.fused_weight("0") if "0" in self.routes else self.weight, self.bias)
        plan = [(key, idx) for key, cnt, idx in _route_plan(rid, x.device, tuple(self.routes.keys())) if cnt]
        if len(plan) == 1 and plan[0][1] is None:  # one route holds every token
            return F.linear(x, self.fused_weight(plan[0][0]), self.bias)
        xf = x.reshape(n_tok, x.shape[-1])
        covered = sum(idx.numel() for _, idx in plan)
        # tokens of no route here keep the base weight
        yf = F.linear(xf, self.weight, self.bias) if covered < n_tok else xf.new_empty(n_tok, self.out_features)
        for key, idx in plan:
            yf.index_copy_(0, idx, F.linear(xf.index_select(0, idx), self.fused_weight(key), self.bias))
        return yf.reshape(*lead, self.out_features)


def fuse_routes_for_inference(model: nn.Module) -> int:
    """Turn every :class:`RoutedLinear` of ``model`` into an :class:`InferenceRoutedLinear` (in place:
    the same module objects, parameters and state dict). Returns how many it turned (a plain LLM: 0)."""
    n = 0
    for _, m in _named_routed(model):
        if type(m) is RoutedLinear:
            m.__class__ = InferenceRoutedLinear
            n += 1
    return n


# ------------------------------------------------------------------------------------------------
# model-level helpers
def _module_name(key: str) -> str:
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _matches(name: str, target_modules: Sequence[str] | str | None) -> bool:
    """peft-like matching: ``None`` = every linear; a string = a full-match regex; a list = names
    that equal the module name or its last component(s)."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def routed_linear(model: nn.Module, name: str) -> RoutedLinear:
    """The :class:`RoutedLinear` at ``name``, replacing an ``nn.Linear`` there first if needed."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"the model has no module {name!r}") from None
    if isinstance(mod, RoutedLinear):
        return mod
    if not isinstance(mod, nn.Linear):
        raise ConfigError(f"module {name!r} is a {type(mod).__name__}, not an nn.Linear; it cannot be routed")
    routed = RoutedLinear(mod)
    parent, attr = _get_parent(model, name)
    setattr(parent, attr, routed)
    return routed


def routed_modules(model: nn.Module) -> dict[str, RoutedLinear]:
    """Every :class:`RoutedLinear` of ``model`` by module name."""
    return {n: m for n, m in _named_routed(model) if isinstance(m, RoutedLinear)}


def apply_routes(llm: nn.Module, route_deltas: Mapping[int, Mapping[str, RouteSpec]], *,
                 target_modules: Sequence[str] | str | None = None, strict: bool = True) -> dict[str, RoutedLinear]:
    """Swap ``nn.Linear`` modules of ``llm`` for :class:`RoutedLinear` in place and set their routes.

    Args:
        llm: any module (a Hugging Face causal LM); names are relative to it.
        route_deltas: ``{route: {module or weight name: spec or [specs]}}``; names may end in
            ``.weight`` (checkpoint names). Route 0 is text.
        target_modules: restrict to these modules (peft-style suffixes, or one regex); with
            ``strict`` a delta on any other module is a :class:`ConfigError`, otherwise skipped.
    Returns:
        the routed modules by name.
    """
    done: dict[str, RoutedLinear] = {}
    for route, per_module in route_deltas.items():
        if int(route) < 0:
            raise ConfigError(f"route ids are >= 0, got {route}")
        for key, spec in per_module.items():
            name = _module_name(key)
            if not _matches(name, target_modules):
                if strict:
                    raise ConfigError(f"route {route} has a delta on {key!r}, outside target_modules {target_modules}")
                continue
            rl = routed_linear(llm, name)
            rl.set_route(int(route), spec)
            done[name] = rl
    return done


def linear_names(llm: nn.Module, target_modules: Sequence[str] | str | None = None) -> list[str]:
    """Names of the ``nn.Linear`` / :class:`RoutedLinear` modules matching ``target_modules``
    (``lm_head`` is never included unless named exactly)."""
    out = []
    for n, m in llm.named_modules():
        if isinstance(m, (nn.Linear, RoutedLinear)) and _matches(n, target_modules):
            if n.split(".")[-1] == "lm_head" and not (isinstance(target_modules, (list, tuple))
                                                      and "lm_head" in target_modules):
                continue
            out.append(n)
    return out


DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _new_route_targets(llm: nn.Module, n_routes: int, target_modules: Sequence[str] | str | None,
                       routes: Sequence[int] | None, freeze_base: bool) -> tuple[list[int], list[str]]:
    """``(route ids, linear names)`` for :func:`add_lora_routes` / :func:`add_dense_routes`: ``routes``
    or ``0 .. n_routes-1``, and the linears matching ``target_modules`` (none is an error); with
    ``freeze_base`` every parameter of ``llm`` is frozen first."""
    ids = list(routes) if routes is not None else list(range(n_routes))
    names = linear_names(llm, target_modules)
    if not names:
        raise ConfigError(f"no linear module of the model matches target_modules {target_modules}")
    if freeze_base:
        for p in llm.parameters():
            p.requires_grad_(False)
    return ids, names


def add_lora_routes(llm: nn.Module, n_routes: int, r: int, alpha: float,
                    target_modules: Sequence[str] | str | None = DEFAULT_LORA_TARGETS, *,
                    routes: Sequence[int] | None = None, freeze_base: bool = True, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> list[str]:
    """Add trainable per-route LoRA factors (scale ``alpha / r``) to every target linear.

    Routes ``0 .. n_routes-1`` (or ``routes``) each get ``A`` [r, in] (Kaiming-uniform, a=√5, as
    peft) and ``B`` [out, r] = 0, so the model's output is unchanged at initialisation. With
    ``freeze_base`` every other parameter of ``llm`` is frozen. Returns the routed module names.
    """
    if r < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {r}")
    ids, names = _new_route_targets(llm, n_routes, target_modules, routes, freeze_base)
    g = torch.Generator().manual_seed(seed)
    for name in names:
        rl = routed_linear(llm, name)
        for k in ids:
            A = torch.empty(r, rl.in_features, dtype=dtype)
            bound = 1.0 / math.sqrt(rl.in_features)  # kaiming_uniform_(a=sqrt(5)) bound = 1/sqrt(fan_in)
            A.uniform_(-bound, bound, generator=g)
            B = torch.zeros(rl.out_features, r, dtype=dtype)
            rl.set_route(k, LowRank(A, B, alpha / r), trainable=True, dtype=dtype)
    return names


def add_dense_routes(llm: nn.Module, n_routes: int, target_modules: Sequence[str] | str | None = DEFAULT_LORA_TARGETS,
                     *, routes: Sequence[int] | None = None, freeze_base: bool = True) -> list[str]:
    """Trainable full-weight deltas per route (zero-initialised) - DAMC's full-weight option."""
    ids, names = _new_route_targets(llm, n_routes, target_modules, routes, freeze_base)
    for name in names:
        rl = routed_linear(llm, name)
        for k in ids:
            rl.set_route(k, Dense(torch.zeros(rl.out_features, rl.in_features)), trainable=True)
    return names


def route_parameters(llm: nn.Module, route: int, *, trainable_only: bool = True) -> list[nn.Parameter]:
    """The parameters of ``route`` in every routed module (trainable ones only by default)."""
    out = []
    for m in routed_modules(llm).values():
        r = m.routes[str(route)] if str(route) in m.routes else None
        if r is None:
            continue
        out.extend(p for p in r.parameters() if p.requires_grad or not trainable_only)
    return out


def set_route_coefficients(llm: nn.Module, route: int, coefs: Mapping[int | str | None, float]) -> int:
    """Rescale, in place, the components of ``route`` by tag: a component added with scale ``s``
    (or alpha) and tag ``t`` now uses ``s * coefs[t]``. Components whose tag is not in ``coefs`` are
    left as they are. Returns how many components were changed (cheap: no weights are rebuilt -
    used by DAMC's λ search and MMER's α search)."""
    n = 0
    for m in routed_modules(llm).values():
        r = m.routes[str(route)] if str(route) in m.routes else None
        if r is None:
            continue
        for p in r.parts:
            if p.tag in coefs:
                p.coef = float(coefs[p.tag])
                n += 1
    return n


def route_components(llm: nn.Module, route: int) -> dict[str, list[nn.Module]]:
    """``{module name: [component, ...]}`` of ``route`` (internal objects; for in-place updates)."""
    out = {}
    for name, m in routed_modules(llm).items():
        if str(route) in m.routes:
            out[name] = list(m.routes[str(route)].parts)
    return out


def remove_routes(llm: nn.Module) -> nn.Module:
    """Replace every :class:`RoutedLinear` by a plain ``nn.Linear`` holding the base weight."""
    for name, rl in list(routed_modules(llm).items()):
        lin = nn.Linear(rl.in_features, rl.out_features, bias=rl.bias is not None, device="meta")
        lin.weight = rl.weight
        if rl.bias is not None:
            lin.bias = rl.bias
        parent, attr = _get_parent(llm, name)
        setattr(parent, attr, lin)
    return llm


@torch.no_grad()
def materialize_route(llm: nn.Module, route: int) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W0 + Δ_route}`` for every routed module (float32) - for checks and
    to export one route as a plain model."""
    return {f"{n}.weight": m.route_weight(route) for n, m in routed_modules(llm).items()}


def storage_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module``, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


# ------------------------------------------------------------------------------------------------
# peft-format export / import of one route's LoRA factors
@torch.no_grad()
def save_route_adapter(llm: nn.Module, route: int, folder: str | Path, *, extra_config: Mapping | None = None) -> Path:
    """Write ``route``'s single LoRA component per module as a peft adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``, keys
    ``base_model.model.<module>.lora_A.weight``). Readable by :class:`workbench.io.LoraAdapter` and
    by ``peft.PeftModel.from_pretrained``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    ranks, scales, targets = set(), set(), set()
    for name, m in routed_modules(llm).items():
        if str(route) not in m.routes:
            continue
        parts = list(m.routes[str(route)].parts)
        if len(parts) != 1 or not isinstance(parts[0], _LowRankC):
            raise ConfigError(f"route {route} of {name!r} is not a single LoRA component; cannot save as peft")
        p = parts[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = p.A.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = p.B.detach().float().cpu().contiguous()
        ranks.add(p.A.shape[0])
        scales.add(round(p.scale, 9))
        targets.add(name.split(".")[-1])
    if not tensors:
        raise ConfigError(f"no routed module has route {route}")
    if len(ranks) != 1 or len(scales) != 1:
        raise ConfigError(f"route {route}: ranks {sorted(ranks)} / scales {sorted(scales)} differ between modules")
    r, s = ranks.pop(), scales.pop()
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(r), "lora_alpha": float(s * r),
           "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
           "use_rslora": False, "use_dora": False, "init_lora_weights": True, "base_model_name_or_path": None,
           "modules_to_save": None, "inference_mode": True, **dict(extra_config or {})}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors.tmp"), metadata={"format": "pt"})
    (folder / "adapter_model.safetensors.tmp").replace(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def load_route_adapter(folder: str | Path, *, coefficient: float = 1.0) -> dict[str, LowRank]:
    """``{module name: LowRank(A, B, coefficient · s)}`` of a peft adapter folder (linear targets)."""
    from .io import LoraAdapter

    a = LoraAdapter(folder)
    if a.replaced():
        raise CheckpointError("adapter replaces whole modules (modules_to_save); only LoRA factors can be routed",
                              file=a.file, tensor=a.replaced()[0])
    out = {}
    for name in a.targets():
        if a._factors[name]["kind"] != "linear" or a.fan_in_fan_out:
            raise CheckpointError("only linear (non fan_in_fan_out) LoRA factors can be routed", file=a.file,
                                  tensor=name)
        A, B, s = a.factors(name)
        out[_module_name(name)] = LowRank(A, B, coefficient * s)
    return out


__all__ = [
    "Dense", "LowRank", "Masked", "RoutedLinear", "RoutedModule", "add_dense_routes", "add_lora_routes",
    "apply_routes", "linear_names", "load_route_adapter", "materialize_route", "remove_routes",
    "route_components", "route_parameters", "routed_linear", "routed_modules", "save_route_adapter",
    "set_masked_cache", "set_route_coefficients", "storage_bytes", "token_routes",
]
