"""The merge stream's ends: where tensors come from (sources) and where results go (sinks), and the
reader thread between them. :func:`workbench.engine.stream_merge` is the one loop over them.

- :class:`StreamItem`: one tensor name's inputs - the base tensor and, when merged, each expert's
  stored value (:meth:`workbench.io.experts.Expert.read`); :func:`read_item` reads and checks one;
- :func:`prefetch`: units of names read ahead by a background thread (depth :data:`PREFETCH_DEPTH`);
- sources (``read(name, merged) -> StreamItem``): :class:`FolderSource` (checkpoint folders) and
  :class:`ModuleSource` (a module's parameters or a state dict in memory);
- sinks (``keep(item)``, ``put(name, merged, extras, what)``): :class:`FolderSink` (a checkpoint
  folder through the atomic :class:`~workbench.io.writer.CheckpointWriter`) and :class:`MemorySink`
  (in place, or as task vectors); both record method extras in an
  :class:`~workbench.io.mmer_store.ExtrasRecorder` and check what they store finite
  (:func:`stored`).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import CheckpointError, ConfigError
from .experts import LoraPiece
from .mmer_store import ExtrasRecorder
from .reader import CheckpointReader, all_finite, check_finite
from .writer import CheckpointWriter

#: tensors read ahead of the one being computed.
PREFETCH_DEPTH = 2


@dataclass
class StreamItem:
    name: str
    merged: bool
    base: torch.Tensor
    experts: list = field(default_factory=list)  # Tensor | LoraPiece | None (= base)


def read_item(name: str, merged: bool, base: Any, experts: Sequence[Any], check: bool = True) -> StreamItem:
    """Read one tensor of the base (``base.get`` / ``base.file_of``: a :class:`CheckpointReader` or a
    :class:`ModuleSource`) and of the experts when it is merged, checking shapes and finiteness
    (``check=False``: the compiled merge checks every entry as it reads it)."""
    b = base.get(name)
    if check:
        check_finite(b, file=base.file_of(name), tensor=name)
    item = StreamItem(name, merged, b)
    if merged:
        for e in experts:
            x = e.read(name)
            if isinstance(x, torch.Tensor):
                if tuple(x.shape) != tuple(b.shape):
                    raise CheckpointError(f"shape {list(x.shape)} differs from the base's {list(b.shape)}",
                                          file=e.file_of(name), tensor=name)
                if check:
                    check_finite(x, file=e.file_of(name), tensor=name)
            elif isinstance(x, LoraPiece):
                for t in (x.a, x.b) if x.on is None else (x.a, x.b, x.on):
                    check_finite(t, file=e.file_of(name), tensor=name)
            item.experts.append(x)
    return item


def prefetch(units: Sequence[Sequence[tuple[str, bool]]], read: Callable[[str, bool], StreamItem],
             depth: int = PREFETCH_DEPTH) -> Iterator[list[StreamItem]]:
    """Yield ``[read(name, merged) for ...]`` per unit while a background thread reads up to
    ``depth`` units ahead. An exception in the reader is re-raised in the caller; stopping the
    iteration early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for unit in units:
                items = [read(n, m) for n, m in unit]
                if not put(items):
                    return
                del items
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    t = threading.Thread(target=work, name="workbench-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
            del x
    finally:
        stop.set()
        while True:  # unblock a waiting producer
            try:
                q.get_nowait()
            except queue.Empty:
                break
        t.join(timeout=30)


def to_device(x, base_dev: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Expert value -> float32 tensor on ``device`` (``None`` is the base, LoRA adds its delta)."""
    if x is None:
        return base_dev.clone()
    if isinstance(x, LoraPiece):
        on = base_dev if x.on is None else x.on.to(device=device, dtype=torch.float32)
        d = x.delta(device)
        if tuple(d.shape) != tuple(on.shape):
            raise CheckpointError(f"LoRA delta shape {list(d.shape)} differs from the base's {list(on.shape)}")
        return on + d
    return x.to(device=device, dtype=torch.float32, non_blocking=True)


# ---------------------------------------------------------------------------------------- sources and sinks
class FolderSource:
    """Checkpoint folders: the base's :class:`CheckpointReader` and the experts
    (:func:`workbench.io.experts.open_expert`). ``checked=False``: merged tensors are not checked
    finite on reading (the compiled merge checks every entry as it reads it)."""

    def __init__(self, base: CheckpointReader, experts: Sequence[Any], *, checked: bool = True) -> None:
        self.base, self.experts, self.checked = base, list(experts), checked

    def read(self, name: str, merged: bool) -> StreamItem:
        return read_item(name, merged, self.base, self.experts, check=self.checked or not merged)


class ModuleSource:
    """A base in memory - a module's floating parameters (tied ones once) or a state dict - and
    experts read tensor by tensor (:class:`~workbench.io.experts.Expert`: any kind but DAMC)."""

    def __init__(self, base: torch.nn.Module | Mapping[str, torch.Tensor], experts: Sequence[Any]) -> None:
        tensors = dict(base.named_parameters()) if isinstance(base, torch.nn.Module) else dict(base)
        self.tensors = {n: t for n, t in tensors.items() if t.dtype.is_floating_point}
        self.experts = list(experts)
        for e in self.experts:
            if e.kind == "damc":
                raise ConfigError(f"expert {e.path} is a DAMC expert: its LLM is decoupled into text and modality "
                                  "parameters and has no single task vector (use compose_damc)")

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()

    def file_of(self, name: str) -> None:
        return None

    def read(self, name: str, merged: bool) -> StreamItem:
        return read_item(name, merged, self, self.experts)


def stored(t: torch.Tensor, dtype: torch.dtype, name: str, what: str, file: Path | None,
            cpu: bool = True) -> torch.Tensor:
    """``t`` cast to ``dtype`` (on the CPU with ``cpu``), checked finite *after* the cast (what is stored)."""
    out = t.to(dtype)
    out = out.cpu() if cpu else out
    if not all_finite(out):
        raise CheckpointError(f"{what} gives {nonfinite_what(t, dtype)}; nothing written", file=file, tensor=name)
    return out


class FolderSink:
    """Results into a checkpoint folder through a planned :class:`CheckpointWriter` (atomic: the
    folder appears when the writer closes), each cast to ``dtype_of(name)``; extras into its
    :class:`ExtrasRecorder` (saved under ``<output>/mmer/`` by the caller)."""

    def __init__(self, writer: CheckpointWriter, dtype_of: Callable[[str], torch.dtype], output: Path) -> None:
        self.writer, self.dtype_of, self.output = writer, dtype_of, output
        self.extras = ExtrasRecorder()

    def keep(self, item: StreamItem) -> None:
        b = item.base
        self.writer.add(item.name, b if self.dtype_of(item.name) == b.dtype else
                        stored(b, self.dtype_of(item.name), item.name, "the base tensor (kept)", self.output))

    def put(self, name: str, merged: torch.Tensor, extras: Mapping[str, torch.Tensor], what: str) -> None:
        self.writer.add(name, stored(merged, self.dtype_of(name), name, what, self.output))
        for key, value in extras.items():
            self.extras.add(name, key, value)


class MemorySink:
    """Results into the tensors of a :class:`ModuleSource`, each cast to its base tensor's dtype
    (or ``dtype``): copied into it in place (the module becomes the merge), or with
    ``task_vectors=True`` kept as ``merged - base`` in :attr:`tensors` (the base untouched).
    Kept tensors stay as they are; extras go to :attr:`extras` (:class:`ExtrasRecorder`)."""

    def __init__(self, source: ModuleSource, *, task_vectors: bool = False, dtype: torch.dtype | None = None) -> None:
        self.source, self.task_vectors, self.dtype = source, task_vectors, dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.extras = ExtrasRecorder()

    def keep(self, item: StreamItem) -> None:
        pass

    def put(self, name: str, merged: torch.Tensor, extras: Mapping[str, torch.Tensor], what: str) -> None:
        p = self.source.tensors[name]
        if self.task_vectors:
            merged = merged - p.detach().float()
        value = stored(merged, self.dtype or p.dtype, name, what, None, cpu=False)
        if self.task_vectors:
            self.tensors[name] = value
        else:
            p.data.copy_(value)
        for key, v in extras.items():
            self.extras.add(name, key, v)


def nonfinite_what(t: torch.Tensor | None, dtype: torch.dtype) -> str:
    """Why a written tensor is not finite: the values themselves, or the cast to ``dtype``."""
    if t is not None and all_finite(t):
        return f"values outside the {str(dtype).replace('torch.', '')} range (Inf after the cast)"
    return "non-finite values"
