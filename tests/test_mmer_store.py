"""The MMER store (workbench.io.mmer_store): write -> read gives back the same masks and τ*, in both
ways a store is written (MMERParts saved by write_parts, a merge method's extras saved by the engine)."""
from __future__ import annotations

import json

import torch

from workbench.io.mmer_store import (MMER_DIR, ExtrasRecorder, MMERParts, MMERStore, mask_key, parse_mask_key,
                                     read_extras, read_parts, write_parts)
from workbench.io.packing import pack_mask

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (5, 7), "model.layers.1.mlp.down_proj.weight": (3, 9)}


def _masks(seed: int, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(n, *s, generator=g) < 0.4 for name, s in SHAPES.items()}


def test_parts_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = _masks(1)
    parts = MMERParts({n: torch.randn(*s, generator=g) for n, s in SHAPES.items()},
                      {n: [pack_mask(m[i]) for i in range(3)] for n, m in masks.items()}, 3,
                      {"merge_method": "ties", "lam": 1.0})
    folder = write_parts(parts, tmp_path / "a")
    back = read_parts(folder)
    assert back.n_experts == 3 and back.params == parts.params
    for n in SHAPES:
        assert torch.equal(back.tau_star[n], parts.tau_star[n])
        for i in range(3):
            assert torch.equal(back.masks[n][i], parts.masks[n][i])
            assert torch.equal(back.mask(n, i), masks[n][i])
    # written again from what was read: the same files (the masks' header metadata is a map whose
    # serialised order safetensors does not fix: compared as read back)
    again = write_parts(back, tmp_path / "b")
    for f in ("tau_star.safetensors", "mmer.json"):
        assert (folder / f).read_bytes() == (again / f).read_bytes()
    first, second = MMERStore(folder), MMERStore(again)
    assert first.keys == second.keys and first.metadata == second.metadata
    assert all(torch.equal(read_extras(folder)[k], read_extras(again)[k]) for k in first.keys)


class _FolderWriter:
    """The two methods of CheckpointWriter that ExtrasRecorder.save uses, writing into a folder."""

    def __init__(self, root):
        self.root = root

    def save_extra(self, relpath, tensors, metadata=None):
        from safetensors.torch import save_file

        (self.root / relpath).parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(tensors), str(self.root / relpath), metadata={"format": "pt", **dict(metadata or {})})

    def save_json(self, relpath, obj):
        (self.root / relpath).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def test_engine_extras_round_trip(tmp_path):
    masks = _masks(2, n=2)
    rec = ExtrasRecorder()
    for n, m in masks.items():
        for i in range(2):
            rec.add(n, f"mask_{i}", m[i])
    rec.add(next(iter(SHAPES)), "score", torch.arange(4.0))  # a numeric extra is kept as it is
    rec.save(_FolderWriter(tmp_path), "mmer", {"lam": 1.0})
    got = read_extras(tmp_path / MMER_DIR)
    for n, m in masks.items():
        for i in range(2):
            assert torch.equal(got[mask_key(n, i)], m[i])
    assert torch.equal(got[f"{next(iter(SHAPES))}::score"], torch.arange(4.0))
    store = MMERStore(tmp_path / MMER_DIR)
    assert store.tau_star_file is None and store.info["method"] == "mmer"
    assert sorted(store.mask_groups()) == sorted(SHAPES)
    # read as parts: τ* = merged - base
    base = {n: torch.zeros(s) for n, s in SHAPES.items()}
    merged = {n: torch.full(s, 0.5) for n, s in SHAPES.items()}
    from safetensors.torch import save_file

    save_file(merged, str(tmp_path / "model.safetensors"))
    parts = read_parts(tmp_path / MMER_DIR, base=base)
    assert parts.n_experts == 2 and parts.params["lam"] == 1.0
    for n, m in masks.items():
        assert torch.equal(parts.tau_star[n], merged[n])
        assert all(torch.equal(parts.mask(n, i), m[i]) for i in range(2))


def test_mask_keys():
    assert parse_mask_key(mask_key("a.b.weight", 12)) == ("a.b.weight", 12)
    assert parse_mask_key("a.b.weight::score") is None
