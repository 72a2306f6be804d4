"""Atomic, sharded writer of Hugging Face checkpoint folders.

Everything is written to a sibling temporary folder ``<out>.tmp-<pid>`` and renamed to
``<out>`` only when the ``with`` block ends without an exception; on an exception the
temporary folder is removed, so an interrupted merge never leaves a half-written output.
Temporary folders of processes that are gone (``kill -9``) are removed on entry
(:func:`~workbench.io.validate.remove_stale_temporaries`), parent folders the writer created are
removed again on failure, and an existing regular file at ``<out>`` is refused.

Two ways to add tensors:

- **planned** (``plan=[(name, shape, dtype), ...]``, what the engine uses): shard files and
  their safetensors headers are laid out up front from the known shapes, and every
  :meth:`CheckpointWriter.add` writes the tensor's bytes at its place in the file at once and
  keeps nothing in memory. Tensors may arrive in any order; all planned tensors must arrive.
- **buffered** (no plan): tensors are held until the current shard reaches
  ``max_shard_bytes``, then that shard is saved with :func:`safetensors.torch.save_file`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import CheckpointError
from .reader import SAFE_INDEX, SAFE_SINGLE, TORCH_TO_ST
from .validate import remove_stale_temporaries

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
TOKENIZER_HINTS = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
                   "spiece", "sentencepiece", ".tiktoken")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a temporary sibling of ``path`` (unique per process and thread), then rename it to
    ``path``: a reader never sees a half-written file, and a failed ``write`` leaves none behind. Every
    file the workbench writes goes through here (checkpoint folders: :class:`CheckpointWriter`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def parse_size(size: int | str) -> int:
    """Bytes from ``2_000_000``, ``"2GB"`` (10^9), ``"500MB"``, ``"1GiB"`` (2^30), ``"64KB"``.

    Raises:
        ValueError: on an unknown unit or a non-positive size.
    """
    if isinstance(size, bool):
        raise ValueError(f"invalid size {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"invalid size {size!r} (use bytes or e.g. '2GB', '500MB', '1GiB')")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Data size in bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(plan: Sequence[tuple[str, Sequence[int], torch.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Group plan entries (indices, in plan order) into shards of at most ``max_shard_bytes``.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own (as in ``transformers``).
    """
    shards: list[list[int]] = [[]]
    cur = 0
    for i, (_, shape, dtype) in enumerate(plan):
        nb = tensor_nbytes(shape, dtype)
        if shards[-1] and cur + nb > max_shard_bytes:
            shards.append([])
            cur = 0
        shards[-1].append(i)
        cur += nb
    return [s for s in shards if s] or [[]]


