"""Which tensors a merge changes and which it keeps from the base.

The defaults follow the MLLM merging benchmark (Wei et al., ICLR 2026): the vision tower and
other modality encoders, the projector, ``embed_tokens``, ``lm_head``, every norm and every
bias are copied from the base model; everything else (the LLM's linear weights) is merged.

Precedence, strongest first:

1. ``exclude`` regexes (config or method): a matching tensor is kept from the base;
2. ``include`` regexes: a matching tensor is merged, even if a default would keep it;
3. the keep patterns (``keep``: a model family's list from :mod:`workbench.families`, by default
   :data:`DEFAULT_KEEP`), unless ``keep_defaults=False``;
4. everything else is merged.

Patterns are Python regular expressions applied with :func:`re.search` to the full tensor name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import ConfigError

#: Tensors kept from the base by default (regexes, ``re.search``).
DEFAULT_KEEP: tuple[str, ...] = (
    r"(^|\.)vision_tower(\.|$)",
    r"(^|\.)vision_model(\.|$)",
    r"(^|\.)visual(\.|$)",
    r"(^|\.)(audio_tower|audio_encoder|image_encoder|video_tower|point_encoder)(\.|$)",
    r"(^|\.)encoders?(\.|$)",
    r"(^|\.)multi_modal_projector(\.|$)",
    r"(^|\.)mm_projector(\.|$)",
    r"(^|\.)embed_tokens(\.|$)",
    r"(^|\.)lm_head(\.|$)",
    r"norm[^.]*\.(weight|bias)$",
    r"\.bias$",
)


def compile_patterns(patterns: Iterable[str], *, what: str = "pattern") -> tuple[re.Pattern, ...]:
    """Compile regexes, raising :class:`ConfigError` that names the bad ``what`` on a syntax error."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"invalid {what} regex {p!r}: {e}") from e
    return tuple(out)


@dataclass(frozen=True)
class NameFilter:
    """Decide per tensor name whether it is merged (``True``) or kept from the base (``False``).

    Args:
        include: regexes of tensors to merge even where a default would keep them.
        exclude: regexes of tensors always kept from the base (wins over ``include``).
        keep_defaults: apply the keep patterns; ``False`` merges every tensor not excluded.
        keep: the keep patterns (a family's :attr:`~workbench.families.Family.keep_patterns`);
            ``None``: :data:`DEFAULT_KEEP`.
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    keep_defaults: bool = True
    keep: Sequence[str] | None = None
    _inc: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)
    _exc: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)
    _def: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "_inc", compile_patterns(self.include, what="include"))
        object.__setattr__(self, "_exc", compile_patterns(self.exclude, what="exclude"))
        keep = DEFAULT_KEEP if self.keep is None else tuple(self.keep)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "_def", compile_patterns(keep if self.keep_defaults else (), what="keep"))

    def merged(self, name: str) -> bool:
        """``True`` when tensor ``name`` is merged, ``False`` when it is kept from the base."""
        if any(p.search(name) for p in self._exc):
            return False
        if any(p.search(name) for p in self._inc):
            return True
        return not any(p.search(name) for p in self._def)

    __call__ = merged

    def reason(self, name: str) -> str:
        """A short explanation of the decision for ``name`` (for logs and the CLI)."""
        for p in self._exc:
            if p.search(name):
                return f"kept: exclude {p.pattern!r}"
        for p in self._inc:
            if p.search(name):
                return f"merged: include {p.pattern!r}"
        for p in self._def:
            if p.search(name):
                return f"kept: default {p.pattern!r}"
        return "merged"

    def split(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """Partition ``names`` into ``(merged, kept)``, each in the input order."""
        merged, kept = [], []
        for n in names:
            (merged if self.merged(n) else kept).append(n)
        return merged, kept

    def with_overrides(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> "NameFilter":
        """A new filter with extra ``include``/``exclude`` patterns (e.g. a method's own)."""
        return NameFilter(tuple(self.include) + tuple(include), tuple(self.exclude) + tuple(exclude),
                          self.keep_defaults, self.keep)
