"""The streaming merge engine, with a stand-in method registry (see conftest.standin_methods)."""
from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (perturb_checkpoint, run_forward_llama, run_forward_llava, standin_methods, state_dict_of,
                      tree_digest)
from safetensors.torch import save_file

from workbench import engine
from workbench.engine import merge, merge_with_report, tensor_generator
from workbench.io.stream import PREFETCH_DEPTH, prefetch
from workbench.io.mmer_store import read_extras
from workbench.io.packing import pack_mask, unpack_mask
from workbench.io import CheckpointReader, CheckpointWriter, NameFilter

REG = standin_methods()


def _cfg(base, experts, out, method="average", **kw):
    return {"method": method, "base": str(base), "experts": [str(e) for e in experts], "output": str(out),
            "device": "cpu", **kw}


def test_weight_average_equals_direct_mean_and_keeps_base(tiny_llama, tiny_llama_experts, tmp_path):
    before = {p: tree_digest(p) for p in [tiny_llama, *tiny_llama_experts]}
    out = merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "m"), methods=REG, progress=False)
    base = state_dict_of(tiny_llama)
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    got = state_dict_of(out)
    flt = NameFilter()
    n_merged = 0
    for k, b in base.items():
        if flt.merged(k):
            n_merged += 1
            want = (exps[0][k].double() + exps[1][k].double() + exps[2][k].double()) / 3
            assert torch.allclose(got[k].double(), want, atol=1e-6), k
            assert not torch.equal(got[k], b)
        else:
            assert torch.equal(got[k], b), f"{k} must be bit-identical to the base"
    assert n_merged == 14  # 7 linear weights x 2 layers
    assert set(got) == set(base)
    logits = run_forward_llama(out)
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not list(tmp_path.glob("*.tmp-*"))
    assert before == {p: tree_digest(p) for p in [tiny_llama, *tiny_llama_experts]}
    prov = json.loads((out / "workbench_merge.json").read_text())
    assert prov["n_merged"] == 14 and prov["config"]["method"] == "average"


def test_llava_keeps_tower_and_projector(tiny_llava, tiny_llava_experts, tmp_path):
    out = merge(_cfg(tiny_llava, tiny_llava_experts, tmp_path / "m", max_shard_size=20_000), methods=REG,
                progress=False)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    base, got = state_dict_of(tiny_llava), state_dict_of(out)
    for k in base:
        if "vision_tower" in k or "multi_modal_projector" in k or "embed_tokens" in k or k == "lm_head.weight":
            assert torch.equal(got[k], base[k]), k
    q = next(k for k in base if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(got[q], base[q])
    assert torch.isfinite(run_forward_llava(out)).all()


def test_include_exclude_override_defaults(tiny_llama, tiny_llama_experts, tmp_path):
    out = merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "m", include=["lm_head"], exclude=["layers\\.1\\."]),
                methods=REG, progress=False)
    base, got = state_dict_of(tiny_llama), state_dict_of(out)
    assert not torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_generator_depends_only_on_seed_and_name(tiny_llama, tiny_llama_experts, tmp_path):
    full = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "a", method="dare"), methods=REG,
                               progress=False))
    # a different set (and so a different order/position) of merged tensors: the common ones must agree
    part = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "b", method="dare",
                                    exclude=["layers\\.0\\.", "q_proj"]), methods=REG, progress=False))
    other = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "c", method="dare", seed=1),
                                methods=REG, progress=False))
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(full[k], part[k])
    assert not torch.equal(full[k], other[k])
    # and it is the DARE of the stand-in with that tensor's generator
    base = state_dict_of(tiny_llama)
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    want = REG["dare"].fn(base[k], [e[k] for e in exps], generator=tensor_generator(0, k), p=0.5)
    assert torch.allclose(full[k], want, atol=1e-6)


