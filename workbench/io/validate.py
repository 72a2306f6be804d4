"""Checks shared by ``workbench merge`` and ``workbench profile``: where output may go, whether an
expert fits its base, and whether it was fine-tuned from that base at all.

- :func:`check_output_path` / :func:`check_output_target`: the output is not an input (nor inside
  or around one), not a regular file, and ``overwrite`` replaces only a folder this tool wrote
  (it holds ``workbench_merge.json``) or an empty one.
- :func:`remove_stale_temporaries`: ``<out>.tmp-<pid>`` / ``<out>.old-<pid>`` folders left by a
  process that is gone (``kill -9``, a power cut) are removed before a new write.
- :func:`check_full_expert` / :func:`check_lora_expert`: tensor names and shapes against the base.
- :func:`check_lora_base_name`: the adapter's ``base_model_name_or_path`` against the base.
- :class:`TaskVectorNorms`: ``||tau_i|| / ||theta_0||`` per expert, and the foreign-expert verdict
  (:data:`FOREIGN_RATIO`).

Suspicious-but-usable inputs are a :class:`~workbench.errors.WorkbenchWarning`, or a
:class:`~workbench.errors.CheckpointError` with ``strict``.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..errors import CheckpointError, ConfigError, WorkbenchWarning

#: the file that marks a folder as written by ``workbench merge`` (so ``overwrite`` may replace it).
MERGE_MARKER = "workbench_merge.json"

#: Above this ``||tau_i|| / ||theta_0||`` (over the expert's matrices) an expert is taken to be
#: fine-tuned from another base. Why 0.5: for a model unrelated to the base,
#: ``E||theta_f - theta_0||^2 = ||theta_f||^2 + ||theta_0||^2 >= ||theta_0||^2``, so the ratio is at
#: least 1 whatever the other model's scale (sqrt(2) ~ 1.41 at the same scale: the issue measured
#: 1.43); a fine-tune moves its weights by a fraction of their norm (the issue's true expert: 0.10).
#: 0.5 sits 5x above the true expert and 2x below the smallest ratio an unrelated model can have.
#: Measured on the default zoo: full experts 0.087-0.092, LoRA 0.17-0.18 and DAMC 0.024 (over the
#: matrices they change); the tests' fixture experts (noise as large as the weights) 1.00.
FOREIGN_RATIO = 0.5
#: :meth:`TaskVectorNorms.observe` looks at every ROW_STRIDE-th row of each matrix.
ROW_STRIDE = 8


# ------------------------------------------------------------------------------------------ output
def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(output: Path, inputs: Sequence[Path]) -> None:
    """Raise :class:`ConfigError` if ``output`` is an input, lies inside one, or contains one."""
    out = Path(output).expanduser().resolve()
    for p in inputs:
        p = Path(p).expanduser().resolve()
        if out == p or _is_inside(out, p) or _is_inside(p, out):
            raise ConfigError(f"output {output} must not be, be inside, or contain the input {p}")


def check_output_target(output: Path, overwrite: bool, *, marker: str | None = MERGE_MARKER) -> None:
    """Refuse an output that is a regular file (or other non-folder), an existing folder without
    ``overwrite``, and, with ``overwrite``, a non-empty folder this tool did not write (``marker``
    missing; ``marker=None``: any folder may be replaced).

    Raises:
        ConfigError: naming the path and what is in the way.
    """
    output = Path(output)
    if not output.exists() and not output.is_symlink():
        return
    if not output.is_dir() or output.is_symlink():
        raise ConfigError(f"output {output} exists and is not a folder; refusing to replace it")
    if not overwrite:
        raise ConfigError(f"output {output} already exists (set overwrite: true to replace it)")
    if marker is None or (output / marker).is_file():
        return
    entries = sorted(p.name for p in output.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"output {output} is not a folder written by workbench (no {marker}; it holds {shown}): "
                          "overwrite only replaces a previous output or an empty folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Remove ``<output>.tmp-<pid>`` and ``<output>.old-<pid>`` folders next to ``output`` whose
    process no longer runs (this machine's process ids), with a :class:`WorkbenchWarning` for each;
    an ``.old-<pid>`` folder while ``output`` is missing (killed between an overwrite's two renames)
    is the previous output and is renamed back instead.
    Returns the removed paths. Folders of live processes (another merge into the same output) stay."""
    output = Path(output)
    parent = output.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(output.name)}\.(tmp|old)-(\d+)")
    removed = []
    for p in sorted(parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if m.group(1) == "old" and not output.exists():
            # killed between the two renames of an overwrite: this is the previous output, put it back
            os.replace(p, output)
            warnings.warn(f"restored the previous output {output} from {p} (its process {pid} is gone)",
                          WorkbenchWarning, stacklevel=2)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        warnings.warn(f"removed the stale temporary folder {p} (its process {pid} is gone)", WorkbenchWarning,
                      stacklevel=2)
    return removed


# ------------------------------------------------------------------------------------------ experts
def check_full_expert(reader: Any, base: Any, *, allow_missing: bool = False) -> None:
    """A full-checkpoint expert (a :class:`~workbench.io.CheckpointReader`) holds the base's tensors,
    no others, with the base's shapes (``allow_missing``: base tensors it lacks are allowed).

    Raises:
        CheckpointError: naming the expert's file and the first offending tensor.
    """
    mine, theirs = set(reader.keys()), set(base.keys())
    missing, extra = sorted(theirs - mine), sorted(mine - theirs)
    if missing and not allow_missing:
        raise CheckpointError(f"expert lacks {len(missing)} tensor(s) of the base {base.path}",
                              file=reader.path, tensor=missing[0])
    if extra:
        raise CheckpointError(f"expert has {len(extra)} tensor(s) not in the base {base.path}",
                              file=reader.file_of(extra[0]), tensor=extra[0])
    for name in sorted(mine & theirs):
        a, b = reader.info(name), base.info(name)
        if a.shape != b.shape:
            raise CheckpointError(f"shape {list(a.shape)} differs from the base's {list(b.shape)} ({b.file})",
                                  file=a.file, tensor=name)


def check_lora_expert(adapter: Any, base: Any) -> None:
    """A LoRA expert (a :class:`~workbench.io.LoraAdapter`) targets base tensors only, with deltas
    and replacements of the base's shapes.

    Raises:
        CheckpointError: naming the adapter's file and the first offending tensor.
    """
    for name in adapter.targets() + adapter.replaced():
        if name not in base:
            raise CheckpointError(f"adapter targets a weight that is not in the base {base.path} (an adapter "
                                  "for another architecture?)", file=adapter.file, tensor=name)
    for name in adapter.targets():
        shape, want = adapter.delta_shape(name), base.info(name).shape
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"LoRA delta shape {list(shape)} differs from the base's {list(want)}",
                                  file=adapter.file, tensor=name)
    for name in adapter.replaced():
        shape, want = adapter.reader.info(adapter._replaced[name]).shape, base.info(name).shape
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"replacement shape {list(shape)} differs from the base's {list(want)}",
                                  file=adapter.file, tensor=name)


