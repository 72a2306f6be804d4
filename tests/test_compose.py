"""Composition: NaiveMC, DAMC, MMER and the LLaVA loader, checked against direct computations on the
tiny random Llama / LLaVA fixtures (conftest) and separately materialised models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import standin_methods, state_dict_of
from safetensors.torch import load_file
from torch import nn

from workbench.compose import (compose_damc, compose_expert, compose_frozen, compose_mmer,
                               compose_naive_mc, disk_bytes, family_expert, hf_expert,
                               load_causal_lm, merge_llm, mmer_mask, mmer_parts,
                               mmer_parts_from_merge, set_damc_coefficients, set_mmer_alpha,
                               storage_comparison, ExpertSource)
from workbench.io.mmer_store import MMERParts, read_parts, write_parts
from workbench.studies.search import damc_lambda_search, lambda_grid
from workbench.errors import CheckpointError, ConfigError
from workbench.families import FamilyCheckpoint
from workbench.io.packing import pack_mask
from workbench.routing import (add_lora_routes, materialize_route, route_parameters, routed_modules,
                               save_route_adapter, token_routes)

torch.set_num_threads(1)
PH = {"image": "w61", "audio": "w62"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ToyTower(nn.Module):
    """raw [3, 6] -> [3, hidden] (a frozen linear map)."""

    supports_batch = True

    def __init__(self, seed: int, hidden: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(6, hidden)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(hidden, 6, generator=g))

    def forward(self, x):
        return self.lin(x)


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def raw(seed):
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))


def two_modal_prompt():
    return "image: w61 w9 audio: w62 w10 w11", {"image": [raw(1)], "audio": [raw(2)]}


def logits_all_route(model, prompt, inputs, route):
    emb, mask, rid = model.embed(prompt, inputs)
    with torch.no_grad(), token_routes(model.llm, torch.full_like(rid, route)):
        return model.llm(inputs_embeds=emb, attention_mask=mask).logits


def plain_logits(llm, model, prompt, inputs):
    emb, mask, _ = model.embed(prompt, inputs)
    with torch.no_grad():
        return llm(inputs_embeds=emb, attention_mask=mask).logits


def llm_with(base_folder, weights: dict):
    llm = load_causal_lm(base_folder)
    sd = llm.state_dict()
    for k, v in weights.items():
        sd[k] = v.to(sd[k].dtype)
    llm.load_state_dict(sd)
    return llm


# ============================================================================================ NaiveMC
def test_naive_mc_full_equals_direct_mean(tiny_llama, tiny_llama_experts):
    exps = [hf_expert(f"e{i}", m, ToyTower(i), llm=p, placeholder=PH[m])
            for i, (m, p) in enumerate(zip(["image", "audio"], tiny_llama_experts[:2]))]
    model = compose_naive_mc(tiny_llama, exps, tokenizer_of(tiny_llama))
    a, b = state_dict_of(tiny_llama_experts[0]), state_dict_of(tiny_llama_experts[1])
    got = model.llm.state_dict()
    for k in a:
        torch.testing.assert_close(got[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)
    out = model.generate(*two_modal_prompt(), max_new_tokens=4)
    assert isinstance(out, str)
    assert model.route_order == ["image", "audio"]


def test_device_map_is_passed_to_from_pretrained_and_composes(tiny_llama, tiny_llama_experts, damc_pair, monkeypatch):
    """accelerate's device_map on the CPU (multi-GPU placement is the same call, untested here)."""
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    tok = tokenizer_of(tiny_llama)
    exps = _mmer_experts(tiny_llama_experts)
    ref = compose_naive_mc(tiny_llama, exps, tok)
    mapped = compose_naive_mc(tiny_llama, exps, tok, device_map={"": "cpu"})
    assert seen == [None, {"": "cpu"}]
    for k, v in ref.llm.state_dict().items():
        assert torch.equal(mapped.llm.state_dict()[k], v)
    prompt, inputs = two_modal_prompt()
    assert mapped.generate(prompt, inputs, max_new_tokens=4) == ref.generate(prompt, inputs, max_new_tokens=4)
    for build, experts in ((compose_frozen, exps), (compose_mmer, exps), (compose_damc, damc_pair)):
        build(tiny_llama, experts, tok, device_map={"": "cpu"})
    assert seen[2:] == [{"": "cpu"}] * 3


def test_naive_mc_matches_registry_weight_average(tiny_llama, tiny_llama_experts):
    from workbench import merging
    ours = merge_llm(tiny_llama, tiny_llama_experts)
    theirs = merge_llm(tiny_llama, tiny_llama_experts, method=lambda b, e, **kw: merging.get_method("weight_average").fn(b, e, **kw))
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs.state_dict()[k], rtol=0, atol=1e-6)


def _peft_factors(folder):
    sd = load_file(str(Path(folder) / "adapter_model.safetensors"))
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k:
            mod = k.replace("base_model.model.", "").split(".lora_A.")[0]
            out[mod + ".weight"] = (v, sd[k.replace("lora_A", "lora_B")], s)
    return out