def test_dtype_conversion(tiny_llama, tiny_llama_experts, tmp_path):
    out = merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "m", dtype="bfloat16"), methods=REG,
                progress=False)
    r = CheckpointReader(out)
    assert {r.info(k).dtype for k in r.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    base = state_dict_of(tiny_llama)
    assert torch.equal(r.get("model.norm.weight"), base["model.norm.weight"].to(torch.bfloat16))


def test_sharded_and_bin_inputs_give_same_result(tiny_llama, tiny_llama_experts, tmp_path):
    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded_base"
    LlamaForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    bin_expert = tmp_path / "bin_expert"
    bin_expert.mkdir()
    torch.save(state_dict_of(tiny_llama_experts[0]), bin_expert / "pytorch_model.bin")
    (bin_expert / "config.json").write_text((tiny_llama / "config.json").read_text())
    ref = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "ref"), methods=REG, progress=False))
    got = state_dict_of(merge(_cfg(sharded, [bin_expert, *tiny_llama_experts[1:]], tmp_path / "got"), methods=REG,
                              progress=False))
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_mask_extras_saved_packed(tiny_llama, tiny_llama_experts, tmp_path):
    out = merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "m", method="masked"), methods=REG, progress=False)
    masks = read_extras(out / "mmer")
    meta = json.loads((out / "mmer" / "mmer.json").read_text())
    base = state_dict_of(tiny_llama)
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    k = "model.layers.0.self_attn.v_proj.weight"
    taus = [e[k] - base[k] for e in exps]
    star = sum(taus)
    kept_total = [0, 0, 0]
    numel = 0
    for name in base:
        if not NameFilter().merged(name):
            assert f"{name}::mask_0" not in masks
            continue
        t = [e[name] - base[name] for e in exps]
        s = sum(t)
        numel += base[name].numel()
        for i in range(3):
            kept_total[i] += int((t[i].abs() > (t[i] - s).abs()).sum())
    for i in range(3):
        want = taus[i].abs() > (taus[i] - star).abs()
        assert torch.equal(masks[f"{k}::mask_{i}"], want)
        assert meta["density_per_tensor"][f"mask_{i}"][k] == pytest.approx(want.float().mean().item())
        assert meta["density"][f"mask_{i}"] == pytest.approx(kept_total[i] / numel)
    # packed: one byte per 8 entries on disk
    from safetensors import safe_open

    with safe_open(str(out / "mmer" / "masks.safetensors"), "pt") as f:
        assert f.get_tensor(f"{k}::mask_0").numel() == (base[k].numel() + 7) // 8


def test_pack_mask_matches_numpy():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 13, generator=g) > 0.5
    packed = pack_mask(m)
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(unpack_mask(packed, (5, 13)), m)


