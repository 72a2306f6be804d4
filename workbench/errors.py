"""Errors raised by the workbench. Every message names the file and, where there is one, the tensor."""
from __future__ import annotations

from pathlib import Path


class WorkbenchError(Exception):
    """Base class of the workbench's own errors."""


class CheckpointError(WorkbenchError, ValueError):
    """A checkpoint is unreadable, inconsistent with the others, or holds bad values.

    ``file`` and ``tensor`` name where the problem is; both appear in the message.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class ConfigError(WorkbenchError, ValueError):
    """A merge/compose configuration is invalid (unknown method, unknown parameter, bad path...)."""


class WorkbenchWarning(UserWarning):
    """Something the workbench did on its own, or an input that is suspicious but usable
    (the command line prints these as one line each)."""