def _names_of(folder: Path, config: dict | None) -> set[str]:
    names = {str(folder.resolve()), folder.name}
    if config and config.get("_name_or_path"):
        names |= {str(config["_name_or_path"]), Path(str(config["_name_or_path"])).name}
    return names


def check_lora_base_name(adapter: Any, base: Any, *, strict: bool = False) -> None:
    """Compare the adapter's ``base_model_name_or_path`` with the base (a reader): its folder path,
    folder name, or ``config.json``'s ``_name_or_path``. A hub id matches a folder of the same
    repository name (``org/name`` vs ``.../name``); an empty or missing entry is not checked.
    A mismatch warns (``strict``: raises) - a name, not proof: the shapes are checked separately.

    Raises:
        CheckpointError: with ``strict``, naming ``adapter_config.json``.
    """
    named = adapter.adapter_config.get("base_model_name_or_path")
    if not named:
        return
    named = str(named)
    local = Path(named).expanduser()
    if local.exists() and local.resolve() in (base.folder.resolve(), base.path.resolve()):
        return
    ours = _names_of(base.folder, base.config)
    if named in ours or Path(named).name in ours:
        return
    msg = (f"LoRA adapter {adapter.path} was trained on base {named!r}, not on {base.folder} "
           f"(config name {(base.config or {}).get('_name_or_path') or 'none'})")
    _warn_or_raise(msg, strict, file=adapter.path / "adapter_config.json", tensor=None)


def _warn_or_raise(msg: str, strict: bool, *, file: Any, tensor: str | None) -> None:
    if strict:
        raise CheckpointError(msg + "; refused (strict)", file=file, tensor=tensor)
    warnings.warn(f"{msg} (file {file}" + (f", tensor {tensor!r})" if tensor else ")") + "; set strict to refuse",
                  WorkbenchWarning, stacklevel=3)


