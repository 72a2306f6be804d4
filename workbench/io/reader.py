"""Lazy checkpoint readers: names, shapes and dtypes without loading data; one tensor at a time.

Supported layouts (a folder, or one file):

- ``model.safetensors`` (one file) or ``model.safetensors.index.json`` + shards;
- any single ``*.safetensors`` file given directly;
- ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards, loaded only with
  ``torch.load(weights_only=True, mmap=True)``.

Every failure is a :class:`~workbench.errors.CheckpointError` naming the file (and tensor).
"""
from __future__ import annotations

import json
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CheckpointError, WorkbenchWarning

#: safetensors dtype strings <-> torch dtypes.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _n, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
               ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _a):
        ST_DTYPES[_n] = getattr(torch, _a)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
#: Largest safetensors JSON header accepted (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(file: str | Path) -> dict[str, Any]:
    """Parse and check the JSON header of a safetensors file without reading tensor data.

    Checks: the 8-byte length prefix, valid JSON, known dtypes, offsets that are contiguous,
    match ``shape x itemsize``, and end exactly at the end of the file (so a truncated file is
    detected here). Returns the header dict (``__metadata__`` included when present).

    Raises:
        CheckpointError: naming ``file`` (and the tensor when one entry is wrong).
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError("not a safetensors file: shorter than its 8-byte header length", file=file)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"corrupt safetensors header: header length {n} does not fit a "
                                      f"{size}-byte file", file=file)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file: {e}", file=file) from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"corrupt safetensors header: {e}", file=file) from e
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors header entry ({e!r})", file=file, tensor=name) from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * torch.empty((), dtype=dtype).element_size():
            raise CheckpointError(f"corrupt safetensors header: data_offsets {begin}..{end} do not match "
                                  f"shape {list(shape)} of {meta['dtype']}", file=file, tensor=name)
        entries.append((begin, end, name))
    entries.sort()
    pos = 0
    for begin, end, name in entries:
        if begin != pos:
            raise CheckpointError(f"corrupt safetensors header: tensor data not contiguous at byte {begin}",
                                  file=file, tensor=name)
        pos = end
    if 8 + n + pos != size:
        what = "truncated" if 8 + n + pos > size else "has trailing bytes"
        raise CheckpointError(f"safetensors file {what}: header describes {8 + n + pos} bytes, file has {size}",
                              file=file, tensor=entries[-1][2] if entries and what == "truncated" else None)
    return header


class _SafetensorsFile:
    """One safetensors file: memory-mapped through :func:`safetensors.safe_open` (``mmap=True``)
    or read tensor by tensor into fresh buffers with positioned reads (``mmap=False``)."""

    def __init__(self, file: Path, mmap: bool = True):
        self.file = file
        self.mmap = mmap
        header = read_safetensors_header(file)
        with open(file, "rb") as f:
            self._data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self.metadata = header.get("__metadata__") or {}
        self.infos = {k: TensorInfo(k, tuple(v["shape"]), ST_DTYPES[v["dtype"]], file)
                      for k, v in header.items() if k != "__metadata__"}
        self._offsets = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
        self._handle = None
        self._lock = threading.Lock()
        self._fh = None

    def get(self, name: str) -> torch.Tensor:
        if not self.mmap:
            return self._read(name)
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.file), framework="pt", device="cpu")
            return self._handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"cannot read tensor: {e}", file=self.file, tensor=name) from e

    def _read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        begin, end = self._offsets[name]
        n = end - begin
        if n == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = bytearray(n)
        try:
            with self._lock:
                if self._fh is None:
                    self._fh = open(self.file, "rb")
                self._fh.seek(self._data_start + begin)
                got = self._fh.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor: {e}", file=self.file, tensor=name) from e
        if got != n:
            raise CheckpointError(f"file truncated: read {got} of {n} bytes", file=self.file, tensor=name)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._handle = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _BinFile:
    """One PyTorch ``.bin`` state dict, loaded with ``weights_only=True`` (memory-mapped when possible)."""

    def __init__(self, file: Path):
        self.file = file
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # old (non-zip) serialisation cannot be memory-mapped
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load PyTorch checkpoint with weights_only=True: {e}", file=file) from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError("PyTorch checkpoint is not a flat dict of tensors", file=file)
        self._sd: dict[str, torch.Tensor] = sd
        self.metadata: dict[str, str] = {}
        self.infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, file) for k, v in sd.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]

    def close(self) -> None:
        self._sd = {}


def _open_file(file: Path, mmap: bool = True):
    if file.suffix == ".safetensors":
        return _SafetensorsFile(file, mmap)
    if file.suffix in (".bin", ".pt", ".pth"):
        return _BinFile(file)
    raise CheckpointError("unknown checkpoint file type (expected .safetensors or .bin)", file=file)


def _index_shards(path: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable checkpoint index: {e!r}", file=index) from e
    for f in files:
        if not (path / f).is_file():
            raise CheckpointError(f"index names a missing shard {f!r}", file=index)
    return [path / f for f in files]


def _explicit_weights(path: Path) -> str | None:
    """``config.json``'s ``transformers_weights`` (a file name inside ``path``), which transformers
    loads before anything else; ``None`` when absent."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable config is reported where the config is used
    if name is None:
        return None
    target = (path / str(name)).resolve()
    if not (isinstance(name, str) and target.is_relative_to(path.resolve())):
        raise CheckpointError(f"transformers_weights {name!r} must name a file inside the folder", file=cfg)
    return name


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder (or ``[path]`` for a single file), in load order.

    A folder is resolved exactly as ``transformers``' ``PreTrainedModel.from_pretrained`` does
    (``modeling_utils._get_resolved_checkpoint_files``, transformers 5.x; local folder, no
    variant): ``config.json``'s ``transformers_weights`` if set, else the first present of
    ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``,
    ``pytorch_model.bin.index.json``. So the files merged are the files transformers loads; when a
    single file and an index of the same format are both present (a re-save over a sharded save
    leaves the old index behind) a :class:`~workbench.errors.WorkbenchWarning` says which one is used.

    Raises:
        CheckpointError: when the folder holds no known weight layout, or an index is unreadable
        or names a missing shard.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError("checkpoint path does not exist", file=path)
    explicit = _explicit_weights(path)
    if explicit is not None:
        target = path / explicit
        if not target.is_file():
            raise CheckpointError(f"config.json names transformers_weights {explicit!r}, which is missing",
                                  file=target)
        return _index_shards(path, target) if explicit.endswith(".index.json") else [target]
    for single, index_name in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (path / single).is_file():
            if (path / index_name).is_file():
                warnings.warn(f"{path} holds both {single} and {index_name}: reading {single}, as transformers' "
                              f"from_pretrained does (the index and its shards are ignored)", WorkbenchWarning,
                              stacklevel=2)
            return [path / single]
        if (path / index_name).is_file():
            return _index_shards(path, path / index_name)
    if (path / "adapter_config.json").is_file():
        raise CheckpointError("this is a LoRA adapter folder; open it with LoraAdapter", file=path)
    if (path / "adapter_model.safetensors").exists() or (path / "adapter_model.bin").exists():
        raise CheckpointError("a LoRA adapter folder (adapter_model weights) without its adapter_config.json: "
                              "the file is missing", file=path / "adapter_config.json")
    shards = sorted(path.glob("*.safetensors"))
    if len(shards) == 1:
        return shards
    raise CheckpointError("no model.safetensors, safetensors index or pytorch_model.bin found", file=path)


