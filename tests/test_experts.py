"""workbench.io.experts: one reader per expert, whose three forms (the engine's read, the analysis'
raw, the composition's tau) give the same task vector for every kind."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.errors import CheckpointError
from workbench.io import CheckpointReader
from workbench.io.experts import LoraPiece, open_expert


def test_lora_expert_forms_agree(tiny_llama, tiny_lora_adapters):
    base = CheckpointReader(tiny_llama)
    e = open_expert(tiny_lora_adapters[0])
    assert e.kind == "lora" and e.targets()
    for name in sorted(e.targets()):
        b = base.get(name).float()
        piece = e.read(name)
        assert isinstance(piece, LoraPiece)
        via_read = piece.delta(torch.device("cpu"))
        via_raw, other, is_weight = e.raw(name)
        assert other is None and not is_weight
        assert torch.equal(via_read, via_raw) and torch.equal(via_raw, e.tau(name, b))
    untouched = next(n for n in base.keys() if n not in e.targets())
    assert e.read(untouched) is None and e.tau(untouched, base.get(untouched).float()) is None


def test_full_expert_forms_agree(tiny_llama, tiny_llama_experts):
    base = CheckpointReader(tiny_llama)
    e = open_expert(tiny_llama_experts[0])
    assert e.kind == "full" and e.targets() is None
    name = "model.layers.0.self_attn.q_proj.weight"
    b = base.get(name).float()
    theta, other, is_weight = e.raw(name)
    assert is_weight and other is None and torch.equal(theta, e.read(name))
    assert torch.equal(e.tau(name, b), theta.float() - b)


def test_zoo_folder_layouts(tmp_path, tiny_llama_experts, tiny_lora_adapters):
    import shutil

    frozen = tmp_path / "proj"
    frozen.mkdir()
    (frozen / "expert.json").write_text(json.dumps({"kind": "projector"}))
    assert open_expert(frozen).kind == "frozen" and open_expert(None).tau("x", torch.zeros(1)) is None
    full = tmp_path / "full"
    shutil.copytree(tiny_llama_experts[0], full / "llm")
    assert open_expert(full, name="f").kind == "full"
    damc = tmp_path / "damc"
    shutil.copytree(tiny_lora_adapters[0], damc / "adapter_text")
    shutil.copytree(tiny_lora_adapters[1], damc / "adapter_modality")
    e = open_expert(damc, damc_set="modality")
    assert e.kind == "damc" and e.adapter.path == damc / "adapter_modality" and e.other.path == damc / "adapter_text"
    with pytest.raises(CheckpointError):
        open_expert(tmp_path / "missing")
