"""Model families (workbench.families) on tiny random checkpoints of every layout.

Each checkpoint is built with transformers' own config and model classes (workbench.tiny); the
original LLaVA / InternVL layouts are the same weights renamed. Checked against transformers:
the language model we extract gives the family class's text logits, our towers give its
``get_image_features``; merges through the CLI keep exactly the family's kept tensors and load
back into the family's class, which generates; compositions generate with images in the prompt.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from workbench import compose
from workbench.cli import main as cli_main
from workbench.errors import ConfigError
from workbench.families import FAMILIES, FamilyCheckpoint, detect_family, internvl_original_to_hf
from workbench.io import CheckpointReader, NameFilter
from workbench.tiny import IMAGE_SIZE, TINY_KINDS, make_tiny_checkpoint, make_tiny_experts, tiny_model

FAMILY_OF = {"llava": "llava", "llava-original": "llava-original", "qwen2-vl": "qwen2-vl", "qwen2.5-vl": "qwen2-vl",
             "internvl": "internvl", "internvl-original": "internvl-original",
             "internvl-original-internlm2": "internvl-original"}
TEXT = torch.tensor([[1, 20, 21, 22, 23, 24]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per kind: (base folder, [two experts])."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for k in TINY_KINDS:
        base = make_tiny_checkpoint(k, root / k / "base", seed=0)
        out[k] = (base, make_tiny_experts(base, root / k, n=2, seed=1))
    return out


def hf_model(kind: str, folder: Path | None = None):
    """The family's transformers class holding the folder's weights (seed-0 model if no folder);
    original layouts are renamed back to transformers' names first."""
    torch.manual_seed(0)
    model = tiny_model(kind).eval()
    if folder is None:
        return model
    r = CheckpointReader(folder)
    sd = {k: r.get(k) for k in r.keys()}
    if kind.startswith("internvl-original"):
        sd = internvl_original_to_hf(sd, FamilyCheckpoint(folder).config_dict["llm_config"])
    elif kind == "llava-original":
        sd = {re.sub(r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1.",
                     re.sub(r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2.",
                            re.sub(r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower.",
                                   re.sub(r"^model\.(?!vision_tower|mm_projector)", "model.language_model.", k)))): v
              for k, v in sd.items()}
    if kind.startswith(("internvl-original", "llava-original")):
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and not [m for m in missing if "lm_head" not in m], (missing, unexpected)
        return model
    return type(model).from_pretrained(str(folder)).eval()


# ------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_detects_every_layout(tiny, kind):
    assert detect_family(tiny[kind][0]).name == FAMILY_OF[kind]


def test_unknown_multimodal_family_is_a_clear_error_and_text_only_is_generic(tmp_path):
    with pytest.raises(ConfigError) as e:
        detect_family({"model_type": "fancy_vlm", "architectures": ["FancyVLMForConditionalGeneration"],
                       "vision_config": {}})
    msg = str(e.value)
    assert all(name in msg for name in FAMILIES) and "keep_defaults: false" in msg and "exclude" in msg
    assert detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).name == "generic"
    assert detect_family(tmp_path).name == "generic"  # no config.json


# ------------------------------------------------------------------------------------ parts vs transformers
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_language_model_and_tower_match_the_family_class(tiny, kind):
    base = tiny[kind][0]
    ref = hf_model(kind)  # the seed-0 model the base was saved from
    ck = FamilyCheckpoint(base)
    lm = ck.language_model()
    with torch.no_grad():
        want = ref(input_ids=TEXT).logits
        got = lm(input_ids=TEXT).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = ck.tower()(img)
        if kind.startswith("qwen"):
            tower = ck.tower()
            enc = tower.processor(img, return_tensors="pt")
            ref_feats = ref.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output[0]
        else:
            ref_feats = ref.model.get_image_features(img[None]).pooler_output[0]
    assert feats.shape == ref_feats.shape and feats.shape[-1] == 32
    torch.testing.assert_close(feats, ref_feats, rtol=1e-5, atol=1e-5)