def shard_names(n: int) -> list[str]:
    """HF shard file names: ``model.safetensors`` for one, ``model-0000i-of-0000n.safetensors`` else."""
    if n == 1:
        return [SAFE_SINGLE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of ``t`` (moved to CPU, made contiguous)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _header_bytes(entries: Mapping[str, tuple[str, list[int], int, int]]) -> bytes:
    """safetensors header (length prefix + JSON padded with spaces to a multiple of 8 bytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, (dt, shape, b, e) in entries.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [b, e]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def copy_side_files(src: Path, dst: Path, *, copy_tokenizer: bool = True) -> list[str]:
    """Copy the non-weight top-level files of ``src`` (config, generation config, tokenizer...)
    into ``dst``. Returns the copied names. Weight files, indexes and hidden files are skipped;
    tokenizer files too when ``copy_tokenizer`` is false."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        n = f.name
        if not f.is_file() or n.startswith(".") or n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json"):
            continue
        if n.startswith("adapter_") or n == "workbench_merge.json":
            continue
        if not copy_tokenizer and any(h in n for h in TOKENIZER_HINTS):
            continue
        shutil.copy2(f, dst / n)
        copied.append(n)
    return copied


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration (main thread; elsewhere a no-op): a few renames
    that must happen together. A signal that arrives meanwhile is delivered when the block ends."""
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if main else None
    try:
        yield
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class CheckpointWriter:
    """Write a Hugging Face checkpoint folder atomically (see module docstring).

    Args:
        out_dir: the final folder. It must not exist unless ``overwrite``.
        copy_from: a base model folder whose config / generation config / tokenizer files are copied.
        max_shard_bytes: maximum size of one shard (``int`` or ``"2GB"``-style).
        plan: ``[(name, shape, dtype)]`` of every tensor to come (planned, memory-free mode).
        copy_tokenizer: also copy tokenizer files from ``copy_from``.
        config_updates: keys set in the copied ``config.json`` (e.g. ``{"torch_dtype": "float16"}``).
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).
    """

    def __init__(self, out_dir: str | Path, *, copy_from: str | Path | None = None,
                 max_shard_bytes: int | str = 2_000_000_000,
                 plan: Sequence[tuple[str, Sequence[int], torch.dtype]] | None = None,
                 copy_tokenizer: bool = True, config_updates: Mapping[str, Any] | None = None,
                 overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.max_shard_bytes = parse_size(max_shard_bytes)
        self.copy_tokenizer = copy_tokenizer
        self.config_updates = dict(config_updates or {})
        self.overwrite = overwrite
        self.tmp_dir = self.out_dir.parent / f"{self.out_dir.name}.tmp-{os.getpid()}"
        self._plan = list(plan) if plan is not None else None
        self._entries: dict[str, tuple[int, str, int, Sequence[int], torch.dtype]] = {}  # planned layout
        self._handles: dict[int, Any] = {}
        self._written: set[str] = set()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_files: list[tuple[str, list[str], int]] = []  # (tmp file name, names, bytes)
        self._shard_files: list[str] = []
        self._open = False
        self._created: list[Path] = []

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "CheckpointWriter":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise CheckpointError("output path is an existing file, not a folder; refusing to replace it",
                                  file=self.out_dir)
        if self.out_dir.exists() and not self.overwrite:
            raise CheckpointError("output folder already exists (set overwrite to replace it)", file=self.out_dir)
        remove_stale_temporaries(self.out_dir)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        # the parents this writer creates, outermost first: removed again if the write fails
        self._created = [p for p in reversed(self.tmp_dir.parents) if not p.exists()]
        self.tmp_dir.mkdir(parents=True)
        self._open = True
        try:
            if self._plan is not None:
                self._layout()
        except BaseException:
            self._abort()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise

    # ------------------------------------------------------------------ planned mode
    def _layout(self) -> None:
        assert self._plan is not None
        seen = set()
        for name, _, dtype in self._plan:
            if name in seen:
                raise CheckpointError("tensor planned twice", file=self.out_dir, tensor=name)
            if dtype not in TORCH_TO_ST:
                raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors", file=self.out_dir, tensor=name)
            seen.add(name)
        groups = plan_shards(self._plan, self.max_shard_bytes)
        self._shard_files = shard_names(len(groups))
        for si, idx in enumerate(groups):
            # larger itemsize first keeps every tensor aligned to its element size
            order = sorted(idx, key=lambda i: (-torch.empty((), dtype=self._plan[i][2]).element_size(),
                                               self._plan[i][0]))
            layout: dict[str, tuple[str, list[int], int, int]] = {}
            pos = 0
            for i in order:
                name, shape, dtype = self._plan[i]
                nb = tensor_nbytes(shape, dtype)
                layout[name] = (TORCH_TO_ST[dtype], [int(s) for s in shape], pos, pos + nb)
                pos += nb
            head = _header_bytes(layout)
            path = self.tmp_dir / self._shard_files[si]
            with open(path, "wb") as f:
                f.write(head)
                f.truncate(len(head) + pos)
            for i in order:
                name, shape, dtype = self._plan[i]
                self._entries[name] = (si, self._shard_files[si], len(head) + layout[name][2],
                                       tuple(int(s) for s in shape), dtype)

    def _planned_entry(self, name: str) -> tuple:
        """``(shard index, file name, offset, shape, dtype)`` of a planned tensor not yet written."""
        entry = self._entries.get(name) if self._plan is not None else None
        if entry is None:
            raise CheckpointError("tensor not in the writer's plan", file=self.out_dir, tensor=name)
        return entry

    def _planned_file(self, name: str, entry: tuple):
        """The shard's open file, positioned at the tensor's offset (refuses a second write)."""
        si, fname, offset, _, _ = entry
        if name in self._written:
            raise CheckpointError("tensor written twice", file=self.out_dir / fname, tensor=name)
        f = self._handles.get(si)
        if f is None:
            f = self._handles[si] = open(self.tmp_dir / fname, "r+b")
        f.seek(offset)
        return f

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._planned_entry(name)
        _, fname, _, shape, dtype = entry
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"tensor is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}",
                                  file=self.out_dir / fname, tensor=name)
        self._planned_file(name, entry).write(_tensor_bytes(tensor))
        self._written.add(name)

    def add_parts(self, name: str, parts: Callable[[Callable[[torch.Tensor], None]], Any]) -> None:
        """Write a planned tensor piece by piece: ``parts(write)`` calls ``write(piece)`` with
        consecutive flat pieces of the tensor (in its planned dtype, each written at once, so the
        caller may reuse its buffer); together they must fill it exactly. Planned mode only."""
        entry = self._planned_entry(name)
        _, fname, _, shape, dtype = entry
        f = self._planned_file(name, entry)
        want, got = tensor_nbytes(shape, dtype), 0

        def write(piece: torch.Tensor) -> None:
            nonlocal got
            if piece.dtype != dtype:
                raise CheckpointError(f"piece is {piece.dtype}, planned {dtype}", file=self.out_dir / fname, tensor=name)
            got += f.write(_tensor_bytes(piece))

        parts(write)
        if got != want:
            raise CheckpointError(f"pieces filled {got} of {want} bytes", file=self.out_dir / fname, tensor=name)
        self._written.add(name)

    # ------------------------------------------------------------------ buffered mode
    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        tmp_name = f"shard-{len(self._buffer_files):05d}.partial"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self._buffer.items()},
                  str(self.tmp_dir / tmp_name), metadata={"format": "pt"})
        self._buffer_files.append((tmp_name, list(self._buffer), self._buffer_bytes))
        self._buffer = {}
        self._buffer_bytes = 0

    # ------------------------------------------------------------------ public
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (stored in its own dtype; cast before if needed)."""
        if not self._open:
            raise RuntimeError("CheckpointWriter.add outside its `with` block")
        if self._plan is not None:
            self._write_planned(name, tensor)
            return
        if name in self._written:
            raise CheckpointError("tensor written twice", file=self.out_dir, tensor=name)
        nb = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nb > self.max_shard_bytes:
            self._flush_buffer()
        self._buffer[name] = tensor
        self._buffer_bytes += nb
        self._written.add(name)

    def save_extra(self, relpath: str, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None) -> Path:
        """Save a side safetensors file (e.g. ``mmer/masks.safetensors``) inside the output folder."""
        from safetensors.torch import save_file

        path = self.tmp_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt", **dict(metadata or {})})
        return path

    def save_json(self, relpath: str, obj: Any) -> Path:
        """Save a side JSON file inside the output folder."""
        path = self.tmp_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        return path

    # ------------------------------------------------------------------ finish / abort
    def _close_handles(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def _abort(self) -> None:
        self._open = False
        self._close_handles()
        self._buffer = {}
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for p in reversed(self._created):  # innermost first; only while empty (nothing else wrote there)
            try:
                p.rmdir()
            except OSError:
                break

    def _finish(self) -> None:
        weight_map: dict[str, str] = {}
        total = 0
        if self._plan is not None:
            self._close_handles()
            missing = [n for n, _, _ in self._plan if n not in self._written]
            if missing:
                raise CheckpointError(f"merge incomplete: {len(missing)} planned tensor(s) never written",
                                      file=self.out_dir, tensor=missing[0])
            for name, (_, fname, _, shape, dtype) in self._entries.items():
                weight_map[name] = fname
                total += tensor_nbytes(shape, dtype)
        else:
            self._flush_buffer()
            names = shard_names(max(1, len(self._buffer_files)))
            if not self._buffer_files:  # an empty model: still write a valid (empty) file
                from safetensors.torch import save_file
                save_file({}, str(self.tmp_dir / names[0]), metadata={"format": "pt"})
            for (tmp_name, tensors, nb), final in zip(self._buffer_files, names):
                os.replace(self.tmp_dir / tmp_name, self.tmp_dir / final)
                weight_map.update({t: final for t in tensors})
                total += nb
            self._shard_files = names
        if len(self._shard_files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if self.copy_from is not None:
            copy_side_files(self.copy_from, self.tmp_dir, copy_tokenizer=self.copy_tokenizer)
        cfg = self.tmp_dir / "config.json"
        if self.config_updates and cfg.exists():
            data = json.loads(cfg.read_text())
            data.update(self.config_updates)
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        self._open = False
        self._rename_into_place()

    def _rename_into_place(self) -> None:
        """Rename the temporary folder to ``out_dir`` (the old one aside first with ``overwrite``),
        signals held so that an interrupt cannot land between the two renames."""
        with signals_held():
            self._renames()

    def _renames(self) -> None:
        if self.out_dir.exists():
            if not self.overwrite:
                raise CheckpointError("output folder appeared while writing", file=self.out_dir)
            old = self.out_dir.parent / f"{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, old)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp_dir, self.out_dir)