def test_naive_mc_lora_is_product_average_not_factor_average(tiny_llama, tiny_lora_adapters):
    exps = [hf_expert(f"l{i}", m, ToyTower(i), adapter=p, placeholder=PH[m])
            for i, (m, p) in enumerate(zip(["image", "audio"], tiny_lora_adapters))]
    model = compose_naive_mc(tiny_llama, exps, tokenizer_of(tiny_llama))
    base = state_dict_of(tiny_llama)
    f0, f1 = _peft_factors(tiny_lora_adapters[0]), _peft_factors(tiny_lora_adapters[1])
    got = model.llm.state_dict()
    assert set(f0) == set(f1) and len(f0) == 6
    differs = 0
    for k, v in base.items():
        if k in f0:
            (A0, B0, s), (A1, B1, _) = f0[k], f1[k]
            want = v + 0.5 * s * B0 @ A0 + 0.5 * s * B1 @ A1
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
            factor_avg = v + s * ((B0 + B1) / 2) @ ((A0 + A1) / 2)
            differs += int((factor_avg - want).abs().max() > 1e-4)
        else:
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert differs == 6  # averaging A and B separately is a different model on every target


def test_frozen_and_single_expert(tiny_llama, tiny_llama_experts, tiny_lora_adapters):
    tok = tokenizer_of(tiny_llama)
    exps = [hf_expert("p0", "image", ToyTower(0), placeholder=PH["image"]),
            hf_expert("p1", "audio", ToyTower(1), placeholder=PH["audio"])]
    frozen = compose_frozen(tiny_llama, exps, tok)
    for k, v in state_dict_of(tiny_llama).items():
        assert torch.equal(frozen.llm.state_dict()[k], v)
    single = compose_expert(tiny_llama, hf_expert("l", "image", ToyTower(0), adapter=tiny_lora_adapters[0],
                                                  placeholder=PH["image"]), tok)
    k = "model.layers.0.self_attn.q_proj.weight"
    A, B, s = _peft_factors(tiny_lora_adapters[0])[k]
    torch.testing.assert_close(single.llm.state_dict()[k], state_dict_of(tiny_llama)[k] + s * B @ A, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="two experts for modality"):
        compose_frozen(tiny_llama, [exps[0], exps[0]], tok)