def test_internlm2_layout_is_read_as_the_llama_it_was_packed_from(tiny):
    from workbench.families import split_wqkv
    from workbench.tiny import pack_wqkv

    base = tiny["internvl-original-internlm2"][0]
    keys = set(CheckpointReader(base).keys())
    assert {"language_model.model.tok_embeddings.weight", "language_model.output.weight",
            "language_model.model.layers.0.attention.wqkv.weight", "language_model.model.layers.1.feed_forward.w2.weight",
            "language_model.model.layers.0.attention_norm.weight"} <= keys
    assert not any("q_proj" in k or "embed_tokens" in k for k in keys if k.startswith("language_model."))
    ref = hf_model("internvl-original-internlm2")  # the seed-0 model: InternVL with a Llama language model
    ck = FamilyCheckpoint(base)
    assert type(ck.language_model()).__name__ == "LlamaForCausalLM"
    want = ref.model.language_model.layers[1].self_attn
    for part, lin in zip("qkv", (want.q_proj, want.k_proj, want.v_proj)):  # GQA: 4 heads, 2 key-value heads
        assert torch.equal(ck.lm_tensor(f"model.layers.1.self_attn.{part}_proj.weight"), lin.weight)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(8, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_key_value_heads=2, num_attention_heads=4, hidden_size=8, head_dim=2)
    assert all(torch.equal(a, b) for a, b in zip(split_wqkv(pack_wqkv(q, k, v, 2), cfg), (q, k, v)))


# ------------------------------------------------------------------------------------ merging
def _merge(tmp_path, base, experts, method, params, family=None, status=0):
    cfg = {"method": method, "base": str(base), "experts": [str(e) for e in experts], "output": str(tmp_path / "out"),
           "params": params, "device": "cpu"}
    if family:
        cfg["family"] = family
    tmp_path.mkdir(parents=True, exist_ok=True)
    y = tmp_path / "merge.yaml"
    y.write_text(yaml.safe_dump(cfg))
    assert cli_main(["merge", str(y), "--quiet"]) == status
    return tmp_path / "out"


@pytest.mark.parametrize("kind,method,params", [(k, "ties", {"density": 0.5}) for k in TINY_KINDS]
                         + [("qwen2-vl", "optmerge", {"steps": 3}), ("internvl-original", "optmerge", {"steps": 3})])
def test_cli_merge_keeps_the_family_tensors_and_loads_back(tiny, tmp_path, kind, method, params):
    base, experts = tiny[kind]
    out = _merge(tmp_path, base, experts, method, params)
    b, o = CheckpointReader(base), CheckpointReader(out)
    assert set(o.keys()) == set(b.keys())
    fam = FAMILIES[FAMILY_OF[kind]]
    flt = NameFilter(keep=fam.keep_patterns)
    tower_like = re.compile(r"(^|\.)(vision_tower|visual|vision_model|mlp1|mm_projector|multi_modal_projector)\.")
    for name in b.keys():
        same = torch.equal(o.get(name), b.get(name))
        if tower_like.search(name) or not flt.merged(name):
            assert same, f"{name} should be kept from the base"
        elif name.endswith(("proj.weight", "attention.wqkv.weight", "feed_forward.w1.weight")):
            assert not same, f"{name} should be merged"
    if kind == "internvl-original":  # the projector mlp1.* is kept (the bug)
        assert any(n.startswith("mlp1.") for n in b.keys()) and not any(flt.merged(n) for n in b.keys()
                                                                          if n.startswith("mlp1."))
    model = hf_model(kind, out)
    ids = model.generate(input_ids=TEXT, max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, TEXT.shape[1] + 3)


