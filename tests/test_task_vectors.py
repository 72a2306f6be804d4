"""Task vectors, LoRA product deltas (checked against peft's own LoRA layer) and tensor-name parsing."""
from __future__ import annotations

import pytest
import torch

from workbench.errors import CheckpointError
from workbench.io.lora import lora_delta
from workbench.task_vectors import MODULE_TYPES, parse_tensor_name, task_vector


@pytest.mark.parametrize("name, want", [
    ("model.layers.3.self_attn.q_proj.weight", (3, "q")),
    ("model.layers.12.self_attn.k_proj.weight", (12, "k")),
    ("model.layers.0.self_attn.v_proj.bias", (0, "v")),
    ("model.layers.1.self_attn.o_proj.weight", (1, "o")),
    ("model.layers.1.mlp.gate_proj.weight", (1, "gate")),
    ("model.layers.1.mlp.up_proj.weight", (1, "up")),
    ("language_model.model.layers.0.mlp.down_proj.weight", (0, "down")),
    ("model.language_model.layers.5.self_attn.q_proj.weight", (5, "q")),  # transformers 5 LLaVA / Qwen2-VL
    ("model.layers.2.input_layernorm.weight", (2, "norm")),
    ("model.layers.2.post_attention_layernorm.weight", (2, "norm")),
    ("model.norm.weight", (None, "norm")),
    ("lm_head.weight", (None, "head")),
    ("language_model.lm_head.weight", (None, "head")),
    ("model.embed_tokens.weight", (None, "embed")),
    ("vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight", (None, "vision")),
    ("model.vision_tower.vision_model.embeddings.patch_embedding.weight", (None, "vision")),
    ("multi_modal_projector.linear_1.weight", (None, "projector")),
    ("model.mm_projector.0.weight", (None, "projector")),
    ("visual.blocks.0.attn.qkv.weight", (None, "vision")),  # Qwen2-VL
    ("visual.merger.mlp.0.weight", (None, "projector")),  # Qwen2-VL projector
    ("model.layers.0.self_attn.rotary_emb.inv_freq", (0, "other")),
])
def test_parse_tensor_name(name, want):
    got = parse_tensor_name(name)
    assert got == want
    assert got[1] in MODULE_TYPES


def test_task_vector_is_difference_in_float32():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(4, 5, generator=g).to(torch.bfloat16)
    e = (b.float() + 0.5).to(torch.bfloat16)
    tau = task_vector(b, e)
    assert tau.dtype == torch.float32
    assert torch.equal(tau, e.float() - b.float())


def test_task_vector_shape_mismatch_names_tensor():
    with pytest.raises(CheckpointError, match="w.q"):
        task_vector(torch.zeros(2, 3), torch.zeros(3, 2), name="w.q")


def test_lora_delta_matches_peft_layer():
    """Independent reference: peft's own ``LoraLayer.get_delta_weight`` on an injected Linear."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(6, 5, bias=False))
    model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=12, target_modules=["proj"]), model)
    layer = model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.get_delta_weight("default")
    got = lora_delta(A.detach(), B.detach(), 12 / 3)
    assert got.shape == (5, 6)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)


def test_lora_delta_rank_mismatch():
    with pytest.raises(ValueError, match="rank"):
        lora_delta(torch.zeros(3, 6), torch.zeros(5, 2), 1.0)
