"""Device selection shared by the engine, the analysis and the composed models."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Return a concrete :class:`torch.device`.

    ``"auto"`` (or ``None``) picks ``cuda`` when a GPU is visible, else ``cpu``. Asking for
    ``cuda`` on a machine without one raises a clear error instead of failing later.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch.cuda.is_available() is False")
    return dev