def test_family_override_in_the_yaml(tiny, tmp_path, capsys):
    base, experts = tiny["internvl-original"]
    out = _merge(tmp_path, base, experts, "ties", {"density": 0.5}, family="generic")
    # the generic list keeps vision_model.* but merges the InternVL projector mlp1.*
    assert not torch.equal(CheckpointReader(out).get("mlp1.1.weight"), CheckpointReader(base).get("mlp1.1.weight"))
    out2 = _merge(tmp_path / "x", base, experts, "ties", {}, family="nope", status=2)
    assert "unknown model family 'nope'" in capsys.readouterr().err and not out2.exists()


def test_unknown_family_refused_before_writing(tiny, tmp_path, capsys):
    import json
    import shutil

    base, experts = tiny["qwen2-vl"]
    odd = tmp_path / "odd"
    shutil.copytree(base, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["OddVLForConditionalGeneration"], "odd_vl"
    (odd / "config.json").write_text(json.dumps(cfg))
    out = _merge(tmp_path / "m", odd, experts, "ties", {}, status=2)
    err = capsys.readouterr().err
    assert "unknown family" in err and "qwen2-vl" in err and "keep_defaults: false" in err and not out.exists()


# ------------------------------------------------------------------------------------ composition
def test_compose_llava_experts_sharing_image_gives_distinct_placeholders(tiny):
    base, experts = tiny["llava"]
    tok = FamilyCheckpoint(base).tokenizer()
    n_tok = len(tok)
    srcs = [compose.family_expert(experts[0]), compose.family_expert(experts[1], key="image_2")]
    assert srcs[0].placeholder == srcs[1].placeholder == "<image>"
    model = compose.compose_naive_mc(base, srcs, tok)
    assert model.placeholders == {"image": "<image>", "image_2": "<image_2>"} and len(tok) == n_tok
    new_id, old_id = model.tokenizer.convert_tokens_to_ids("<image_2>"), tok.convert_tokens_to_ids("<image>")
    emb = model.llm.get_input_embeddings().weight
    assert new_id == n_tok and emb.shape[0] == n_tok + 1 and torch.equal(emb[new_id], emb[old_id])
    assert torch.equal(model.llm.get_output_embeddings().weight[new_id], model.llm.get_output_embeddings().weight[old_id])
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    prompt = "w20 <image> w21 <image_2> w22"
    emb_, _, routes = model.embed(prompt, {"image": [a], "image_2": [b]})
    # the template wraps the prompt; each image's 4 tokens are its own tower's, on its own route
    assert routes.tolist()[0].count(1) == 4 and routes.tolist()[0].count(2) == 4
    with torch.no_grad():
        torch.testing.assert_close(emb_[0][routes[0] == 2], srcs[1].tower(b))
    assert isinstance(model.generate(prompt, {"image": [a], "image_2": [b]}, max_new_tokens=3), str)
    with pytest.raises(ConfigError, match="distinct names"):
        compose.compose_frozen(base, [srcs[0], compose.family_expert(experts[1])], tok)


def test_chat_template_is_applied(tiny):
    base, experts = tiny["llava"]
    tok = FamilyCheckpoint(base).tokenizer()
    model = compose.compose_frozen(base, [compose.family_expert(experts[0])], tok)
    plain = compose.compose_frozen(base, [compose.family_expert(experts[0], template="{prompt}")], tok)
    img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE)
    e1, _, _ = model.embed("<image> w20", {"image": [img]})
    e0, _, _ = plain.embed("USER: <image> w20 ASSISTANT:", {"image": [img]})
    torch.testing.assert_close(e1, e0)


