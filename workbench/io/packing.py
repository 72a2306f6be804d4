"""Bit packing of boolean masks: the one layout of the workbench (the engine's MMER store, the routed
layers' masks, the analysis' mask files).

It follows :func:`numpy.packbits`: the flattened mask, most significant bit first, zero-padded to a
multiple of 8 entries; the shape is not stored (the reader is given it), so masks written by the
engine unpack everywhere and vice versa.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["pack_mask", "unpack_mask", "unpack_mask_bits"]

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor of any shape into a 1-D uint8 tensor, 8 entries per byte, MSB first.

    ``ceil(numel / 8)`` bytes on ``mask``'s device; the shape is not stored (give it to
    :func:`unpack_mask`).
    """
    flat = mask.reshape(-1).to(torch.bool).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a boolean tensor of ``shape`` on ``packed``'s device.

    Raises:
        ValueError: ``packed`` is not uint8 or does not hold ``ceil(prod(shape) / 8)`` bytes.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed mask must be uint8, got {packed.dtype}")
    if packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask holds {packed.numel()} bytes; shape {list(shape)} needs {(n + 7) // 8}")
    return unpack_mask_bits(packed, shape).to(torch.bool)


def unpack_mask_bits(packed: torch.Tensor, shape: Sequence[int] | torch.Size) -> torch.Tensor:
    """Like :func:`unpack_mask` but a uint8 0/1 tensor (multiplies without a further cast)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_right_shift(packed.reshape(-1, 1), shifts).bitwise_and_(1)
    return bits.reshape(-1)[:n].reshape(shape)
