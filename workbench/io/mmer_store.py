"""The MMER store: one folder format for MMER's masks (and τ*), its one writer and its readers.

A store folder holds

- ``masks.safetensors``: keys ``<tensor>::<extra>``; MMER's masks are ``<tensor>::mask_<i>`` (expert
  ``i``), boolean masks bit-packed with :func:`workbench.io.packing.pack_mask` (uint8, MSB first); the
  metadata of each key is ``{"shape", "dtype", "packed"}`` (JSON);
- ``mmer.json``: what produced it (``params``; ``n_experts`` and the densities);
- ``tau_star.safetensors`` (optional): τ* per tensor. Without it, τ* is the merged weights minus
  the base (a merge output: the engine writes its store to ``<output>/mmer/``, :data:`MMER_DIR`).

Writers: the engine collects its method's extras tensor by tensor (:class:`ExtrasRecorder`) and
saves them through its checkpoint writer; :func:`write_parts` saves an :class:`MMERParts`.
Readers: :class:`MMERStore` (keys, shapes, packed masks one at a time), :func:`read_extras` (every
entry, unpacked) and :func:`read_parts` (an :class:`MMERParts`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError
from .packing import pack_mask, unpack_mask
from .reader import CheckpointReader

#: the store's folder inside a merge output.
MMER_DIR = "mmer"
MASKS_FILE = "masks.safetensors"
TAU_STAR_FILE = "tau_star.safetensors"
INFO_FILE = "mmer.json"
_MASK_EXTRA = re.compile(r"mask_(\d+)")


def mask_key(tensor: str, i: int) -> str:
    """The key of expert ``i``'s mask on ``tensor``: ``<tensor>::mask_<i>``."""
    return f"{tensor}::mask_{i}"


def parse_mask_key(key: str) -> tuple[str, int] | None:
    """``(tensor, expert index)`` of a mask key, ``None`` for another extra."""
    name, _, extra = key.partition("::")
    m = _MASK_EXTRA.fullmatch(extra)
    return (name, int(m.group(1))) if m is not None else None


def _entry_metadata(shape, dtype: str, packed: bool) -> str:
    return json.dumps({"shape": list(shape), "dtype": dtype, "packed": packed})


@dataclass
class MMERParts:
    """τ* per tensor and one packed mask per expert per tensor (what MMER stores).

    ``tau_star[name]``: τ* (``dtype``); ``masks[name][i]``: packed uint8 mask of expert ``i``
    (:func:`workbench.io.packing.pack_mask`, MSB first); ``shapes[name]``.
    """

    tau_star: dict[str, torch.Tensor]
    masks: dict[str, list[torch.Tensor]]
    n_experts: int
    params: dict = field(default_factory=dict)

    def mask(self, name: str, i: int) -> torch.Tensor:
        return unpack_mask(self.masks[name][i], self.tau_star[name].shape)

    def density(self) -> list[float]:
        """Per expert, the fraction of τ*'s non-zero entries its mask keeps (over all masked tensors;
        entries where τ* = 0 do not count - the mask is irrelevant there)."""
        nz = {n: self.tau_star[n] != 0 for n in self.masks}
        tot = sum(int(v.sum()) for v in nz.values())
        return [sum(int((self.mask(n, i) & nz[n]).sum()) for n in self.masks) / max(tot, 1)
                for i in range(self.n_experts)]