def test_expert_with_missing_tensor_names_file_and_tensor(tiny_llama, tiny_llama_experts, tmp_path):
    from safetensors.torch import save_file

    sd = load_file(str(tiny_llama_experts[0] / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((tiny_llama_experts[0] / "config.json").read_text())
    with pytest.raises(CheckpointError) as ei:
        merge_llm(tiny_llama, [bad, tiny_llama_experts[1]])
    assert "model.layers.1.mlp.up_proj.weight" in str(ei.value) and "bad" in str(ei.value)


# ============================================================================================ MMER
def _mmer_experts(tiny_llama_experts):
    return [hf_expert(f"e{i}", m, ToyTower(i), llm=p, placeholder=PH[m])
            for i, (m, p) in enumerate(zip(["image", "audio"], tiny_llama_experts[:2]))]


def test_mmer_alpha1_all_ones_masks_equals_merged_for_every_route(tiny_llama, tiny_llama_experts):
    exps = _mmer_experts(tiny_llama_experts)
    parts = mmer_parts(tiny_llama, exps, merge_method="weight_average")
    ones = MMERParts(parts.tau_star, {n: [pack_mask(torch.ones_like(t, dtype=torch.bool))] * 2
                                      for n, t in parts.tau_star.items()}, 2)
    tok = tokenizer_of(tiny_llama)
    model = compose_mmer(tiny_llama, exps, tok, parts=ones, alpha=1.0)
    base = state_dict_of(tiny_llama)
    merged = llm_with(tiny_llama, {k: base[k] + t for k, t in parts.tau_star.items()})
    prompt, inputs = two_modal_prompt()
    want = plain_logits(merged, model, prompt, inputs)
    for route in (0, 1, 2):
        torch.testing.assert_close(logits_all_route(model, prompt, inputs, route), want, rtol=1e-4, atol=1e-5)
    # mixed routes (the real per-token routing) too: every route is the same model here
    emb, mask, rid = model.embed(prompt, inputs)
    assert set(rid.unique().tolist()) == {0, 1, 2}
    with torch.no_grad(), token_routes(model.llm, rid):
        torch.testing.assert_close(model.llm(inputs_embeds=emb, attention_mask=mask).logits, want,
                                   rtol=1e-4, atol=1e-5)


def test_mmer_single_route_reproduces_theta0_plus_alpha_mask_tau(tiny_llama, tiny_llama_experts):
    exps = _mmer_experts(tiny_llama_experts)
    tok = tokenizer_of(tiny_llama)
    model = compose_mmer(tiny_llama, exps, tok, merge_method="weight_average", lam=1.0, alpha=0.7)
    parts = model.mmer_parts
    base, e1 = state_dict_of(tiny_llama), state_dict_of(tiny_llama_experts[1])
    # independent reference for route 2 (audio = expert 1): linear targets θ0 + α m ⊙ τ*, others θ0 + τ*
    ref_w = {}
    for k, b in base.items():
        tau1 = e1[k] - b
        ts = (state_dict_of(tiny_llama_experts[0])[k] - b + tau1) / 2
        torch.testing.assert_close(parts.tau_star[k], ts, rtol=0, atol=1e-6)
        if any(t in k for t in TARGETS):
            m = tau1.abs() > (tau1 - ts).abs()
            assert torch.equal(parts.mask(k, 1), m)
            ref_w[k] = b + 0.7 * m * ts
        else:
            ref_w[k] = b + ts
    w = materialize_route(model.llm, 2)
    for k, v in w.items():
        torch.testing.assert_close(v, ref_w[k], rtol=0, atol=1e-6)
    ref = llm_with(tiny_llama, ref_w)
    prompt, inputs = two_modal_prompt()
    torch.testing.assert_close(logits_all_route(model, prompt, inputs, 2), plain_logits(ref, model, prompt, inputs),
                               rtol=1e-4, atol=1e-5)
    # alpha is changed in place
    set_mmer_alpha(model, 1.3)
    k = "model.layers.0.mlp.gate_proj.weight"
    torch.testing.assert_close(materialize_route(model.llm, 2)[k], base[k] + 1.3 * parts.mask(k, 1) * parts.tau_star[k],
                               rtol=0, atol=1e-6)
    # text route is θ0 + τ*, and generation with both modalities returns text
    torch.testing.assert_close(materialize_route(model.llm, 0)[k], base[k] + parts.tau_star[k], rtol=0, atol=1e-6)
    assert isinstance(model.generate(prompt, inputs, max_new_tokens=4), str)


def test_mmer_mask_rule_minimises_l1():
    g = torch.Generator().manual_seed(0)
    tau, ts = torch.randn(50, generator=g), torch.randn(50, generator=g)
    m = mmer_mask(tau, ts, 1.0)
    # element-wise: keeping τ* is better exactly where |τ − τ*| < |τ − 0|
    assert torch.equal(m, (tau - ts).abs() < tau.abs())
    assert (mmer_mask(tau, ts, 2.0).sum() <= m.sum()) and (mmer_mask(tau, ts, 0.5).sum() >= m.sum())


def test_mmer_parts_from_engine_output(tiny_llama, tiny_llama_experts, tmp_path):
    from workbench.engine import merge
    from workbench.io.mmer_store import read_extras

    out = merge({"method": "masked", "base": str(tiny_llama), "experts": [str(p) for p in tiny_llama_experts[:2]],
                 "output": str(tmp_path / "m"), "device": "cpu", "params": {"lam": 1.0}},
                methods=standin_methods(), progress=False)
    parts = mmer_parts_from_merge(out, tiny_llama)
    assert parts.n_experts == 2
    merged, base, masks = state_dict_of(out), state_dict_of(tiny_llama), read_extras(out / "mmer")
    for k, t in parts.tau_star.items():
        torch.testing.assert_close(t, merged[k] - base[k], rtol=0, atol=0)
        for i in range(2):
            assert torch.equal(parts.mask(k, i), masks[f"{k}::mask_{i}"])
    model = compose_mmer(tiny_llama, _mmer_experts(tiny_llama_experts), tokenizer_of(tiny_llama), parts=parts)
    k = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(materialize_route(model.llm, 1)[k], base[k] + masks[f"{k}::mask_0"] * parts.tau_star[k])


def test_storage_measures_files(tiny_llama, tiny_llama_experts, tmp_path):
    parts = mmer_parts(tiny_llama, tiny_llama_experts, merge_method="weight_average")
    folder = write_parts(parts, tmp_path / "mmer")
    files = list(folder.iterdir())
    assert disk_bytes(folder) == sum(os.path.getsize(f) for f in files)
    n = sum(t.numel() for t in parts.tau_star.values())
    # τ* in float32 plus one bit per entry per expert (+ headers)
    assert 4 * n <= disk_bytes(folder / "tau_star.safetensors") < 4 * n + 20_000
    assert 3 * n / 8 <= disk_bytes(folder / "masks.safetensors") < 3 * n / 8 + 3 * len(parts.tau_star) + 40_000
    rep = storage_comparison([folder], tiny_llama_experts)
    assert rep["experts_bytes"] == sum(disk_bytes(p) for p in tiny_llama_experts)
    assert 0.33 < rep["ratio"] < 0.50  # ~ (1 + 3/32) / 3
    back = read_parts(folder)
    for k in parts.tau_star:
        assert torch.equal(back.tau_star[k], parts.tau_star[k])
        assert torch.equal(back.mask(k, 2), parts.mask(k, 2))


# ============================================================================================ DAMC
def make_damc_adapters(base_folder, root: Path, seed: int, r=4, alpha=8):
    """A DAMC expert's two peft adapters (random non-zero factors) written via save_route_adapter."""
    llm = load_causal_lm(base_folder)
    add_lora_routes(llm, 2, r, alpha, list(TARGETS), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for route in (0, 1):
            for p in route_parameters(llm, route):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return save_route_adapter(llm, 0, root / "adapter_text"), save_route_adapter(llm, 1, root / "adapter_modality")


@pytest.fixture(scope="module")
def damc_pair(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("damc")
    exps = []
    for i, m in enumerate(["image", "audio"]):
        t, mo = make_damc_adapters(tiny_llama, root / m, seed=20 + i)
        exps.append(ExpertSource(f"damc-{m}", m, "damc", ToyTower(i), PH[m], adapter_text=t, adapter_modality=mo))
    return exps


def test_damc_routes_equal_direct_formulas(tiny_llama, damc_pair):
    model = compose_damc(tiny_llama, damc_pair, tokenizer_of(tiny_llama), coefficients=[0.3, 0.9])
    base = state_dict_of(tiny_llama)
    ft = [_peft_factors(e.adapter_text) for e in damc_pair]
    fm = [_peft_factors(e.adapter_modality) for e in damc_pair]
    w0, w1, w2 = (materialize_route(model.llm, k) for k in (0, 1, 2))
    assert len(w0) == 14
    for k in w0:
        (At0, Bt0, s), (At1, Bt1, _) = ft[0][k], ft[1][k]
        torch.testing.assert_close(w0[k], base[k] + 0.3 * s * Bt0 @ At0 + 0.9 * s * Bt1 @ At1, rtol=0, atol=1e-6)
        Am, Bm, _ = fm[0][k]
        torch.testing.assert_close(w1[k], base[k] + s * Bm @ Am, rtol=0, atol=1e-6)
        Am, Bm, _ = fm[1][k]
        torch.testing.assert_close(w2[k], base[k] + s * Bm @ Am, rtol=0, atol=1e-6)
    set_damc_coefficients(model, [0.5, 0.5])
    k = "model.layers.1.mlp.down_proj.weight"
    (At0, Bt0, s), (At1, Bt1, _) = ft[0][k], ft[1][k]
    torch.testing.assert_close(materialize_route(model.llm, 0)[k], base[k] + 0.5 * s * (Bt0 @ At0 + Bt1 @ At1),
                               rtol=0, atol=1e-6)
    # per-token: each route's tokens see their own materialised model (whole sequence on one route)
    prompt, inputs = two_modal_prompt()
    ref = llm_with(tiny_llama, materialize_route(model.llm, 2))
    torch.testing.assert_close(logits_all_route(model, prompt, inputs, 2), plain_logits(ref, model, prompt, inputs),
                               rtol=1e-4, atol=1e-5)
    out = model.generate(prompt, inputs, max_new_tokens=5)
    assert isinstance(out, str)
    # memory: only factors are added - no dense weight per route
    extra = sum(b.numel() for m in routed_modules(model.llm).values() for b in m.buffers())
    assert extra == 0


def test_damc_in_bfloat16_builds_one_bf16_llm_and_generates(tiny_llama, damc_pair):
    tok = tokenizer_of(tiny_llama)
    prompt, inputs = two_modal_prompt()
    ref = compose_damc(tiny_llama, damc_pair, tok, coefficients=[0.3, 0.9])
    # fp32 default: the same logits as a composition on an fp32 base module (the code path of before)
    same = compose_damc(load_causal_lm(tiny_llama), damc_pair, tok, coefficients=[0.3, 0.9])
    for route in (0, 1, 2):
        assert torch.equal(logits_all_route(ref, prompt, inputs, route), logits_all_route(same, prompt, inputs, route))
    bf = compose_damc(tiny_llama, damc_pair, tok, coefficients=[0.3, 0.9], dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in bf.llm.parameters()} == {torch.bfloat16}
    assert {t.dtype for m in routed_modules(bf.llm).values() for t in m.parameters()} == {torch.bfloat16}
    for route in (0, 1, 2):
        torch.testing.assert_close(logits_all_route(bf, prompt, inputs, route).float(),
                                   logits_all_route(ref, prompt, inputs, route), rtol=0, atol=0.1)
    assert isinstance(bf.generate(prompt, inputs, max_new_tokens=4), str)


def test_damc_lambda_search_grid_and_csv(tiny_llama, damc_pair, tmp_path):
    model = compose_damc(tiny_llama, damc_pair, tokenizer_of(tiny_llama))
    recs = []
    for i in range(4):
        recs.append({"id": str(i), "conversations": [{"from": "human", "value": f"image: w61 audio: w62 w{12 + i}"},
                                                     {"from": "gpt", "value": "A"}],
                     "_in": {"image": [raw(10 + i)], "audio": [raw(20 + i)]}})
    grid = lambda_grid(2, (0.5, 1.0), mode="product")
    assert len(grid) == 4 and (0.5, 1.0) in grid
    best, df = damc_lambda_search(model, recs, lambda r: r["_in"], grid=grid, csv=tmp_path / "grid.csv", progress=False)
    import pandas as pd

    back = pd.read_csv(tmp_path / "grid.csv")
    assert len(back) == 4 and {"lambda_1", "lambda_2", "accuracy"} <= set(back.columns)
    assert df["accuracy"].max() == df.loc[[tuple(r) == best for r in grid], "accuracy"].iloc[0]
    # the model is left at the best λ
    k = "model.layers.0.self_attn.q_proj.weight"
    ref = compose_damc(tiny_llama, damc_pair, tokenizer_of(tiny_llama), coefficients=list(best))
    torch.testing.assert_close(materialize_route(model.llm, 0)[k], materialize_route(ref.llm, 0)[k])


def test_damc_rejects_plain_experts(tiny_llama, tiny_llama_experts):
    with pytest.raises(ConfigError, match="DAMC composes DAMC experts"):
        compose_damc(tiny_llama, _mmer_experts(tiny_llama_experts), tokenizer_of(tiny_llama))


# ============================================================================================ LLaVA
def test_llava_tower_and_language_model_equal_hf_llava(tiny_llava):
    from transformers import LlavaForConditionalGeneration

    from workbench.mllm import MultimodalLM

    ck = FamilyCheckpoint(tiny_llava)
    tower, lm = ck.tower(), ck.language_model()
    hf = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval()
    cfg = hf.config
    pix = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    n_img = tower(pix).shape[0]
    assert n_img == (16 // 8) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    model = MultimodalLM(lm, tokenizer_of(tiny_llava), {"image": tower}, {"image": "w61"})
    emb, mask, rid = model.embed("w4 w5 w61 w6 w7", {"image": [pix]})
    assert int((rid == 1).sum()) == n_img
    with torch.no_grad():
        got = lm(inputs_embeds=emb, attention_mask=mask).logits
        ids = torch.tensor([[4, 5] + [cfg.image_token_index] * n_img + [6, 7]])
        want = hf(input_ids=ids, pixel_values=pix.unsqueeze(0)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_llava_feature_layer_and_default_strategy(tiny_llava):
    from transformers import LlavaForConditionalGeneration

    ck = FamilyCheckpoint(tiny_llava)
    tower = ck.tower()
    tower.feature_layer, tower.select_strategy = -2, "default"
    hf = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval()
    pix = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=pix, vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")
        want = torch.stack(list(getattr(want, "pooler_output", want)))
        got = tower(pix)
    assert got.shape == (2, 4, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_llava_experts_naive_mmer_damc_generate_two_modalities(tiny_llava, tiny_llava_experts, tmp_path):
    tok = tokenizer_of(tiny_llava)
    e_img = family_expert(tiny_llava_experts[0], modality="image", placeholder="w61", template="{prompt}")
    e_aud = family_expert(tiny_llava_experts[1], modality="audio", placeholder="w62", template="{prompt}")
    prompt = "image: w61 audio: w62 w9 w10"
    inputs = {"image": [torch.randn(3, 16, 16)], "audio": [torch.randn(3, 16, 16)]}
    # NaiveMC over LLaVA language models == mean of the checkpoints' LM tensors (legacy key names)
    naive = compose_naive_mc(tiny_llava, [e_img, e_aud], tok)
    a = load_file(str(tiny_llava_experts[0] / "model.safetensors"))
    b = load_file(str(tiny_llava_experts[1] / "model.safetensors"))
    got = naive.llm.state_dict()
    for k in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        ck = "language_model." + k if not k.startswith("lm_head") else "language_model.lm_head.weight"
        torch.testing.assert_close(got[k], (a[ck] + b[ck]) / 2, rtol=0, atol=1e-6)
    assert isinstance(naive.generate(prompt, inputs, max_new_tokens=4), str)
    # towers are the experts' own, unchanged
    torch.testing.assert_close(naive.towers["image"].projector.linear_1.weight,
                               a["multi_modal_projector.linear_1.weight"])
    mm = compose_mmer(tiny_llava, [e_img, e_aud], tok, merge_method="weight_average")
    assert isinstance(mm.generate(prompt, inputs, max_new_tokens=4), str)
    dm = []
    for i, (p, m) in enumerate(zip(tiny_llava_experts[:2], ["image", "audio"])):
        t, mo = make_damc_adapters(tiny_llava, tmp_path / m, seed=40 + i)
        dm.append(family_expert(p, modality=m, placeholder=PH[m], adapter_text=t, adapter_modality=mo,
                                template="{prompt}"))
    damc = compose_damc(tiny_llava, dm, tok)
    out = damc.generate(prompt, inputs, max_new_tokens=4)
    assert isinstance(out, str)
    _, _, rid = damc.embed(prompt, inputs)
    assert set(rid.unique().tolist()) == {0, 1, 2}


def test_mmer_default_parts_equal_registry_mmer_method(tiny_llama, tiny_llama_experts):
    """The in-memory path (TIES τ*, masks) and the engine's `mmer` method agree tensor by tensor."""
    from workbench.merging import get_method

    parts = mmer_parts(tiny_llama, tiny_llama_experts, lam=1.5)  # default: registry TIES, density 0.2
    base, exps = state_dict_of(tiny_llama), [state_dict_of(p) for p in tiny_llama_experts]
    fn = get_method("mmer").fn
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        out = fn(base[k], [e[k] for e in exps], name=k, density=0.2, lam=1.5)
        torch.testing.assert_close(parts.tau_star[k], out.merged - base[k], rtol=0, atol=1e-6)
        for i in range(3):
            assert torch.equal(parts.mask(k, i), out.extras[f"mask_{i}"])
    dens = parts.density()
    assert len(dens) == 3 and all(0 < d < 1 for d in dens)


def test_engine_mmer_output_equals_in_memory_parts(tiny_llama, tiny_llama_experts, tmp_path):
    """The engine's real `mmer` method (τ* on disk + packed masks) and the streaming in-memory path
    give the same routed model inputs."""
    from workbench.engine import merge

    out = merge({"method": "mmer", "base": str(tiny_llama), "experts": [str(p) for p in tiny_llama_experts[:2]],
                 "output": str(tmp_path / "m"), "device": "cpu", "params": {"lam": 1.0, "density": 0.2}},
                progress=False)
    disk = mmer_parts_from_merge(out, tiny_llama)
    mem = mmer_parts(tiny_llama, tiny_llama_experts[:2], lam=1.0, merge_params={"density": 0.2})
    assert set(disk.tau_star) <= set(mem.tau_star) and len(disk.tau_star) > 0
    for k, t in disk.tau_star.items():
        torch.testing.assert_close(t, mem.tau_star[k], rtol=0, atol=1e-6)
        for i in range(2):
            assert torch.equal(disk.mask(k, i), mem.mask(k, i))


def _synthetic_records(n, prompt_fn, inputs_fn, gold="A"):
    return [{"id": str(i), "conversations": [{"from": "human", "value": prompt_fn(i)}, {"from": "gpt", "value": gold}],
             "_in": inputs_fn(i)} for i in range(n)]


def test_damc_lambda_from_own_tasks_rule_and_csv(tiny_llama, damc_pair, tmp_path):
    import pandas as pd

    from workbench.studies.search import damc_lambda_from_own_tasks

    model = compose_damc(tiny_llama, damc_pair, tokenizer_of(tiny_llama))
    own = {"image": _synthetic_records(3, lambda i: f"image: w61 w{20 + i}", lambda i: {"image": [raw(30 + i)]}),
           "audio": _synthetic_records(3, lambda i: f"audio: w62 w{25 + i}", lambda i: {"audio": [raw(40 + i)]}, "B")}
    best, df = damc_lambda_from_own_tasks(model, own, lambda r: r["_in"], values=(1.0, 0.5), csv=tmp_path / "own.csv",
                                          expert_scores={"image": 50.0, "audio": 100.0}, progress=False)
    back = pd.read_csv(tmp_path / "own.csv")
    assert list(back["lambda"]) == [0.5, 1.0]  # sorted: ties go to the smaller λ
    score = (back["acc_image"] / 50 * 100 + back["acc_audio"] / 100 * 100) / 2
    assert back["score"].tolist() == pytest.approx(score.tolist())
    assert best == (float(back["lambda"][int(score.to_numpy().argmax())]),) * 2


def test_mmer_search_grid_leaves_model_at_best(tiny_llama, tiny_llama_experts, tmp_path):
    from workbench.studies.search import mmer_search

    exps = _mmer_experts(tiny_llama_experts)
    tok = tokenizer_of(tiny_llama)
    model = compose_mmer(tiny_llama, exps, tok, merge_method="weight_average", lam=1.0)
    recs = _synthetic_records(4, lambda i: f"image: w61 audio: w62 w{12 + i}",
                              lambda i: {"image": [raw(50 + i)], "audio": [raw(60 + i)]}, "C")
    (lam, alpha), df = mmer_search(model, tiny_llama, exps, recs, lambda r: r["_in"], lams=(0.5, 2.0),
                                   alphas=(0.5, 1.0), csv=tmp_path / "mmer.csv", progress=False)
    assert len(df) == 4 and (tmp_path / "mmer.csv").is_file()
    assert {"density_image", "density_audio"} <= set(df.columns)
    d = df.set_index("lam")
    assert d.loc[2.0, "density_image"].max() <= d.loc[0.5, "density_image"].min()  # a higher threshold keeps less
    i = int(df["accuracy"].to_numpy().argmax())
    assert (lam, alpha) == (df["lam"][i], df["alpha"][i])
    ref = compose_mmer(tiny_llama, exps, tok, merge_method="weight_average", lam=lam, alpha=alpha)
    k = "model.layers.0.mlp.up_proj.weight"
    for route in (1, 2):
        torch.testing.assert_close(materialize_route(model.llm, route)[k], materialize_route(ref.llm, route)[k])


def test_llava_checkpoint_reads_both_key_layouts(tiny_llava, tmp_path):
    """Legacy keys (language_model.model.*, vision_tower.*) and transformers-5 in-memory keys
    (model.language_model.*, lm_head.weight, model.vision_tower.vision_model.*) give the same parts."""
    import shutil

    from safetensors.torch import save_file

    sd = load_file(str(tiny_llava / "model.safetensors"))
    new = {}
    for k, v in sd.items():
        if k.startswith("language_model.model."):
            new["model.language_model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            new["lm_head.weight"] = v
        elif k.startswith("vision_tower."):
            new["model.vision_tower.vision_model." + k[len("vision_tower."):]] = v
        else:
            new["model." + k] = v
    folder = tmp_path / "v5"
    folder.mkdir()
    save_file(new, str(folder / "model.safetensors"))
    for f in tiny_llava.iterdir():
        if f.suffix == ".json":
            shutil.copy2(f, folder / f.name)
    a, b = FamilyCheckpoint(tiny_llava), FamilyCheckpoint(folder)
    assert a.lm_names() == b.lm_names() and "lm_head.weight" in a.lm_names()
    pix = torch.randn(3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a.tower()(pix), b.tower()(pix), rtol=0, atol=0)
    la, lb = a.language_model().state_dict(), b.language_model().state_dict()
    for k in la:
        assert torch.equal(la[k], lb[k]), k
    # a corrupted layout names the file and tensor
    bad = {k: v for k, v in new.items() if "multi_modal_projector.linear_2.weight" not in k}
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="linear_2.weight"):
        FamilyCheckpoint(folder).tower()


# ============================================================================================ caches
def test_cached_tower_bit_identical_and_shared(tiny_llama):
    """A CachedTower returns exactly the tower's output (a batch is one key), computes each distinct
    input once, and scoring through it equals scoring through the plain tower."""
    from workbench.compose import CachedTokenizer, CachedTower, cached_source

    tower = ToyTower(0).requires_grad_(False)  # frozen, as ExpertSource makes it
    ct = CachedTower(tower)
    assert ct.supports_batch
    x, y = raw(1), torch.stack([raw(2), raw(3)])
    with torch.no_grad():
        assert torch.equal(ct(x), tower(x)) and torch.equal(ct(y), tower(y))
        assert torch.equal(ct(x.clone()), tower(x))  # a copy of the same values hits
        assert torch.equal(ct(raw(4)), tower(raw(4)))
    assert (ct.hits, ct.misses) == (1, 3)
    ct.clear()
    assert ct(x) is not None and ct.misses == 4
    # trainable tower with gradients on: not cached
    trainable = CachedTower(ToyTower(1).requires_grad_(True))
    out = trainable(x)
    assert out.requires_grad and trainable.misses == 0
    # composed models: plain vs cached towers and tokenizer score the same, bit for bit
    tok = tokenizer_of(tiny_llama)
    plain = [hf_expert("i", "image", ToyTower(0), placeholder=PH["image"]),
             hf_expert("a", "audio", ToyTower(1), placeholder=PH["audio"])]
    cached = [cached_source(e) for e in plain]
    assert all(isinstance(e.tower, CachedTower) for e in cached) and cached_source(cached[0]) is cached[0]
    m0 = compose_frozen(tiny_llama, plain, tok)
    m1 = compose_frozen(tiny_llama, cached, CachedTokenizer(tok))
    prompt, inputs = two_modal_prompt()
    for _ in range(2):
        s0 = m0.score_options_batch([prompt, "w9 w10"], [inputs, {}], [["w12", "w13 w14"], ["w15"]])
        s1 = m1.score_options_batch([prompt, "w9 w10"], [inputs, {}], [["w12", "w13 w14"], ["w15"]])
        assert all(torch.equal(a, b) for a, b in zip(s0, s1))
        assert m0.generate_batch([prompt], [inputs], max_new_tokens=3) == m1.generate_batch([prompt], [inputs],
                                                                                              max_new_tokens=3)
    assert cached[0].tower.hits > 0


def _three_compositions(tiny_llama, tiny_llama_experts, damc_pair):
    """A plain (frozen), an MMER (masked routes) and a DAMC (LoRA routes) composition of the tiny experts."""
    tok = tokenizer_of(tiny_llama)
    frozen = compose_frozen(tiny_llama, _mmer_experts(tiny_llama_experts), tok)
    mmer = compose_mmer(tiny_llama, _mmer_experts(tiny_llama_experts), tok, merge_method="weight_average", lam=1.0)
    return frozen, mmer, compose_damc(tiny_llama, damc_pair, tok)


def _prompts_of_four_lengths():
    """Four prompts of different lengths (two modalities, none, one each) and options of 1-3 tokens."""
    prompts = ["image: w61 audio: w62 w12", "w9 w10 w11 w13 w14", "audio: w62 w20", "image: w61"]
    inputs = [{"image": [raw(1)], "audio": [raw(2)]}, {}, {"audio": [raw(3)]}, {"image": [raw(4)]}]
    options = [["w30", "w31 w32", "w33", "w34 w35 w36"], ["w40"], ["w41 w42", "w43"], ["w44", "w45", "w46"]]
    return prompts, inputs, options


def test_towers_on_one_encoder_share_its_outputs():
    """CachedTowers over Towers with the same frozen encoder weights (and their own projectors)
    encode a batch once between them and still return exactly ``projector(encoder(x))``; an encoder
    with other weights does not share; the shared memo stays under its byte bound, oldest out first."""
    from workbench.compose import ENCODER_OUTPUTS, CachedTower, EncoderOutputs
    from workbench.world.encoders import ImageEncoder, Projector, Tower

    torch.manual_seed(0)
    enc = ImageEncoder().eval().requires_grad_(False)
    twin = ImageEncoder().eval().requires_grad_(False)
    twin.load_state_dict(enc.state_dict())  # another module, the same weights
    other = ImageEncoder().eval().requires_grad_(False)
    towers = [Tower(e, Projector(64, 32)).requires_grad_(False) for e in (enc, twin, other)]
    cached = [CachedTower(t) for t in towers]
    x = torch.rand(5, 3, 32, 32)
    ENCODER_OUTPUTS.clear()
    h0, m0 = ENCODER_OUTPUTS.hits, ENCODER_OUTPUTS.misses
    with torch.no_grad():
        for t, c in zip(towers, cached):
            assert torch.equal(c(x), t(x))
            assert torch.equal(c(x[0]), t(x[0]))  # an unbatched input is its own key
    # enc and twin: one encoding per input between them; other: its own
    assert (ENCODER_OUTPUTS.misses - m0, ENCODER_OUTPUTS.hits - h0) == (4, 2)
    memo = EncoderOutputs(max_bytes=3 * 4 * 8)  # room for three [8] float32 tensors
    for i in range(5):
        memo.get(("k", i), lambda i=i: torch.full((8,), float(i)))
    assert memo.bytes <= memo.max_bytes and len(memo._memo) == 3
    assert memo.get(("k", 4), lambda: torch.zeros(8))[0] == 4  # the newest kept
    assert memo.get(("k", 0), lambda: torch.zeros(8))[0] == 0  # the oldest dropped and recomputed
    ENCODER_OUTPUTS.clear()


def test_score_and_generate_equal_the_two_calls(tiny_llama, tiny_llama_experts, damc_pair):
    """One prefill for both scorings gives the option scores of the shared-prefix scorer and the
    greedy answers of generate_batch: bit for bit on the same batch, to float rounding (other left
    padding) and with the same answers on other batches (plain, MMER and DAMC compositions; prompts
    of different lengths); and predict_scorings gives the two predict tables."""
    import pandas as pd

    from workbench.evaluate import predict, predict_scorings

    frozen, mmer, damc = _three_compositions(tiny_llama, tiny_llama_experts, damc_pair)
    prompts, inputs, options = _prompts_of_four_lengths()
    for model in (frozen, mmer, damc):
        ref_scores = model.score_options_batch(prompts, inputs, options, shared_prefix=True)
        ref_texts = model.generate_batch(prompts, inputs, max_new_tokens=4)
        for bs in (1, 3, 16):  # 16: one batch, as both calls run these four prompts
            scores, texts = model.score_and_generate_batch(prompts, inputs, options, max_new_tokens=4, batch_size=bs)
            assert texts == ref_texts
            for a, b in zip(scores, ref_scores):
                assert torch.equal(a, b) if bs == 16 else int(a.argmax()) == int(b.argmax())
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # one-token options (the mini zoo's): scored on the prefill's last logits, the LLM runs once per batch
    one = [["w30", "w33"], ["w40"], ["w43", "w41"], ["w44", "w45", "w46"]]
    calls = []
    handle = mmer.llm.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        got = mmer.score_options_batch(prompts, inputs, one, batch_size=8, shared_prefix=True)
    finally:
        handle.remove()
    assert len(calls) == 2  # two prefills of two prompts, no option pass
    for a, b in zip(got, mmer.score_options_batch(prompts, inputs, one)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    recs = _synthetic_records(6, lambda i: f"image: w61 audio: w62 w{12 + i}",
                              lambda i: {"image": [raw(50 + i)], "audio": [raw(60 + i)]}, "C")
    for r in recs:
        r["choices"] = ["w30", "w31 w32", "w33", "w34"]
    both = predict_scorings(mmer, recs, lambda r: r["_in"], ("loglik", "generate"), method="m", seed=1, batch_size=4)
    for scoring in ("loglik", "generate"):
        pd.testing.assert_frame_equal(both[scoring], predict(mmer, recs, lambda r: r["_in"], scoring=scoring,
                                                             method="m", seed=1, batch_size=4))
    with pytest.raises(ValueError, match="scoring"):
        predict_scorings(mmer, recs, lambda r: r["_in"], ("loglik", "greedy"))


def test_cached_tokenizer_same_ids_and_private_copies(tiny_llama):
    from workbench.compose import CachedTokenizer

    tok = tokenizer_of(tiny_llama)
    ct = CachedTokenizer(tok)
    for text, kw in (("w9 w10 w61", {}), (" w12", {"add_special_tokens": False})):
        a = ct(text, **kw)["input_ids"]
        assert a == tok(text, **kw)["input_ids"]
        a.append(-1)  # the caller's copy: the memo is not touched
        assert ct(text, **kw)["input_ids"] == tok(text, **kw)["input_ids"]
    assert len(ct._memo) == 2
    assert ct(["w9", "w10"])["input_ids"] == tok(["w9", "w10"])["input_ids"]  # other calls pass through
    assert ct.eos_token_id == tok.eos_token_id and ct.convert_tokens_to_ids("w61") == tok.convert_tokens_to_ids("w61")
    assert ct.decode([9, 10]) == tok.decode([9, 10]) and len(ct) == len(tok)


def test_mmer_search_with_preloaded_or_path_base_agree(tiny_llama, tiny_llama_experts):
    from workbench.studies.search import mmer_search

    exps = _mmer_experts(tiny_llama_experts)
    tok = tokenizer_of(tiny_llama)
    recs = _synthetic_records(4, lambda i: f"image: w61 audio: w62 w{12 + i}",
                              lambda i: {"image": [raw(50 + i)], "audio": [raw(60 + i)]}, "C")
    dfs = []
    for base in (tiny_llama, load_causal_lm(tiny_llama)):
        model = compose_mmer(tiny_llama, exps, tok, merge_method="weight_average", lam=1.0)
        _, df = mmer_search(model, base, exps, recs, lambda r: r["_in"], lams=(0.5, 2.0), alphas=(0.5, 1.0),
                            progress=False)
        dfs.append(df)
    import pandas as pd

    pd.testing.assert_frame_equal(dfs[0], dfs[1])


def test_shared_prefix_scores_match_reference(tiny_llama, tiny_llama_experts, damc_pair):
    """The opt-in shared-prefix scorer gives the reference's log-likelihoods (to float rounding) and
    the same predictions, on plain, MMER (masked routes) and DAMC (LoRA routes) compositions, with
    prompts of different lengths and options of different token counts."""
    from workbench.evaluate import predict

    frozen, mmer, damc = _three_compositions(tiny_llama, tiny_llama_experts, damc_pair)
    prompts, inputs, options = _prompts_of_four_lengths()
    for model in (frozen, mmer, damc):
        ref = model.score_options_batch(prompts, inputs, options)
        for bs in (1, 3, 16):
            got = model.score_options_batch(prompts, inputs, options, batch_size=4 * bs, shared_prefix=True)
            for a, b in zip(ref, got):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
                assert int(a.argmax()) == int(b.argmax())
    recs = _synthetic_records(5, lambda i: f"image: w61 audio: w62 w{12 + i}",
                              lambda i: {"image": [raw(50 + i)], "audio": [raw(60 + i)]}, "C")
    for r in recs:
        r["choices"] = ["w30", "w31 w32", "w33", "w34"]
    a = predict(mmer, recs, lambda r: r["_in"], scoring="loglik")
    b = predict(mmer, recs, lambda r: r["_in"], scoring="loglik", shared_prefix=True)
    import pandas as pd

    pd.testing.assert_frame_equal(a, b)