class CheckpointReader:
    """Lazy read access to a Hugging Face checkpoint folder or a single weight file.

    Opening reads only the headers (safetensors) - a ``.bin`` is memory-mapped with
    ``weights_only=True``. :meth:`get` returns one tensor at a time.

    Args:
        path: a checkpoint folder or one weight file.
        mmap: read safetensors through memory maps (:func:`safetensors.safe_open`, zero-copy;
            the mapped pages count in the process's RSS until closed). ``False`` reads each
            tensor into its own buffer with a positioned read, so memory is freed with the tensor
            (what the merge engine uses).
    """

    def __init__(self, path: str | Path, *, mmap: bool = True):
        self.path = Path(path)
        self.files = checkpoint_files(self.path)
        self._files = [_open_file(f, mmap) for f in self.files]
        self._where: dict[str, Any] = {}
        for f in self._files:
            for name in f.infos:
                if name in self._where:
                    raise CheckpointError(f"tensor stored twice (also in {self._where[name].file.name})",
                                          file=f.file, tensor=name)
                self._where[name] = f
        self._config: dict | None | bool = False

    @property
    def folder(self) -> Path:
        """The folder holding the checkpoint (``path`` itself, or the file's parent)."""
        return self.path if self.path.is_dir() else self.path.parent

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def info(self, name: str) -> TensorInfo:
        """Name, shape, dtype and file of ``name`` (no data read)."""
        try:
            return self._where[name].infos[name]
        except KeyError:
            raise CheckpointError("tensor not in checkpoint", file=self.path, tensor=name) from None

    def file_of(self, name: str) -> Path:
        """The file that stores ``name``."""
        return self.info(name).file

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype; memory-mapped for safetensors)."""
        f = self._where.get(name)
        if f is None:
            raise CheckpointError("tensor not in checkpoint", file=self.path, tensor=name)
        return f.get(name)

    @property
    def config(self) -> dict | None:
        """``config.json`` of the folder as a dict, or ``None`` when there is none."""
        if self._config is False:
            cfg = self.folder / "config.json"
            try:
                self._config = json.loads(cfg.read_text()) if cfg.is_file() else None
            except (OSError, ValueError) as e:
                raise CheckpointError(f"unreadable config.json: {e}", file=cfg) from e
        return self._config  # type: ignore[return-value]

    def total_bytes(self) -> int:
        """Sum of the tensors' data sizes."""
        return sum(f.infos[n].nbytes for n, f in self._where.items())

    def close(self) -> None:
        """Drop the file handles / memory maps."""
        for f in self._files:
            f.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors in {len(self.files)} file(s))"


_EXP_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in ``t``; for 16-bit floats by their exponent bits (an entry is NaN/Inf exactly
    when they are all set: one integer pass instead of ``isfinite``, slow on bfloat16 on the CPU)."""
    mask = _EXP_BITS.get(t.dtype)
    if mask is not None:
        return not (t.numel() and bool(((t.view(torch.int16) & mask) == mask).any()))
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, *, file: str | Path | None, tensor: str) -> None:
    """Raise :class:`CheckpointError` naming ``file`` and ``tensor`` if ``t`` holds NaN or Inf
    (tested by :func:`all_finite`: one integer pass for 16-bit floats)."""
    if not all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise CheckpointError(f"non-finite values in input ({n_nan} NaN, {n_inf} Inf)", file=file, tensor=tensor)
