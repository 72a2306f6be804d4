"""The registry of merge methods: :class:`MethodSpec`, :data:`METHODS`, :func:`get_method` and the
:func:`merge_method` decorator with which each family file registers its methods.

Every method is a pure function over ONE tensor::

    fn(base, experts, *, name="", generator=None, **params) -> Tensor | MergeOutput

``base`` is ``theta_0`` and ``experts`` the ``theta_i`` of one tensor, float32 on the compute
device; the result is the merged weight ``theta = theta_0 + scale * tau_m`` (float32, same device),
``tau_i = theta_i - theta_0``. Inputs are never modified. The formulas follow
``shared/reference/methods.md`` sections 3 and 4, and for WUDI / OptMerge the authors' released
code where it says more (docs/METHODS.md); where the public record is silent the choice is a
named parameter and the docstring says **unverified**.

The registry is filled when :mod:`workbench.merging` imports its family files (linear, ties_dare,
svd, quadratic, mmer: that order is the order of :data:`METHODS`). The two optimisation methods
(``wudi``, ``optmerge``) also have a ``batched_fn`` that optimises ``B`` same-shape 2-D tensors at
once (``bmm``) for the GPU path of :mod:`workbench.engine`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import ConfigError

Tensor = torch.Tensor


@dataclass
class MergeOutput:
    """A merged weight with side outputs (e.g. MMER's masks, keyed ``mask_<i>``)."""

    merged: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    Attributes:
        name: registry key.
        fn: the per-tensor function.
        defaults: every parameter the method accepts, with its default.
        doc: one paragraph: the formula and its source.
        batched_fn: ``fn(base[B, m, n], experts[N, B, m, n] | list of N [B, m, n], *, names=None,
            generators=None, **params) -> Tensor[B, m, n]`` or ``None``.
        needs_generator: the method draws random numbers (seeded per tensor by the engine).
        choices: allowed values of string parameters (checked by :meth:`check_params`).
        reports: ``fn`` and ``batched_fn`` take ``report=<list>`` and append one dict of facts
            per merged 2-D tensor to it, for the merge report (WUDI / OptMerge: objective start /
            end and convergence, see :func:`workbench.merging.quadratic.objective_report`).
        pretty_name: the display name of tables and figures (the paper's row label).
        reference: the citation: authors, venue, title, arXiv / URL (and the official code, where
            the implementation follows it).
    """

    name: str
    fn: Callable[..., Any]
    defaults: dict
    doc: str
    batched_fn: Callable[..., Any] | None = None
    needs_generator: bool = False
    choices: dict = field(default_factory=dict)
    reports: bool = False
    pretty_name: str = ""
    reference: str = ""

    def check_params(self, params: Mapping[str, Any] | None) -> dict:
        """``defaults`` updated with ``params``.

        Raises:
            ConfigError: an unknown parameter (the valid ones are listed) or a value outside
                :attr:`choices`.
        """
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {self.name!r}; "
                              f"valid: {', '.join(sorted(self.defaults)) or '(none)'}")
        out = {**self.defaults, **params}
        for key, allowed in self.choices.items():
            if out.get(key) not in allowed:
                raise ConfigError(f"parameter {key!r} of method {self.name!r} must be one of "
                                  f"{', '.join(map(repr, allowed))}, got {out.get(key)!r}")
        return out


#: Every registered merge method by name, in registration order (:mod:`workbench.merging` fills it).
METHODS: dict[str, MethodSpec] = {}


def merge_method(name: str, pretty_name: str, reference: str, *, doc: str, batched_fn: Callable | None = None,
                 needs_generator: bool = False, choices: Mapping[str, tuple] | None = None,
                 reports: bool = False) -> Callable[[Callable], Callable]:
    """Register the decorated per-tensor function in :data:`METHODS` as ``name`` (the function is
    returned unchanged). Its parameters are its keyword-only arguments other than ``name``,
    ``generator`` and ``report``, with their defaults.

    Raises:
        ConfigError: ``name`` is registered already.
    """
    def register(fn: Callable) -> Callable:
        if name in METHODS:
            raise ConfigError(f"merge method {name!r} is registered twice")
        sig = inspect.signature(fn)
        defaults = {p.name: p.default for p in sig.parameters.values()
                    if p.kind == p.KEYWORD_ONLY and p.name not in ("name", "generator", "report")}
        METHODS[name] = MethodSpec(name=name, fn=fn, defaults=defaults, doc=doc, batched_fn=batched_fn,
                                   needs_generator=needs_generator, choices=dict(choices or {}), reports=reports,
                                   pretty_name=pretty_name, reference=reference)
        return fn
    return register


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name``.

    Raises:
        ConfigError: unknown name (the known ones are listed).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