def test_lora_experts_product_average(tiny_llama, tiny_lora_adapters, tmp_path):
    """NaiveMC on LoRA experts: base + mean(s B A), checked against peft's merge_and_unload."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = merge(_cfg(tiny_llama, tiny_lora_adapters, tmp_path / "m"), methods=REG, progress=False)
    got = state_dict_of(out)
    base = state_dict_of(tiny_llama)
    merged_by_peft = []
    for a in tiny_lora_adapters:
        m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), a).merge_and_unload()
        merged_by_peft.append({k: v.detach() for k, v in m.state_dict().items()})
    k = "model.layers.1.self_attn.q_proj.weight"
    want = (merged_by_peft[0][k] + merged_by_peft[1][k]) / 2
    assert torch.allclose(got[k], want, atol=1e-6)
    assert not torch.allclose(got[k], base[k], atol=1e-4)
    untouched = "model.layers.1.self_attn.k_proj.weight"  # not a LoRA target: equals the base
    assert torch.equal(got[untouched], base[untouched])
    assert torch.isfinite(run_forward_llama(out)).all()


def test_global_trim_threshold_is_exact(tiny_llama, tiny_llama_experts, tmp_path):
    density = 0.1
    rep = merge_with_report(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "m", method="ties",
                                 params={"density": density, "trim": "global"}), methods=REG, progress=False)
    base = state_dict_of(tiny_llama)
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    names = [n for n in sorted(base) if NameFilter().merged(n)]
    assert names == rep.merged
    thresholds = []
    for e in exps:
        allabs = torch.cat([(e[n] - base[n]).abs().reshape(-1) for n in names])
        k = int(np.ceil(density * allabs.numel()))
        thresholds.append(allabs.sort(descending=True).values[k - 1].item())
    assert rep.thresholds == pytest.approx(thresholds, rel=0, abs=0)
    # the merge used those thresholds: TIES without further trimming on globally trimmed experts
    got = state_dict_of(rep.output)
    n = names[3]
    trimmed = [base[n] + torch.where((e[n] - base[n]).abs() >= t, e[n] - base[n], 0.0)
               for e, t in zip(exps, thresholds)]
    want = REG["ties"].fn(base[n], trimmed, density=1.0)
    assert torch.allclose(got[n], want, atol=1e-6)
    # globally trimmed differs from per-tensor trimmed
    per_tensor = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "p", method="ties",
                                          params={"density": density}), methods=REG, progress=False))
    assert any(not torch.equal(per_tensor[x], got[x]) for x in names)


def _many_tensor_model(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 16, generator=g) for i in range(n)},
              str(folder / "model.safetensors"))
    return folder


def test_memory_bounded_by_a_few_tensors(tmp_path, monkeypatch):
    """Count tensors alive at once among those read from inputs and handed to the writer."""
    n = 120
    base = _many_tensor_model(tmp_path / "base", n, 0)
    experts = [_many_tensor_model(tmp_path / f"e{i}", n, i + 1) for i in range(3)]
    lock = threading.Lock()
    live = {"now": 0, "max": 0, "total": 0}

    def track(t):
        with lock:
            live["now"] += 1
            live["total"] += 1
            live["max"] = max(live["max"], live["now"])

        def gone():
            with lock:
                live["now"] -= 1
        weakref.finalize(t, gone)
        return t

    orig_get, orig_add = CheckpointReader.get, CheckpointWriter.add
    monkeypatch.setattr(CheckpointReader, "get", lambda self, name: track(orig_get(self, name)))
    monkeypatch.setattr(CheckpointWriter, "add", lambda self, name, t: orig_add(self, name, track(t)))
    out = merge(_cfg(base, experts, tmp_path / "out"), methods=REG, progress=False)
    assert live["total"] >= n * 5  # 4 reads + 1 write per tensor: the instrumentation saw them
    # prefetch depth 2 + the unit being computed + the one being read, 4 inputs each, + the output
    bound = (PREFETCH_DEPTH + 2) * 4 + 2
    assert live["max"] <= bound, live
    assert len(CheckpointReader(out)) == n


def test_prefetch_propagates_errors_and_stops():
    calls = []

    def read(name, merged):
        calls.append(name)
        if name == "bad":
            raise RuntimeError("boom")
        return name

    with pytest.raises(RuntimeError, match="boom"):
        list(prefetch([[("a", True)], [("bad", True)], [("c", True)]], read))
    gen = prefetch([[(str(i), True)] for i in range(100)], read)
    calls.clear()
    assert next(gen) == ["0"]
    gen.close()
    assert len(calls) <= 5  # stopped early: read ahead at most a few units


def test_writer_plan_any_order(tmp_path):
    ts = {f"t{i}": torch.randn(3, i + 1) for i in range(6)}
    ts["ints"] = torch.arange(5, dtype=torch.int64)
    ts["half"] = torch.randn(7).half()
    plan = [(k, tuple(v.shape), v.dtype) for k, v in sorted(ts.items())]
    with CheckpointWriter(tmp_path / "o", plan=plan, max_shard_bytes=40) as w:
        for k in reversed(sorted(ts)):
            w.add(k, ts[k])
    from safetensors.torch import load_file

    files = sorted((tmp_path / "o").glob("*.safetensors"))
    assert len(files) > 1
    loaded = {}
    for f in files:
        loaded.update(load_file(str(f)))
    assert set(loaded) == set(ts) and all(torch.equal(loaded[k], ts[k]) for k in ts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_llama, tiny_llama_experts, tmp_path):
    cpu = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "c", method="dare"), methods=REG,
                              progress=False))
    gpu = state_dict_of(merge({**_cfg(tiny_llama, tiny_llama_experts, tmp_path / "g", method="dare"),
                               "device": "cuda"}, methods=REG, progress=False))
    for k in cpu:  # CUDA and CPU generators differ: the dropped entries differ, but statistics agree
        assert torch.isfinite(gpu[k]).all()
    avg_c = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "ac"), methods=REG, progress=False))
    avg_g = state_dict_of(merge({**_cfg(tiny_llama, tiny_llama_experts, tmp_path / "ag"), "device": "cuda"},
                                methods=REG, progress=False))
    for k in avg_c:
        assert torch.allclose(avg_c[k], avg_g[k], atol=1e-6), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_path_equals_per_tensor(tiny_llama, tiny_llama_experts, tmp_path):
    calls = []

    def batched(bases, experts, *, names, generators, **params):
        calls.append(len(names))
        return torch.stack(list(experts)).mean(0)

    reg = dict(REG)
    spec = type(REG["average"])("average", REG["average"].fn, batched_fn=batched)
    reg["average"] = spec
    got = state_dict_of(merge({**_cfg(tiny_llama, tiny_llama_experts, tmp_path / "g"), "device": "cuda"},
                              methods=reg, progress=False))
    ref = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "c"), methods=REG, progress=False))
    assert calls and max(calls) > 1
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k


def test_lora_modules_to_save_and_embedding(tiny_llama, tiny_lora_adapters, tmp_path):
    """Replacement weights (modules_to_save, saved embedding base layers) and embedding LoRA, vs peft."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    m = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "embed_tokens"],
                                  modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.1)
            if "modules_to_save" in n:
                p.add_(0.05)
    m.save_pretrained(tmp_path / "ad")
    out = merge(_cfg(tiny_llama, [tmp_path / "ad", tiny_lora_adapters[0]], tmp_path / "m", keep_defaults=False),
                methods=REG, progress=False)
    got = state_dict_of(out)
    ref = []
    for a in [tmp_path / "ad", tiny_lora_adapters[0]]:
        pm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_llama), a).merge_and_unload()
        ref.append({k: v.detach() for k, v in pm.state_dict().items()})
    for k in ["lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]:
        assert torch.allclose(got[k], (ref[0][k] + ref[1][k]) / 2, atol=1e-6), k
    assert not torch.allclose(got["lm_head.weight"], state_dict_of(tiny_llama)["lm_head.weight"], atol=1e-3)


# ------------------------------------------------------------------------------ with the real registry
from workbench import merging


def test_real_ties_global_trim_matches_methods_reference(tiny_llama, tiny_llama_experts, tmp_path):
    density = 0.15
    rep = merge_with_report(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "m", method="ties",
                                 params={"density": density, "trim": "global"}), progress=False)
    base = state_dict_of(tiny_llama)
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    names = rep.merged
    ref = merging.global_trim_thresholds(([e[n] - base[n] for e in exps] for n in names), density)
    assert rep.thresholds == ref  # two independent exact computations
    got = state_dict_of(rep.output)
    for n in names[:4]:
        want = merging.ties(base[n], [e[n] for e in exps], density=density, trim="global", thresholds=ref)
        assert torch.allclose(got[n], want, atol=1e-6), n
    assert json.loads((rep.output / "workbench_merge.json").read_text())["params_used"]["trim"] == "global"


