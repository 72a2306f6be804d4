"""One way to open an expert: :func:`open_expert` ``(path) -> Expert``, whatever kind it is.

Kinds (``Expert.kind``):

- ``"full"``: a checkpoint (HF folder, sharded or not, or one ``.safetensors`` / ``.bin`` file):
  ``tau = theta_i - theta_0``;
- ``"lora"``: a peft LoRA adapter folder on the base: ``tau = s * B @ A`` on its targets
  (:func:`workbench.io.lora.lora_delta`), replacement weights (``modules_to_save``) elsewhere;
- ``"damc"``: a DAMC expert (text and modality adapters); ``damc_set`` picks the adapter whose
  product is the task vector, the other one is :attr:`Expert.other`;
- ``"mllm"``: the language model of a multimodal folder, by its causal-LM names, read through a
  ``checkpoint`` with ``has_lm_tensor`` / ``lm_tensor`` (:class:`workbench.families.FamilyCheckpoint`;
  the composition, which knows the families, builds it: ``Expert("mllm", path, checkpoint=...)``);
- ``"frozen"``: a projector-only expert (or no expert: ``path=None``): its LLM is the base, ``tau = 0``.

Every read is lazy (one tensor at a time, memory-mapped by default). The three users read an
expert in their own form, each one method here:

- :meth:`Expert.read` (the merge engine, from folders or in memory): the stored value - a full
  tensor, a :class:`LoraPiece` (factors applied on the compute device) or ``None`` (equal to the base);
- :meth:`Expert.raw` (interference analysis): ``(weight or delta, other-set delta, is_weight)``;
- :meth:`Expert.tau` (composition's DAMC deltas and MMER re-masking): ``tau`` in float32 next to a
  given base tensor.

A zoo expert folder (``expert.json`` + ``llm/`` / ``adapter/`` / ``adapter_text/`` +
``adapter_modality/``, as :mod:`workbench.world.zoo` writes it) is resolved by
:func:`expert_folder_layout`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .lora import LoraAdapter, is_lora_adapter, lora_delta
from .reader import CheckpointReader
from .validate import check_full_expert, check_lora_base_name, check_lora_expert

KINDS = ("full", "lora", "damc", "mllm", "frozen")


@dataclass
class LoraPiece:
    """LoRA factors of one expert on one tensor, applied on the compute device."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool
    on: torch.Tensor | None = None  # replacement of the base weight the delta applies to, if any

    def delta(self, device: torch.device) -> torch.Tensor:
        return lora_delta(self.a, self.b, self.scale, transpose=self.transpose, device=device)


