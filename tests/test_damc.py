"""DAMC decoupled training in the miniature world (tiny models built here, a few steps)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from workbench.compose import ExpertSource, compose_damc, compose_expert
from workbench.routing import route_parameters, routed_modules, token_routes
from workbench.world.damc import (build_damc_model, damc_settings, load_damc_projector, plan_damc,
                                  save_damc_llm)
from workbench.world.encoders import ImageEncoder, Projector, Tower, save_module
from workbench.world.tasks import batches, example_modal_inputs, modality_question
from workbench.world.tokenizer import build_tokenizer
from workbench.world.training import new_llm, train_mllm
from workbench.world.presets import PRESETS
from workbench.world.scheduler import PLANNERS, RECIPES

torch.set_num_threads(1)


def settings(**kw):
    c = damc_settings(PRESETS["tiny"])
    c.update(r=4, alpha=8, steps=4, batch=4, lr=5e-2, lr_proj=5e-2, lr_full=1e-2)
    c.update(kw)
    return c


@pytest.fixture()
def world(tmp_path):
    tok = build_tokenizer()
    llm = new_llm(tok, hidden=32, layers=1, heads=2, ffn=64, seed=0)
    base_dir = tmp_path / "base"
    llm.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    torch.manual_seed(1)
    enc = ImageEncoder(64).eval().requires_grad_(False)
    proj = Projector(64, 32, "image")
    return tok, llm, base_dir, enc, proj


def image_examples(n, seed, task="present"):
    rng = np.random.default_rng(seed)
    return [modality_question("image", task, rng) for _ in range(n)]


def logits(model, exs, route_override=None):
    emb, mask, rid = model.embed([e.prompt for e in exs], [example_modal_inputs(e) for e in exs])
    with torch.no_grad(), token_routes(model.llm, rid if route_override is None else route_override):
        return model.llm(inputs_embeds=emb, attention_mask=mask).logits, rid


def test_settings_and_registration():
    c = damc_settings(PRESETS["tiny"])
    assert c["text_lr_ratio"] == 0.1 and c["n_prefix"] == 5 and c["n_suffix"] == 5 and c["decouple"] == "lora"
    assert c["r"] == PRESETS["tiny"]["lora"]["r"]
    assert "damc" in RECIPES and "damc" in PLANNERS
    jobs = plan_damc("tiny", copy.deepcopy(PRESETS["tiny"]))
    assert [j.name for j in jobs] == ["image-damc-s0", "audio-damc-s0"]
    assert jobs[0].deps[-1] == "image-projector-s0" and jobs[0].out == "experts/image-damc-s0"
    off = copy.deepcopy(PRESETS["tiny"])
    off["damc"] = {"enabled": False}
    assert plan_damc("tiny", off) == []


def test_prefix_suffix_are_modality_tokens_and_zero_init(world):
    tok, llm, _, enc, proj = world
    model, dproj, groups = build_damc_model(llm, tok, enc, proj, "image", settings())
    assert float(dproj.prefix.detach().abs().sum()) == 0 and float(dproj.suffix.detach().abs().sum()) == 0
    assert dproj.prefix.shape == (5, 32) and dproj.suffix.shape == (5, 32)
    ex = image_examples(2, 0)
    _, rid = logits(model, ex)
    assert [int((r == 1).sum()) for r in rid] == [5 + 4 + 5] * 2
    # the projector's weights are the projector stage's
    torch.testing.assert_close(dproj.proj.weight, proj.proj.weight)


def test_param_groups_text_lr_is_ten_times_smaller(world):
    tok, llm, _, enc, proj = world
    c = settings()
    _, dproj, groups = build_damc_model(llm, tok, enc, proj, "image", c)
    mod, prj, text = groups
    assert text["lr"] == pytest.approx(mod["lr"] / 10)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(mod["params"]) == ids(route_parameters(llm, 1))
    assert ids(text["params"]) == ids(route_parameters(llm, 0))
    assert ids(prj["params"]) == ids(dproj.parameters())
    assert len(mod["params"]) == len(text["params"]) == 2 * 7  # A and B on q,k,v,o,gate,up,down, 1 layer
    trainable = {id(p) for p in llm.parameters() if p.requires_grad}
    assert trainable == ids(mod["params"]) | ids(text["params"])


@pytest.mark.parametrize("decouple", ["lora", "full"])
def test_train_save_reload_reproduces_the_trained_model(world, tmp_path, decouple):
    tok, llm, base_dir, enc, proj = world
    base_sd = {k: v.clone() for k, v in llm.state_dict().items()}
    c = settings(decouple=decouple)
    model, dproj, groups = build_damc_model(llm, tok, enc, proj, "image", c, seed=3)
    rng_batches = batches(lambda r: modality_question("image", "present", r), c["batch"], 5)
    log = train_mllm(model, rng_batches, groups, c["steps"], progress=False)
    assert len(log["losses"]) >= 1
    # both parameter sets and the prefix/suffix moved; the base weights did not
    assert float(dproj.prefix.detach().abs().sum()) > 0 and float(dproj.suffix.detach().abs().sum()) > 0
    for route in (0, 1):  # LoRA: the zero-initialised B factors ([out, r]) moved; full: the deltas moved
        moved = [p for p in route_parameters(llm, route) if decouple == "full" or p.shape[-1] == c["r"]]
        assert moved and any(float(p.detach().abs().sum()) > 0 for p in moved)
    for k, v in llm.state_dict().items():
        if k in base_sd:
            assert torch.equal(v, base_sd[k]), k
    folder = tmp_path / "expert"
    save_module(dproj, dproj.config(), folder / "projector")
    save_damc_llm(llm, tok, folder, decouple)
    # reload through the composition loader: same outputs, token by token, with mixed routes
    tower = Tower(enc, load_damc_projector(folder / "projector"))
    if decouple == "lora":
        src = ExpertSource("img", "image", "damc", tower, "<image>", adapter_text=folder / "adapter_text",
                           adapter_modality=folder / "adapter_modality")
    else:
        src = ExpertSource("img", "image", "damc-full", tower, "<image>", llm_text=folder / "llm_text",
                           llm_modality=folder / "llm_modality")
    re = compose_expert(base_dir, src, tok)
    ex = image_examples(3, 11)
    got, rid = logits(re, ex)
    want, rid2 = logits(model, ex)
    assert torch.equal(rid, rid2) and set(rid.unique().tolist()) == {0, 1}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the routes matter: forcing every token onto the text route changes the output
    forced, _ = logits(re, ex, torch.zeros_like(rid))
    assert (forced - got).abs().max() > 1e-4


def test_two_trained_damc_experts_compose_and_generate(world, tmp_path):
    tok, llm0, base_dir, enc, proj = world
    from workbench.world.encoders import AudioEncoder

    srcs = []
    for m, e in (("image", enc), ("audio", AudioEncoder(64).eval().requires_grad_(False))):
        llm = copy.deepcopy(llm0)
        p = Projector(64, 32, m)
        c = settings(steps=2)
        model, dproj, groups = build_damc_model(llm, tok, e, p, m, c, seed=7)
        train_mllm(model, batches(lambda r, mm=m: modality_question(mm, "present", r), 4, 1), groups, 2,
                   progress=False)
        f = tmp_path / m
        save_module(dproj, dproj.config(), f / "projector")
        save_damc_llm(llm, tok, f, "lora")
        srcs.append(ExpertSource(m, m, "damc", Tower(e, load_damc_projector(f / "projector")), f"<{m}>",
                                 adapter_text=f / "adapter_text", adapter_modality=f / "adapter_modality"))
    comp = compose_damc(base_dir, srcs, tok)
    rng = np.random.default_rng(0)
    from workbench.world.tasks import multimodal_common

    ex = multimodal_common(["image", "audio"], rng)
    out = comp.generate(ex.prompt, example_modal_inputs(ex), max_new_tokens=3)
    assert isinstance(out, str)
    _, _, rid = comp.embed(ex.prompt, example_modal_inputs(ex))
    assert int((rid == 1).sum()) == 14 and int((rid == 2).sum()) == 14
    assert all(len(m.routes) == 3 for m in routed_modules(comp.llm).values())


# -------------------------------------------------------------------------------------------- tiny zoo


@pytest.fixture(scope="module")
def tiny_zoo_with_damc(tmp_path_factory):
    """A copy of the tiny zoo with its DAMC experts built by the zoo job (the shared zoo is not touched)."""
    import shutil

    from workbench.world import build_zoo

    from workbench.world import ensure_zoo

    tiny = ensure_zoo("tiny")
    root = tmp_path_factory.mktemp("ztiny") / "tiny"
    shutil.copytree(tiny.path, root)
    return build_zoo("tiny", out=root, jobs=1, progress=False)


@pytest.mark.slow
def test_tiny_zoo_damc_job_compose_and_score_mcub2(tiny_zoo_with_damc):
    from workbench.compose import zoo_expert
    from workbench.evaluate import predict

    z = tiny_zoo_with_damc
    names = z.experts(kind="damc")
    assert names == ["audio-damc-s0", "image-damc-s0"]
    for n in names:
        info = z.info(n)
        assert info["decouple"] == "lora" and 0 <= info["own_task"]["loglik"] <= 100
        p = z.expert_path(n)
        assert (p / "adapter_text" / "adapter_config.json").is_file()
        assert (p / "adapter_modality" / "adapter_model.safetensors").is_file()
        assert load_damc_projector(p / "projector").prefix.shape[0] == 5
    srcs = [zoo_expert(z, "image-damc-s0"), zoo_expert(z, "audio-damc-s0")]
    model = compose_damc(z.base_path, srcs, z.tokenizer())
    recs = z.mcub("mcub-2")[:8]
    for scoring in ("loglik", "generate"):
        df = predict(model, recs, z.load_inputs, scoring=scoring)
        assert len(df) == 8 and df["pred"].map(lambda s: isinstance(s, str)).all()


@pytest.mark.slow
def test_tiny_zoo_forgetting_experiment(tiny_zoo_with_damc, tmp_path):
    from workbench.studies.composition import forgetting_experiment

    r = forgetting_experiment(tiny_zoo_with_damc, "image-full-s0", ("first", "last"), steps=8, batch_size=8,
                              n_eval=16, workdir=tmp_path)
    for k in ("before_old", "before_new", "after_old", "after_new", "decoupled_old", "decoupled_new"):
        assert 0 <= r[k] <= 100
    assert r["old_tasks"] == ["present", "absent", "count", "common_text"]
    assert 0 < r["mask_density_old"] < 1 and 0 < r["mask_density_new"] < 1
    assert r["forgetting"] == pytest.approx(r["before_old"] - r["after_old"])


@pytest.mark.slow
def test_zoo_expert_model_for_damc_matches_its_own_score(tiny_zoo_with_damc):
    """The composition loader reproduces the DAMC expert's own-task score recorded by the zoo job."""
    from workbench.compose import zoo_expert_model
    from workbench.evaluate import accuracy, predict

    z = tiny_zoo_with_damc
    model = zoo_expert_model(z, "image-damc-s0")
    acc = accuracy(predict(model, z.own_eval("image"), z.load_inputs, scoring="loglik"))
    assert acc == pytest.approx(z.info("image-damc-s0")["own_task"]["loglik"], abs=0.01)