def test_real_mmer_masks_saved(tiny_llava, tiny_llava_experts, tmp_path):
    from workbench.io.packing import unpack_mask
    from workbench.merging import mmer_masks

    out = merge(_cfg(tiny_llava, tiny_llava_experts, tmp_path / "m", method="mmer"), progress=False)
    masks = read_extras(out / "mmer")
    base = state_dict_of(tiny_llava)
    exps = [state_dict_of(e) for e in tiny_llava_experts]
    merged = [n for n in base if NameFilter().merged(n)]
    assert {k.split("::")[0] for k in masks} == set(merged)
    n = merged[5]
    taus = torch.stack([e[n] - base[n] for e in exps])
    star = merging.ties_merge_tau(taus, 0.2)
    want = mmer_masks(taus, star, 1.0)
    for i in range(3):
        assert torch.equal(masks[f"{n}::mask_{i}"], want[i])
    # the packing is the masks module's format
    from safetensors import safe_open

    with safe_open(str(out / "mmer" / "masks.safetensors"), "pt") as f:
        assert torch.equal(unpack_mask(f.get_tensor(f"{n}::mask_1"), base[n].shape), want[1])
    meta = json.loads((out / "mmer" / "mmer.json").read_text())
    assert set(meta["density"]) == {"mask_0", "mask_1", "mask_2"}
    assert all(0.0 < d < 1.0 for d in meta["density"].values())


