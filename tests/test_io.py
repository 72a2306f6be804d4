"""workbench.io: readers, LoRA adapters, the writer, name filters."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import state_dict_of, tree_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError
from workbench.io import (CheckpointReader, CheckpointWriter, LoraAdapter, NameFilter, checkpoint_files, parse_size,
                          peft_key_to_base)


def _independent_state_dict(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_reader_single_file_metadata_and_tensors(tiny_llama):
    r = CheckpointReader(tiny_llama)
    ref = _independent_state_dict(tiny_llama)
    assert r.keys() == sorted(ref)
    for k, v in ref.items():
        info = r.info(k)
        assert info.shape == tuple(v.shape) and info.dtype == v.dtype
        assert info.file == tiny_llama / "model.safetensors"
        assert info.nbytes == v.numel() * v.element_size()
        assert torch.equal(r.get(k), v)
    assert r.config["model_type"] == "llama"
    assert r.total_bytes() == sum(v.numel() * v.element_size() for v in ref.values())
    with pytest.raises(CheckpointError, match="nope"):
        r.get("nope")


def test_reader_sharded_index(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    files = checkpoint_files(tmp_path / "s")
    assert len(files) > 1
    r = CheckpointReader(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"]
    ref = state_dict_of(tiny_llama)
    assert set(r.keys()) == set(ref)
    for k in ref:
        assert r.info(k).file.name == index[k]
        assert torch.equal(r.get(k), ref[k])


def test_reader_bin(tiny_llama, tmp_path):
    ref = state_dict_of(tiny_llama)
    (tmp_path / "b").mkdir()
    torch.save(ref, tmp_path / "b" / "pytorch_model.bin")
    r = CheckpointReader(tmp_path / "b")
    assert r.keys() == sorted(ref)
    assert all(torch.equal(r.get(k), ref[k]) for k in ref)


def test_reader_missing_shard(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        CheckpointReader(tmp_path / "s")


def test_reader_on_adapter_folder_points_to_lora(tiny_lora_adapters):
    with pytest.raises(CheckpointError, match="LoraAdapter"):
        CheckpointReader(tiny_lora_adapters[0])


@pytest.mark.parametrize("shard", [10**9, 5000])
@pytest.mark.parametrize("planned", [True, False])
def test_writer_roundtrip_loads_with_transformers(tiny_llama, tmp_path, shard, planned):
    from transformers import AutoModelForCausalLM

    ref = state_dict_of(tiny_llama)
    plan = [(k, tuple(v.shape), v.dtype) for k, v in sorted(ref.items())] if planned else None
    out = tmp_path / "out"
    with CheckpointWriter(out, copy_from=tiny_llama, max_shard_bytes=shard, plan=plan) as w:
        assert w.tmp_dir.exists() and not out.exists()
        for k in sorted(ref):
            w.add(k, ref[k])
    shards = sorted(out.glob("*.safetensors"))
    assert (len(shards) > 1) == (shard == 5000)
    assert (out / "model.safetensors.index.json").exists() == (shard == 5000)
    for f in shards:  # each shard within the limit unless it is a single oversized tensor
        sd = load_file(str(f))
        size = sum(v.numel() * v.element_size() for v in sd.values())
        assert size <= shard or len(sd) == 1
    got = _independent_state_dict(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       ref["model.layers.0.mlp.up_proj.weight"])
    with safe_open(str(shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_writer_removes_temp_on_error_and_checks_plan(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, plan=[("a", (2,), torch.float32)]) as w:
            w.add("a", torch.ones(2))
            raise RuntimeError("interrupted")
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="incomplete"):
        with CheckpointWriter(out, plan=[("a", (2,), torch.float32), ("b", (3,), torch.float32)]) as w:
            w.add("a", torch.ones(2))
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="planned"):
        with CheckpointWriter(out, plan=[("a", (2,), torch.float32)]) as w:
            w.add("a", torch.ones(3))
    assert not list(tmp_path.iterdir())


def test_writer_copy_tokenizer_false(tiny_llama, tmp_path):
    with CheckpointWriter(tmp_path / "o", copy_from=tiny_llama, copy_tokenizer=False,
                          config_updates={"torch_dtype": "bfloat16"}) as w:
        w.add("x", torch.zeros(1))
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert "config.json" in names and not any("tokenizer" in n for n in names)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("64kb") == 64_000
    assert parse_size(123) == 123
    for bad in ["2XB", "-1", 0, "GB"]:
        with pytest.raises(ValueError):
            parse_size(bad)


def test_default_filter_on_llava_names(tiny_llava):
    f = NameFilter()
    names = CheckpointReader(tiny_llava).keys()
    merged = [n for n in names if f.merged(n)]
    assert merged and all("language_model" in n and "layers" in n and n.endswith("proj.weight") for n in merged)
    assert len(merged) == 14
    for n in names:
        if "vision_tower" in n or "multi_modal_projector" in n or "embed_tokens" in n or "lm_head" in n \
                or "norm" in n or n.endswith(".bias"):
            assert not f.merged(n), n
    assert not f.merged("model.mm_projector.0.weight")
    assert not f.merged("model.layers.0.self_attn.q_proj.bias")


def test_filter_precedence():
    f = NameFilter(include=["lm_head"], exclude=[r"layers\.1\.", "lm_head"])
    assert not f.merged("lm_head.weight")  # exclude wins
    f = NameFilter(include=["lm_head", r"layers\.0\.input_layernorm"])
    assert f.merged("lm_head.weight") and f.merged("model.layers.0.input_layernorm.weight")
    assert not f.merged("model.layers.1.input_layernorm.weight")
    assert "include" in f.reason("lm_head.weight") and "default" in f.reason("model.norm.weight")
    g = NameFilter(keep_defaults=False)
    assert g.merged("model.embed_tokens.weight")
    assert NameFilter().with_overrides(exclude=["q_proj"]).merged("model.layers.0.self_attn.q_proj.weight") is False


def test_peft_key_mapping():
    assert peft_key_to_base("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == \
        ("model.layers.0.self_attn.q_proj.weight", "lora_A")
    assert peft_key_to_base("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight") == \
        ("model.layers.3.mlp.down_proj.weight", "lora_B")
    assert peft_key_to_base("base_model.model.model.embed_tokens.lora_embedding_A") == \
        ("model.embed_tokens.weight", "lora_embedding_A")
    assert peft_key_to_base("base_model.model.lm_head.weight") is None


def _peft_delta(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    return {k: merged[k] - ref[k] for k in ref}


def test_lora_delta_matches_peft(tiny_llama, tiny_lora_adapters):
    a = LoraAdapter(tiny_lora_adapters[0])
    want = _peft_delta(tiny_llama, tiny_lora_adapters[0])
    assert len(a.targets()) == 6
    changed = sorted(k for k, v in want.items() if v.abs().max() > 0)
    assert a.targets() == changed
    for name in a.targets():
        assert a.scale(name) == 8 / 4
        assert a.delta_shape(name) == tuple(want[name].shape)
        assert torch.allclose(a.delta(name), want[name], atol=1e-6)
        A, B, s = a.factors(name)
        assert A.shape[0] == 4 and B.shape[1] == 4
        assert torch.allclose(s * B @ A, want[name], atol=1e-6)


def test_lora_rslora_and_embedding_match_peft(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(7)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["o_proj", "embed_tokens"],
                                      rank_pattern={"o_proj": 2}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "ad")
    a = LoraAdapter(tmp_path / "ad")
    want = _peft_delta(tiny_llama, tmp_path / "ad")
    o = "model.layers.0.self_attn.o_proj.weight"
    assert a.rank(o) == 2 and a.scale(o) == pytest.approx(16 / math.sqrt(2))
    assert "model.embed_tokens.weight" in a.targets()
    for name in a.targets():
        assert torch.allclose(a.delta(name), want[name], atol=1e-6), name


def test_lora_unsupported_dora(tiny_lora_adapters, tmp_path):
    d = tmp_path / "dora"
    shutil.copytree(tiny_lora_adapters[0], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="DoRA"):
        LoraAdapter(d)


@pytest.mark.parametrize("mmap", [True, False])
def test_reading_never_writes(tiny_llama, tiny_lora_adapters, tmp_path, mmap):
    """Even writing into the returned tensors leaves the files alone (on a copy of the fixture)."""
    folder = shutil.copytree(tiny_llama, tmp_path / "copy")
    before = tree_digest(folder), tree_digest(tiny_lora_adapters[0])
    r = CheckpointReader(folder, mmap=mmap)
    for k in r.keys():
        t = r.get(k)
        if t.is_floating_point():
            t.add_(1.0)
    r.close()
    list(LoraAdapter(tiny_lora_adapters[0], mmap=mmap).deltas())
    assert before == (tree_digest(folder), tree_digest(tiny_lora_adapters[0]))


def test_reader_mmap_false_equals_mmap(tiny_llama):
    a, b = CheckpointReader(tiny_llama), CheckpointReader(tiny_llama, mmap=False)
    for k in a.keys():
        assert torch.equal(a.get(k), b.get(k))


def test_single_safetensors_file(tmp_path):
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    r = CheckpointReader(tmp_path / "x.safetensors")
    assert r.keys() == ["a", "b"] and r.info("b").dtype == torch.bfloat16 and r.config is None