class TaskVectorNorms:
    """``||tau_i|| / ||theta_0||`` per expert over the matrices (tensors of 2 or more dimensions)
    seen; vectors (norm scales, biases) are left out: a norm scale of 1 in both models gives
    ``tau = 0`` and a zero bias an infinite ratio, whatever the expert's origin.

    Args:
        experts: the experts' names (or paths), in order.
    """

    def __init__(self, experts: Sequence[str]):
        self.experts = [str(e) for e in experts]
        self.tau_sq = [0.0] * len(self.experts)
        self.base_sq = [0.0] * len(self.experts)
        self.per_tensor: list[dict[str, float]] = [{} for _ in self.experts]
        self._pending: list[tuple[str, int, Any]] = []  # (name, ndim, device tensor [base_sq, tau_sq...])

    def add(self, name: str, ndim: int, i: int, tau_sq: float, base_sq: float) -> None:
        """Record expert ``i``'s ``||tau||^2`` and the base's ``||theta_0||^2`` on tensor ``name``."""
        if ndim < 2:
            return
        self.tau_sq[i] += float(tau_sq)
        self.base_sq[i] += float(base_sq)
        if base_sq > 0:
            self.per_tensor[i][name] = math.sqrt(tau_sq / base_sq)

    def observe(self, name: str, base: Any, experts: Sequence[Any], every: int = ROW_STRIDE) -> None:
        """:meth:`add` from float tensors on any device (``experts`` are the ``theta_i``), on every
        ``every``-th row of the matrix (the tensor as ``[shape[0], -1]``): a ratio over a 1/``every``
        share of the rows is plenty to tell 0.1 from >= 1, at a fraction of the memory traffic of the
        merge itself (measured on the 2-core box, 4096 x 4096 float32, 3 experts: 0.18 s against 0.67 s
        for every row)."""
        if base.dim() < 2:
            return
        import torch

        rows = base.reshape(base.shape[0], -1)[::every]
        sq = [torch.linalg.vector_norm(rows)]
        sq += [torch.linalg.vector_norm(e.reshape(e.shape[0], -1)[::every] - rows) for e in experts]
        # kept on the device until needed: no synchronisation per tensor on a GPU
        self._pending.append((name, base.dim(), torch.stack(sq).double().square()))

    def _flush(self) -> None:
        for name, ndim, sq in self._pending:
            base_sq, *taus = sq.tolist()
            for i, tau_sq in enumerate(taus):
                self.add(name, ndim, i, tau_sq, base_sq)
        self._pending = []

    def ratio(self, i: int) -> float:
        """``sqrt(sum ||tau_i||^2 / sum ||theta_0||^2)`` (0 when nothing was seen)."""
        self._flush()
        return math.sqrt(self.tau_sq[i] / self.base_sq[i]) if self.base_sq[i] > 0 else 0.0

    def check(self, *, strict: bool = False, threshold: float = FOREIGN_RATIO, files: Sequence[Any] | None = None
              ) -> list[str]:
        """Warn (``strict``: raise) for each expert whose ratio exceeds ``threshold``, naming it and its
        largest tensors; returns the flagged experts.

        Raises:
            CheckpointError: with ``strict``, for the first flagged expert (its file, its largest tensor).
        """
        flagged = []
        for i, expert in enumerate(self.experts):
            r = self.ratio(i)
            if not r > threshold:
                continue
            worst = sorted(self.per_tensor[i].items(), key=lambda kv: -kv[1])[:3]
            shown = ", ".join(f"{n} ({v:.2f})" for n, v in worst)
            msg = (f"expert {expert} looks fine-tuned from another base: ||tau|| / ||theta_0|| = {r:.2f} over its "
                   f"matrices (threshold {threshold}; a fine-tune stays well below it, an unrelated model is >= 1); "
                   f"largest on {shown}")
            _warn_or_raise(msg, strict, file=files[i] if files else expert, tensor=worst[0][0] if worst else None)
            flagged.append(expert)
        return flagged


__all__ = ["FOREIGN_RATIO", "MERGE_MARKER", "TaskVectorNorms", "check_full_expert", "check_lora_base_name",
           "check_lora_expert", "check_output_path", "check_output_target", "remove_stale_temporaries"]