def test_real_dare_ties_global_trim_runs_and_is_seeded(tiny_llama, tiny_llama_experts, tmp_path):
    cfg = _cfg(tiny_llama, tiny_llama_experts, tmp_path / "a", method="dare_ties",
               params={"trim": "global", "density": 0.3, "drop_rate": 0.2})
    a = state_dict_of(merge(cfg, progress=False))
    b = state_dict_of(merge({**cfg, "output": str(tmp_path / "b")}, progress=False))
    c = state_dict_of(merge({**cfg, "output": str(tmp_path / "c"), "seed": 5}, progress=False))
    k = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k])


@pytest.mark.parametrize("method", ["wudi", "optmerge"])
def test_batched_path_equals_per_tensor_on_cpu(method, tiny_llama, tiny_llama_experts, tmp_path, monkeypatch):
    """The CUDA batching logic (grouping by shape, batch size, batched_fn) exercised on CPU."""
    calls = []
    spec = merging.get_method(method)
    orig = spec.batched_fn

    def spy(base, experts, **kw):
        calls.append((tuple(base.shape), kw["names"]))
        return orig(base, experts, **kw)

    reg = {method: type(spec)(**{**spec.__dict__, "batched_fn": spy})}
    params = {"steps": 20, "lr": 1e-3}
    ref = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "ref", method=method, params=params),
                              methods=reg, progress=False))
    assert not calls  # CPU: per tensor
    monkeypatch.setattr(engine, "use_batched", lambda spec, device: True)
    got = state_dict_of(merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "b", method=method, params=params,
                                   batch_size=3), methods=reg, progress=False))
    assert calls and max(len(n) for _, n in calls) == 3  # batches of up to 3 same-shape tensors
    assert all(len({tuple(ref[x].shape) for x in names}) == 1 for _, names in calls)
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k


