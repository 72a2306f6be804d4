"""peft LoRA adapter folders read as per-weight deltas ``s * B @ A`` or as raw factors.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). peft stores ``base_model.model.<module>.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]); the weight they change is ``<module>.weight`` ([out, in]).
Embedding adapters (``lora_embedding_A`` [r, num], ``lora_embedding_B`` [dim, r]) change
``<module>.weight`` ([num, dim]) by ``s * (B @ A)^T``.

Scale: ``s = alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora``; ``r`` is the stored rank of
that module (so ``rank_pattern`` is honoured automatically) and ``alpha`` is ``lora_alpha`` unless
``alpha_pattern`` names the module. ``fan_in_fan_out`` adapters transpose the delta.
Tensors saved through ``modules_to_save`` (and ``base_layer`` weights saved with
``save_embedding_layers``) are full replacement weights: :meth:`LoraAdapter.replaced`; where a
weight has both, the delta applies on top of the replacement.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .reader import CheckpointReader

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
ADAPTER_CONFIG = "adapter_config.json"


def is_lora_adapter(path: str | Path) -> bool:
    """``True`` when ``path`` is a folder holding a peft adapter (``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def peft_key_to_base(key: str) -> tuple[str, str] | None:
    """Map a peft LoRA key to ``(base weight name, factor kind)``; ``None`` for a non-LoRA key.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    ``("model.layers.0.self_attn.q_proj.weight", "lora_A")``.
    """
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    return f"{m.group('mod')}.weight", m.group("kind")


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, *, transpose: bool = False,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The weight change of a LoRA adapter, ``scale * (B @ A)`` in float32 (the one place it is computed).

    Args:
        A: ``[r, in_features]`` (peft's ``lora_A.weight``).
        B: ``[out_features, r]`` (peft's ``lora_B.weight``).
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        transpose: return ``(s * B @ A)^T`` (a view: embedding adapters, ``fan_in_fan_out``).
        device: where to compute (default: ``B``'s device).

    Returns:
        ``[out_features, in_features]`` float32 (transposed with ``transpose``).

    Raises:
        ValueError: the inner dimensions (the rank) disagree or a factor is not 2-D.
    """
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"LoRA factors must be 2-D, got A {list(A.shape)} and B {list(B.shape)}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"LoRA rank mismatch: B is {list(B.shape)}, A is {list(A.shape)}")
    device = B.device if device is None else device
    d = scale * (B.to(device=device, dtype=torch.float32) @ A.to(device=device, dtype=torch.float32))
    return d.T if transpose else d


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup: a key matches when it matches a suffix of ``module``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A peft LoRA adapter folder, read lazily.

    Args:
        path: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        mmap: as for :class:`~workbench.io.CheckpointReader`.
    """

    def __init__(self, path: str | Path, *, mmap: bool = True):
        self.path = Path(path)
        cfg_file = self.path / ADAPTER_CONFIG
        try:
            self.adapter_config: dict = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable adapter_config.json: {e}", file=cfg_file) from e
        if str(self.adapter_config.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(f"unsupported peft_type {self.adapter_config.get('peft_type')!r} (only LORA)",
                                  file=cfg_file)
        if self.adapter_config.get("use_dora"):
            raise CheckpointError("DoRA adapters are not supported (the delta is not s * B @ A)", file=cfg_file)
        weights = self.path / "adapter_model.safetensors"
        if not weights.is_file():
            weights = self.path / "adapter_model.bin"
        if not weights.is_file():
            raise CheckpointError("adapter folder without adapter_model.safetensors / adapter_model.bin", file=self.path)
        self.file = weights
        self.reader = CheckpointReader(weights, mmap=mmap)
        self.alpha = float(self.adapter_config.get("lora_alpha", self.adapter_config.get("r", 8)))
        self.use_rslora = bool(self.adapter_config.get("use_rslora", False))
        self.fan_in_fan_out = bool(self.adapter_config.get("fan_in_fan_out", False))
        self._factors: dict[str, dict[str, str]] = {}
        self._replaced: dict[str, str] = {}
        for key in self.reader.keys():
            mapped = peft_key_to_base(key)
            if mapped is None:
                if "lora_magnitude_vector" in key:
                    raise CheckpointError("DoRA magnitude vectors are not supported", file=weights, tensor=key)
                if re.search(r"\.lora_B\.bias$", key):
                    raise CheckpointError("LoRA bias terms are not supported", file=weights, tensor=key)
                base = re.sub(r"^base_model\.model\.", "", key)
                base = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", base)
                base = re.sub(r"\.base_layer\.", ".", base)  # save_embedding_layers: the layer's own base
                self._replaced[base] = key
                continue
            name, kind = mapped
            self._factors.setdefault(name, {})["A" if kind.endswith("A") else "B"] = key
            self._factors[name]["kind"] = "embedding" if "embedding" in kind else "linear"
        for name, f in self._factors.items():
            if "A" not in f or "B" not in f:
                raise CheckpointError("LoRA factor without its pair (A and B both needed)", file=weights,
                                      tensor=f.get("A") or f.get("B"))
            a, b = self.reader.info(f["A"]), self.reader.info(f["B"])
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"LoRA factors of incompatible shapes A{list(a.shape)} B{list(b.shape)} "
                                      "(only 2-D linear/embedding adapters are supported)", file=weights, tensor=f["A"])

    def targets(self) -> list[str]:
        """Base-model weight names changed by a LoRA product, sorted."""
        return sorted(self._factors)

    def replaced(self) -> list[str]:
        """Base-model weight names replaced outright (``modules_to_save``), sorted."""
        return sorted(self._replaced)

    def get_replaced(self, name: str) -> torch.Tensor:
        """The full replacement weight for ``name`` (see :meth:`replaced`)."""
        return self.reader.get(self._replaced[name])

    def rank(self, name: str) -> int:
        """Stored rank ``r`` of the adapter on ``name``."""
        return int(self.reader.info(self._key(name, "A")).shape[0])

    def scale(self, name: str) -> float:
        """``s = alpha / r`` (``alpha / sqrt(r)`` with rslora) for ``name``."""
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        alpha = float(_pattern_value(self.adapter_config.get("alpha_pattern") or {}, module, self.alpha))
        r = self.rank(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def delta_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the delta on ``name`` (= the base weight's), without reading data."""
        a = self.reader.info(self._key(name, "A")).shape
        b = self.reader.info(self._key(name, "B")).shape
        shape = (b[0], a[1])
        if self._factors[name]["kind"] == "embedding" or self.fan_in_fan_out:
            shape = shape[::-1]
        return tuple(shape)

    def _key(self, name: str, which: str) -> str:
        try:
            return self._factors[name][which]
        except KeyError:
            raise CheckpointError("no LoRA adapter on this weight", file=self.file, tensor=name) from None

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Raw ``(A, B, s)`` for base weight ``name`` (stored dtypes)."""
        return self.reader.get(self._key(name, "A")), self.reader.get(self._key(name, "B")), self.scale(name)

    def transposed(self, name: str) -> bool:
        """Whether the delta on ``name`` is ``(B @ A)^T`` (an embedding adapter, or ``fan_in_fan_out``)."""
        return self._factors[name]["kind"] == "embedding" or self.fan_in_fan_out

    def delta(self, name: str, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """``s * B @ A`` in float32 on ``device``, shaped like the base weight ``name``."""
        a, b, s = self.factors(name)
        return lora_delta(a, b, s, transpose=self.transposed(name), device=device).contiguous()

    def deltas(self, *, device: torch.device | str = "cpu"):
        """Iterate ``(name, delta)`` over :meth:`targets` one at a time."""
        for name in self.targets():
            yield name, self.delta(name, device=device)

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self._factors)} targets, alpha={self.alpha}, rslora={self.use_rslora})"