# ---------------------------------------------------------------------------------------- writing
class ExtrasRecorder:
    """The extras a merge method returns (MMER's masks), collected tensor by tensor: boolean
    ones bit-packed (their densities tallied), numeric ones kept as they are."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.densities: dict[str, dict[str, float]] = {}
        self._kept: dict[str, list[int]] = {}

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def add(self, name: str, key: str, value: torch.Tensor) -> None:
        """Record extra ``key`` of tensor ``name`` (stored as ``<name>::<key>``)."""
        full = f"{name}::{key}"
        if value.dtype == torch.bool:
            self.tensors[full] = pack_mask(value).cpu()
            kept = int(value.sum())
            self.densities.setdefault(key, {})[name] = kept / max(value.numel(), 1)
            t = self._kept.setdefault(key, [0, 0])
            t[0] += kept
            t[1] += value.numel()
        else:
            self.tensors[full] = value.detach().cpu().contiguous()
        self.metadata[full] = _entry_metadata(value.shape, str(value.dtype).replace("torch.", ""),
                                              value.dtype == torch.bool)

    def save(self, writer: Any, method: str, params: Mapping[str, Any]) -> None:
        """Save the store into a merge output through its :class:`~workbench.io.CheckpointWriter`
        (``<output>/mmer/``, written atomically with the merged checkpoint)."""
        overall = {k: v[0] / max(v[1], 1) for k, v in sorted(self._kept.items())}
        writer.save_extra(f"{MMER_DIR}/{MASKS_FILE}", self.tensors, metadata=self.metadata)
        writer.save_json(f"{MMER_DIR}/{INFO_FILE}", {
            "method": method, "params": dict(params), "density": overall, "density_per_tensor": self.densities,
            "format": "keys '<tensor>::<extra>'; bool masks packed with workbench.io.packing.pack_mask (MSB first), "
                      "shape in metadata"})


def write_parts(parts: MMERParts, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``parts`` as a store folder: ``tau_star.safetensors`` (τ*, in ``dtype`` or as held),
    ``masks.safetensors`` and ``mmer.json`` (``n_experts``, ``params``, ``density``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ts = {n: (t.to(dtype) if dtype else t).contiguous() for n, t in parts.tau_star.items()}
    save_file(ts, str(folder / TAU_STAR_FILE), metadata={"format": "pt"})
    masks, meta = {}, {}
    for n, ms in parts.masks.items():
        for i, m in enumerate(ms):
            k = mask_key(n, i)
            masks[k] = m.contiguous()
            meta[k] = _entry_metadata(parts.tau_star[n].shape, "bool", True)
    save_file(masks, str(folder / MASKS_FILE), metadata=meta)
    (folder / INFO_FILE).write_text(json.dumps({"n_experts": parts.n_experts, "params": parts.params,
                                                "density": parts.density()}, indent=2, default=str))
    return folder


# ---------------------------------------------------------------------------------------- reading
class MMERStore:
    """A store folder, opened lazily: its keys, each entry's metadata, ``mmer.json``.

    Raises:
        CheckpointError: no ``masks.safetensors``, or an unreadable ``mmer.json``.
    """

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.masks_file = self.folder / MASKS_FILE
        if not self.masks_file.is_file():
            raise CheckpointError("no MMER masks (run the engine with an MMER method)", file=self.masks_file)
        info_file = self.folder / INFO_FILE
        try:
            self.info: dict = json.loads(info_file.read_text()) if info_file.is_file() else {}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable mmer.json: {e}", file=info_file) from e
        with safe_open(str(self.masks_file), framework="pt") as f:
            self.keys: list[str] = list(f.keys())
            self.metadata: dict[str, str] = f.metadata() or {}
        self.tau_star_file: Path | None = self.folder / TAU_STAR_FILE
        if not self.tau_star_file.is_file():
            self.tau_star_file = None

    def mask_groups(self) -> dict[str, dict[int, str]]:
        """``{tensor: {expert index: key}}`` over the mask keys, in file order."""
        groups: dict[str, dict[int, str]] = {}
        for k in self.keys:
            parsed = parse_mask_key(k)
            if parsed is not None:
                groups.setdefault(parsed[0], {})[parsed[1]] = k
        return groups

    def entry(self, key: str) -> dict | None:
        """The metadata of ``key`` (``{"shape", "dtype", "packed"}``), ``None`` when not recorded."""
        if key not in self.metadata:
            return None
        try:
            return json.loads(self.metadata[key])
        except ValueError as e:
            raise CheckpointError(f"bad mask metadata: {e}", file=self.masks_file, tensor=key) from e

    def open(self):
        """The masks file opened for reading (``with store.open() as f: f.get_tensor(key)``)."""
        from safetensors import safe_open

        return safe_open(str(self.masks_file), framework="pt")


def read_extras(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every entry of a store's ``masks.safetensors``, boolean masks unpacked, keyed ``<tensor>::<extra>``."""
    store = MMERStore(folder)
    out = {}
    with store.open() as f:
        for k in f.keys():
            info = store.entry(k)
            t = f.get_tensor(k)
            out[k] = unpack_mask(t, info["shape"]) if info["packed"] else t
    return out


def read_parts(folder: str | Path, *, base: Mapping[str, torch.Tensor] | None = None,
               merged: str | Path | None = None, n_experts: int | None = None,
               dtype: torch.dtype = torch.float32) -> MMERParts:
    """A store folder as :class:`MMERParts`.

    τ* is read from ``tau_star.safetensors`` when the folder has it; else (a merge output's
    ``mmer/``) it is ``merged - base`` per masked tensor, in ``dtype``: ``base`` maps tensor names to
    the base weights, ``merged`` is the merged checkpoint (default: the folder's parent).
    ``n_experts``: default ``mmer.json``'s, else one more than the largest mask index.

    Raises:
        CheckpointError: missing masks, a mask index missing for a tensor, a mask on a tensor the
            base does not have, or neither ``tau_star.safetensors`` nor a ``base``.
    """
    store = MMERStore(folder)
    from_merge = store.tau_star_file is None
    if from_merge and base is None:
        raise CheckpointError("no tau_star.safetensors in the MMER store: give the base to read τ* as merged - base",
                              file=store.folder)
    raw: dict[str, dict[int, torch.Tensor]] = {}
    with store.open() as f:
        for name, idx in store.mask_groups().items():
            if from_merge and name not in base:
                raise CheckpointError("mask for a tensor the base does not have", file=store.masks_file,
                                      tensor=next(iter(idx.values())))
            for i, k in idx.items():
                t = f.get_tensor(k)
                if not (store.entry(k) or {}).get("packed", t.dtype == torch.uint8):
                    t = pack_mask(t.bool())
                raw.setdefault(name, {})[i] = t
    n = n_experts if n_experts is not None else store.info.get("n_experts")
    if n is None:
        n = 1 + max(i for d in raw.values() for i in d)
    masks = {}
    for name, d in raw.items():
        if sorted(d) != list(range(n)):
            raise CheckpointError(f"expected masks 0..{n - 1}, found {sorted(d)}", file=store.masks_file, tensor=name)
        masks[name] = [d[i] for i in range(n)]
    params = store.info.get("params", {})
    if not from_merge:
        from safetensors.torch import load_file

        return MMERParts(load_file(str(store.tau_star_file)), masks, n, params)
    merged_path = Path(merged) if merged is not None else store.folder.parent
    reader = CheckpointReader(merged_path)
    tau_star = {name: (reader.get(name).float() - base[name].detach().float()).to(dtype) for name in raw}
    return MMERParts(tau_star, masks, n, {"from": str(merged_path), **params})