def test_global_trim_expert_and_thresholds_are_exact():
    """The engine's in-place global trim is bit-identical to ``b + where(|e - b| >= t, e - b, 0)``, and its
    streaming thresholds (bit-pattern histogram) equal the exact reference, subnormals and ties included."""
    from workbench import merging as M
    from workbench.engine import _trim_expert, global_trim_thresholds
    from workbench.io.stream import StreamItem

    g = torch.Generator().manual_seed(0)
    b = torch.randn(1000, generator=g)
    b[::7] = -0.0
    e = b + torch.randn(1000, generator=g) * (torch.rand(1000, generator=g) > 0.3)
    e[::11] = -0.0
    for t in (0.0, -1.0, 0.3, 1.0):
        want = b + torch.where((e - b).abs() >= t, e - b, torch.zeros(()))
        assert torch.equal(_trim_expert(e, b, t).view(torch.int32), want.view(torch.int32)), t
    for scale in (1.0, 1e-12, 1e-40):  # 1e-40: subnormal task vectors, all in the lowest bins
        items = []
        for j, sh in enumerate([(50, 40), (7,), (300, 33), (1, 1)]):
            base = torch.randn(sh, generator=g)
            ex = [base + (torch.randn(sh, generator=g) * 3).round() * scale * (torch.rand(sh, generator=g) < 0.6)
                  for _ in range(3)]
            items.append(StreamItem(f"t{j}", True, base, ex))
        by = {it.name: it for it in items}
        for d in (0.01, 0.2, 0.5, 0.9, 1.0):
            got = global_trim_thresholds([[(it.name, True)] for it in items], lambda n, m: by[n], 3, d,
                                         torch.device("cpu"), progress=False)
            want = M.global_trim_thresholds([[x.float() - it.base for x in it.experts] for it in items], d)
            assert got == want, (scale, d)


# ============================================================================================ one loop, two ends
@pytest.mark.parametrize("method,params", [("weight_average", {}), ("ties", {"density": 0.3}), ("dare_ties", {"drop_rate": 0.5}),
                                           ("mmer", {"lam": 1.0})])
def test_folder_and_memory_merges_are_the_same_tensors(tiny_llama, tiny_llama_experts, tiny_lora_adapters, method,
                                                       params, tmp_path):
    """stream_merge from checkpoint folders to a folder and from a state dict in memory: bit-equal (float32 in,
    float32 out; DARE's draws seeded by (seed, name) alike), MMER's extras too; LoRA experts as well."""
    from workbench.engine import merge_into
    from workbench.io import DEFAULT_KEEP, open_expert

    for i, experts in enumerate([tiny_llama_experts[:2], tiny_lora_adapters]):
        out = merge(_cfg(tiny_llama, experts, tmp_path / f"m{i}", method=method, params=params, seed=3),
                    progress=False)
        base = state_dict_of(tiny_llama)
        sink = merge_into(base, [open_expert(p) for p in experts], method, params, keep=DEFAULT_KEEP, seed=3)
        on_disk = state_dict_of(out)
        assert set(on_disk) == set(base)
        for k, v in on_disk.items():
            assert base[k].dtype == v.dtype and torch.equal(base[k], v), k
        if method == "mmer":
            extras = read_extras(out / "mmer")
            assert set(extras) == set(sink.extras.tensors) and extras
            for key, m in extras.items():
                assert torch.equal(pack_mask(m), sink.extras.tensors[key]), key


def test_memory_merge_properties(tiny_llama, tiny_llama_experts):
    """Identical experts give that expert (float rounding of the float32 mean), lambda = 0 the base
    (bit for bit), and the task-vector sink leaves the base untouched."""
    from workbench.compose import merge_llm
    from workbench.engine import merge_into
    from workbench.io import open_expert

    base, e1 = state_dict_of(tiny_llama), state_dict_of(tiny_llama_experts[0])
    same = merge_llm(tiny_llama, [tiny_llama_experts[0]] * 3).state_dict()
    for k, v in e1.items():
        torch.testing.assert_close(same[k], v, rtol=1e-6, atol=1e-7)
    zero = merge_llm(tiny_llama, tiny_llama_experts[:2], coefficients=[0.0, 0.0]).state_dict()
    for k, v in base.items():
        assert torch.equal(zero[k], v), k
    held = {k: v.clone() for k, v in base.items()}
    sink = merge_into(held, [open_expert(tiny_llama_experts[0])], "task_arithmetic", task_vectors=True)
    for k, v in base.items():
        assert torch.equal(held[k], v)
        assert torch.equal(sink.tensors[k], e1[k] - v), k