class Expert:
    """One expert's weights relative to the base (see the module docstring for the kinds).

    Attributes:
        kind: one of :data:`KINDS`.
        path: what was opened.
        name: a label (default: the folder's or file's name).
        reader: the :class:`CheckpointReader` of a full expert (else ``None``).
        adapter: the :class:`LoraAdapter` of a LoRA expert, or the chosen set of a DAMC expert.
        other: a DAMC expert's other adapter (``None`` otherwise).
        checkpoint: a multimodal folder's reader (``has_lm_tensor`` / ``lm_tensor``), kind ``"mllm"``.
    """

    def __init__(self, kind: str, path: Path | None, *, name: str | None = None, reader: CheckpointReader | None = None,
                 adapter: LoraAdapter | None = None, other: LoraAdapter | None = None, checkpoint: Any = None):
        self.kind, self.path = kind, path
        self.name = name if name is not None else (path.name if path is not None else kind)
        self.reader, self.adapter, self.other, self.checkpoint = reader, adapter, other, checkpoint
        self._targets = set(adapter.targets()) if adapter is not None else set()
        self._replaced = set(adapter.replaced()) if adapter is not None else set()
        self._other_targets = set(other.targets()) if other is not None else set()

    def __repr__(self) -> str:
        return f"Expert({self.kind!r}, {str(self.path)!r})"

    # ------------------------------------------------------------------ what it changes
    def targets(self) -> set[str] | None:
        """Names this expert changes (``None``: every tensor of the checkpoint)."""
        if self.kind in ("full", "mllm"):
            return None
        if self.kind == "frozen":
            return set()
        return self._targets | self._replaced | self._other_targets

    def file_of(self, name: str) -> Path | None:
        """The file that holds ``name`` for this expert (an adapter's weight file; the expert's
        path where it does not touch ``name``)."""
        if self.reader is not None and name in self.reader:
            return self.reader.file_of(name)
        if self.adapter is not None:
            return self.adapter.file
        return self.path

    def validate(self, base: CheckpointReader, *, allow_missing: bool = False, refuse_foreign: bool = False) -> None:
        """The checks of :mod:`workbench.io.validate`: a full expert's names and shapes
        (``allow_missing``: it may lack base tensors), each adapter's targets and shapes and the
        base model it names (``refuse_foreign``: a different base is an error, not a warning)."""
        if self.reader is not None:
            check_full_expert(self.reader, base, allow_missing=allow_missing)
        for a in (self.adapter, self.other):
            if a is not None:
                check_lora_expert(a, base)
                check_lora_base_name(a, base, strict=refuse_foreign)

    def close(self) -> None:
        """Release the open files."""
        for r in (self.reader, self.adapter and self.adapter.reader, self.other and self.other.reader):
            if r is not None:
                r.close()

    # ------------------------------------------------------------------ reads
    def read(self, name: str) -> torch.Tensor | LoraPiece | None:
        """The stored value of ``name`` (the merge engine's form): a full expert's tensor (a
        multimodal folder's by its causal-LM name), a LoRA expert's :class:`LoraPiece` (with the
        replaced weight it applies on, if any) or its replacement weight, ``None`` where the expert
        equals the base (a frozen expert: everywhere). A full expert must hold ``name``."""
        if self.kind in ("full", "mllm"):
            has = self.reader.__contains__ if self.kind == "full" else self.checkpoint.has_lm_tensor
            if not has(name):
                raise CheckpointError("expert lacks a tensor of the base LLM", file=self.path, tensor=name)
            return self.reader.get(name) if self.kind == "full" else self.checkpoint.lm_tensor(name)
        if self.kind == "frozen":
            return None
        if self.adapter is None:
            raise ConfigError(f"read() needs a full, LoRA or frozen expert, not {self.kind!r}")
        on = self.adapter.get_replaced(name) if name in self._replaced else None
        if name in self._targets:
            a, b, s = self.adapter.factors(name)
            return LoraPiece(a, b, s, self.adapter.transposed(name), on)
        return on

    def raw(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """CPU tensors for ``name`` (the interference analysis' form): ``(weight or delta, other-set
        delta or None, first_is_weight)``. ``first_is_weight`` is ``True`` for a full weight
        (checkpoint tensor or a peft ``modules_to_save`` replacement): the caller subtracts the
        base. ``(None, None, False)`` when the expert does not touch ``name``."""
        if self.kind == "full":
            if name not in self.reader:
                return None, None, False
            return self.reader.get(name), None, True
        if self.kind in ("frozen", "mllm"):
            if self.kind == "mllm":
                raise ConfigError("raw() reads full, LoRA and DAMC experts, not a multimodal folder's LLM")
            return None, None, False
        mod = self.other.delta(name) if name in self._other_targets else None
        if name in self._targets:
            return self.adapter.delta(name), mod, False
        if name in self._replaced:
            return self.adapter.get_replaced(name), mod, True
        return None, mod, False

    def tau(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """``tau`` of tensor ``name`` in float32 on ``base``'s device (the composition's form;
        ``None``: equal to the base). A full expert must hold ``name``, in the base's shape."""
        if self.kind == "frozen":
            return None
        if self.kind == "damc":
            raise ConfigError(f"expert {self.path} is a DAMC expert: its LLM is decoupled into text and "
                              "modality parameters and has no single task vector (use compose_damc)")
        if self.kind == "lora":
            if name in self._targets:
                d = self.adapter.delta(name).to(base.device)
            elif name in self._replaced:
                d = self.adapter.get_replaced(name).to(base.device).float() - base.float()
            else:
                return None
        else:
            if self.kind == "mllm":
                if not self.checkpoint.has_lm_tensor(name):
                    raise CheckpointError("expert lacks a tensor of the base LLM", file=self.path, tensor=name)
                t = self.checkpoint.lm_tensor(name)
            else:
                if name not in self.reader:
                    raise CheckpointError("expert lacks a tensor of the base LLM", file=self.path, tensor=name)
                t = self.reader.get(name)
            if tuple(t.shape) != tuple(base.shape):
                raise CheckpointError(f"shape {list(t.shape)} differs from the base's {list(base.shape)}",
                                      file=self.path, tensor=name)
            d = t.to(base.device).float() - base.float()
        if tuple(d.shape) != tuple(base.shape):
            raise CheckpointError(f"delta shape {list(d.shape)} differs from the base's {list(base.shape)}",
                                  file=self.path, tensor=name)
        return d


# ---------------------------------------------------------------------------------------- opening
def expert_folder_layout(folder: Path) -> tuple[str, dict[str, Path]] | None:
    """The LLM parts of a zoo expert folder (the layout :mod:`workbench.world.zoo` writes; the one
    place its folder names are read): ``("damc-full", {"text": ..., "modality": ...})`` for
    ``llm_text/`` + ``llm_modality/`` (DAMC's full-weight option), ``("frozen", {})`` for a
    projector-only expert (``expert.json`` kind ``projector``, or no LLM folder), ``("damc",
    {"text": ..., "modality": ...})`` for ``adapter_text/`` + ``adapter_modality/`` (also under
    ``llm/``), ``("lora", {"adapter": ...})`` for ``adapter/`` (or ``llm/`` holding an adapter),
    ``("full", {"llm": ...})`` for ``llm/``; ``None`` when ``folder`` is not such a folder (a plain
    checkpoint or adapter folder)."""
    kind = None
    if (folder / "expert.json").is_file():
        try:
            kind = json.loads((folder / "expert.json").read_text()).get("kind")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable expert.json: {e}", file=folder / "expert.json") from e
    if (folder / "llm_text").is_dir() and (folder / "llm_modality").is_dir():
        return "damc-full", {"text": folder / "llm_text", "modality": folder / "llm_modality"}
    has_llm = any((folder / d).is_dir() for d in ("llm", "adapter", "adapter_text")) or is_lora_adapter(folder)
    if kind == "projector" or (kind is not None and not has_llm):
        return "frozen", {}
    for root in (folder, folder / "llm"):
        if (root / "adapter_text").is_dir() and (root / "adapter_modality").is_dir():
            return "damc", {"text": root / "adapter_text", "modality": root / "adapter_modality"}
    if is_lora_adapter(folder):
        return None
    if is_lora_adapter(folder / "adapter"):
        return "lora", {"adapter": folder / "adapter"}
    if (folder / "llm").is_dir():
        if is_lora_adapter(folder / "llm"):
            return "lora", {"adapter": folder / "llm"}
        return "full", {"llm": folder / "llm"}
    return None


def open_expert(path: str | Path | None, *, name: str | None = None, mmap: bool = True,
                damc_set: str = "text") -> Expert:
    """Open an expert, whatever its kind (see the module docstring).

    Args:
        path: a checkpoint (folder or file), a peft LoRA adapter folder, a zoo expert folder
            (:func:`expert_folder_layout`), or ``None`` (no expert: ``tau = 0``).
        name: a label for the expert (:attr:`Expert.name`; default: the path's name).
        mmap: memory-map the tensors (as :class:`CheckpointReader`).
        damc_set: for a DAMC expert, ``"text"`` or ``"modality"``: whose product is the task vector.

    Raises:
        CheckpointError: the path does not exist, or is not readable as a checkpoint.
        ConfigError: a ``damc_set`` other than ``"text"`` / ``"modality"``.
    """
    if damc_set not in ("text", "modality"):
        raise ConfigError(f"damc_set must be 'text' or 'modality', got {damc_set!r}")
    if path is None:
        return Expert("frozen", None, name=name)
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"expert {name or p.name!r}: path does not exist", file=p)
    if p.is_dir():
        layout = expert_folder_layout(p)
        if layout is not None:
            kind, parts = layout
            if kind == "frozen":
                return Expert("frozen", p, name=name)
            if kind == "damc-full":
                raise CheckpointError("a DAMC expert with full-weight text and modality LLMs has no task vector "
                                      "to read here (open llm_text/ or llm_modality/ as full experts)", file=p)
            if kind == "damc":
                text, mod = LoraAdapter(parts["text"], mmap=mmap), LoraAdapter(parts["modality"], mmap=mmap)
                main, other = (text, mod) if damc_set == "text" else (mod, text)
                return Expert("damc", p, name=name, adapter=main, other=other)
            if kind == "lora":
                return Expert("lora", p, name=name, adapter=LoraAdapter(parts["adapter"], mmap=mmap))
            return Expert("full", p, name=name, reader=CheckpointReader(parts["llm"], mmap=mmap))
        if is_lora_adapter(p):
            return Expert("lora", p, name=name, adapter=LoraAdapter(p, mmap=mmap))
    return Expert("full", p, name=name, reader=CheckpointReader(p, mmap=mmap))