@pytest.mark.parametrize("kind", ["qwen2-vl", "internvl-original", "internvl-original-internlm2"])
def test_compose_mmer_and_naive_mc_generate_with_an_image(tiny, kind):
    base, experts = tiny[kind]
    tok = FamilyCheckpoint(base).tokenizer()
    srcs = [compose.family_expert(experts[0]), compose.family_expert(experts[1], key="chart")]
    ph = FAMILIES[FAMILY_OF[kind]].placeholder
    img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    for model in (compose.compose_naive_mc(base, srcs, tok, dtype=torch.bfloat16),
                  compose.compose_mmer(base, srcs, tok, dtype=torch.bfloat16)):
        out = model.generate(f"w20 {ph} w21 <chart>", {"image": [img], "chart": [img]}, max_new_tokens=3)
        assert isinstance(out, str) and next(model.llm.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_device_map_places_a_family_language_model(tiny, kind):
    """A family folder's language model is placed by accelerate's dispatch_model (CPU here)."""
    base, experts = tiny[kind]
    tok = FamilyCheckpoint(base).tokenizer()
    srcs = [compose.family_expert(experts[0]), compose.family_expert(experts[1], key="chart")]
    ref = compose.compose_naive_mc(base, srcs, tok)
    mapped = compose.compose_naive_mc(base, srcs, tok, device_map={"": "cpu"})
    assert mapped.llm.hf_device_map == {"": "cpu"}
    ph = FAMILIES[FAMILY_OF[kind]].placeholder
    img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    prompt, inputs = f"w20 {ph} w21 <chart>", {"image": [img], "chart": [img]}
    assert mapped.generate(prompt, inputs, max_new_tokens=3) == ref.generate(prompt, inputs, max_new_tokens=3)
    assert compose.load_causal_lm(base, dtype=torch.bfloat16, device_map="auto").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ analysis
def test_interference_profile_on_tiny_qwen2_vl(tiny):
    from workbench.analysis import profile_interference

    base, experts = tiny["qwen2-vl"]
    flt = NameFilter(keep=FAMILIES["qwen2-vl"].keep_patterns)
    prof = profile_interference(base, {"a": experts[0], "b": experts[1]}, device="cpu", names=flt, progress=False)
    names = set(prof.frame("cosine")["tensor"])
    want = {n for n in CheckpointReader(base).keys() if flt.merged(n)}
    assert names == want and not any("visual" in n for n in names)
    cos = prof.frame("cosine")["cosine"].abs().max()
    assert cos < 0.5  # independent noise experts: near-orthogonal task vectors (the smallest tensor has 256 entries)


def test_family_expert_kinds_damc_and_frozen(tiny, tmp_path):
    """One constructor for an expert from a multimodal folder: full (default), DAMC (both adapters) or
    projector-only (``llm_frozen``) - the same tower in each; half a DAMC pair is an error naming the folder."""
    base, experts = tiny["qwen2-vl"]
    (tmp_path / "t").mkdir(), (tmp_path / "m").mkdir()  # (ExpertSource checks that the adapter folders exist)
    full = compose.family_expert(experts[0])
    frozen = compose.family_expert(experts[0], llm_frozen=True)
    damc = compose.family_expert(experts[0], adapter_text=tmp_path / "t", adapter_modality=tmp_path / "m")
    assert (full.kind, frozen.kind, damc.kind) == ("full", "projector", "damc")
    assert full.llm == Path(experts[0]) and frozen.llm is None and damc.adapter_text == tmp_path / "t"
    assert full.family == frozen.family == damc.family == "qwen2-vl" and full.placeholder == "<|image_pad|>"
    img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(frozen.tower(img), full.tower(img), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="both adapter_text and adapter_modality") as e:
        compose.family_expert(experts[0], adapter_text=tmp_path / "t")
    assert str(experts[0]) in str(e.value)


def test_unknown_llava_like_folder_needs_its_family_named(tiny, tmp_path):
    """A multimodal config of no known family (here a LLaVA checkpoint whose config says LLaVA-NeXT) is
    refused by the composition as by the merge engine - no silent guess at its layout; naming the
    family reads it: the same tower and language model as the folder it was copied from."""
    import json
    import shutil

    base, experts = tiny["llava"]
    odd = tmp_path / "odd"
    shutil.copytree(experts[0], odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlavaNextForConditionalGeneration"], "llava_next"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown family"):
        compose.family_expert(odd)
    with pytest.raises(ConfigError, match="unknown family"):
        compose.load_causal_lm(odd)
    src, ref = compose.family_expert(odd, family="llava"), compose.family_expert(experts[0])
    img = torch.rand(3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(src.tower(img), ref.tower(img), rtol=0, atol=0)
        merged = compose.merge_llm(base, [src], method="task_arithmetic", params={"scale": 1.0})
    want = compose.load_causal_lm(odd, family="llava").state_dict()
    assert want.keys() == merged.state_dict().keys()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ Qwen2-VL M-RoPE
def _qwen_prompt_and_reference(tiny, kind):
    """A composed one-expert Qwen2-VL (no template) and transformers' own inputs for the same prompt:
    a 16x32 image (a 2x4 token grid after the merge: h != w), text before and after it."""
    base, _ = tiny[kind]
    tok = FamilyCheckpoint(base).tokenizer()
    model = compose.compose_frozen(base, [compose.family_expert(base, template="{prompt}")], tok)
    img = torch.rand(3, IMAGE_SIZE, 2 * IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    prompt = "w20 w21 <|vision_start|> <|image_pad|> <|vision_end|> w22 w23"
    enc = model.towers["image"].processor(img, return_tensors="pt")
    n_img = int(enc["image_grid_thw"].prod()) // 4
    ids = tok(prompt.replace("<|image_pad|>", " ".join(["<|image_pad|>"] * n_img)))["input_ids"]
    input_ids = torch.tensor([ids])
    ref_inputs = dict(input_ids=input_ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                      mm_token_type_ids=(input_ids == tok.convert_tokens_to_ids("<|image_pad|>")).int())
    return model, prompt, {"image": [img]}, hf_model(kind, base), ref_inputs


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_composed_qwen2_vl_uses_the_family_3d_positions_and_logits(tiny, kind):
    from workbench.mllm import _stack_positions

    model, prompt, inputs, ref, ref_inputs = _qwen_prompt_and_reference(tiny, kind)
    assert isinstance(model, compose.MRopeMultimodalLM)
    pieces = model._pieces([prompt], [inputs])
    pos = model._prompt_positions([prompt], [inputs], pieces)[0]
    want, _ = ref.model.get_rope_index(ref_inputs["input_ids"], ref_inputs["mm_token_type_ids"],
                                       image_grid_thw=ref_inputs["image_grid_thw"])
    assert torch.equal(pos, want[:, 0]) and not torch.equal(pos[1], pos[2])  # a real 3-D grid (h != w)
    emb, mask, _ = model.embed(prompt, inputs)
    with torch.no_grad():
        ref_logits = ref(**ref_inputs).logits
        got = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=_stack_positions([pos], emb.shape[1], False)).logits
        flat = model.llm(inputs_embeds=emb, attention_mask=mask).logits  # 1-D positions: not the family's model
    torch.testing.assert_close(got, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(flat, ref_logits, rtol=1e-5, atol=1e-5)
    # scoring (both paths) and generation see the same positions: option log-likelihoods from the family's logits
    opt_ids = model.tokenizer(" w30 w31", add_special_tokens=False)["input_ids"]
    full = {**ref_inputs, "input_ids": torch.cat([ref_inputs["input_ids"], torch.tensor([opt_ids])], 1),
            "mm_token_type_ids": torch.cat([ref_inputs["mm_token_type_ids"], torch.zeros(1, len(opt_ids), dtype=torch.int)], 1)}
    with torch.no_grad():
        lp = torch.log_softmax(ref(**full).logits[0, -len(opt_ids) - 1:-1].float(), -1)
    want_score = lp.gather(1, torch.tensor(opt_ids)[:, None]).sum()
    for shared in (False, True):
        got_score = model.score_options_batch([prompt], [inputs], [["w30 w31"]], shared_prefix=shared)[0][0]
        torch.testing.assert_close(got_score, want_score, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        gen = ref.generate(**ref_inputs, max_new_tokens=4, do_sample=False)[0, ref_inputs["input_ids"].shape[1]:]
    assert model.generate(prompt, inputs, max_new_tokens=4) == model.tokenizer.decode(gen, skip_special_tokens=True).strip()
