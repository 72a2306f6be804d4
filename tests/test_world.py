"""The miniature world: generators, tasks, tokenizer, encoders, MCUB records."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.world.concepts import CONCEPTS, LETTERS, MODALITIES, PLACEHOLDERS
from workbench.world.generators import RAW_SHAPES, render, render_capability
from workbench.world.mcub import (MCUBRecord, build_mcub, build_model_evals, read_records, record_inputs,
                                  validate_record)
from workbench.world.tasks import (OWN_TASKS, QUESTION_TYPES, capability_question, common_scenes, modality_question,
                                   multimodal_common, sample_scene, scene_concepts, text_own_question,
                                   text_question)
from workbench.world.tokenizer import build_tokenizer


@pytest.mark.parametrize("modality", MODALITIES)
def test_generators_deterministic_and_shaped(modality):
    scene = (3, -1, 7, 0)
    a, b = render(modality, scene, 5), render(modality, scene, 5)
    c = render(modality, scene, 6)
    assert a.shape == RAW_SHAPES[modality] and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # noise depends on the seed
    d = render(modality, (4, -1, 7, 0), 5)
    assert not np.allclose(a, d)  # content depends on the concept


def test_render_rejects_empty_and_unknown():
    with pytest.raises(ValueError):
        render("image", (-1, -1, -1, -1), 0)
    with pytest.raises(ValueError):
        render("smell", (1, -1, -1, -1), 0)


@pytest.mark.parametrize("task", ["vqa", "geometry", "chart", "ocr", "grounding"])
def test_capability_images_deterministic(task):
    a, ta = render_capability(task, np.random.default_rng(3))
    b, tb = render_capability(task, np.random.default_rng(3))
    assert a.shape == (3, 32, 32) and np.array_equal(a, b) and ta == tb
    ex = capability_question(task, np.random.default_rng(4))
    assert ex.answer in ex.options and len(set(ex.options)) == 4


def test_common_scenes_hard_distractors():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        for _ in range(50):
            scenes, c, distractors = common_scenes(k, rng)
            sets = [set(scene_concepts(s)) for s in scenes]
            assert all(c in s for s in sets)
            assert set.intersection(*sets) == {c}  # exactly one common concept
            for d in distractors:
                n_in = sum(d in s for s in sets)
                assert 0 < n_in < k  # present in some inputs but not all


@pytest.mark.parametrize("modality", MODALITIES)
def test_own_task_answers_are_right(modality):
    rng = np.random.default_rng(1)
    for task in QUESTION_TYPES[modality]:
        for _ in range(20):
            ex = modality_question(modality, task, rng, render_inputs=False)
            present = [CONCEPTS[k] for k in scene_concepts(ex.scenes[0])]
            opts = _options(ex.prompt)
            gold = opts[LETTERS.index(ex.letter)]
            assert ex.answer == gold and ex.choices == opts
            if task == "present":
                assert gold in present and sum(o in present for o in opts) == 1
            elif task == "absent":
                assert gold not in present and sum(o in present for o in opts) == 3
            elif task == "count":
                assert gold == ["one", "two", "three", "four"][len(present) - 1]
            elif task == "first":
                assert gold == present[0]
            elif task == "last":
                assert gold == present[-1]


def test_own_tasks_differ_by_modality():
    """Each expert's own tasks are question types its modality supports; what MCUB composes (``present``,
    ``common_text``) is in every expert's data; the ordered modalities each have an order question of their
    own; ``absent``, which no expert learned, is in none."""
    for m in MODALITIES:
        assert set(OWN_TASKS[m]) <= set(QUESTION_TYPES[m])
        assert {"present", "common_text"} <= set(OWN_TASKS[m]) and "absent" not in OWN_TASKS[m]
    order = {m: {"first", "last"} & set(OWN_TASKS[m]) for m in ("audio", "video")}
    assert all(len(t) == 1 for t in order.values()) and order["audio"] != order["video"]
    assert len({OWN_TASKS[m] for m in MODALITIES}) == 3  # image and point clouds (unordered) share theirs


def _options(prompt: str) -> list[str]:
    tail = prompt[prompt.rindex("A. "):].split("\n")[0]
    parts = tail.replace("A. ", "|").replace(" B. ", "|").replace(" C. ", "|").replace(" D. ", "|").split("|")[1:]
    return [p.strip() for p in parts]


def test_text_own_questions_are_the_own_tasks_in_words():
    """The instruct stage's questions: every modality's own-task formats, the scene written as its
    concept words (in slot order) where the modality input would be, the gold among the options."""
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(400):
        ex = text_own_question(rng)
        m, words = ex.prompt.split("\n")[0].split(": ", 1)
        seen.add((m, ex.task))
        assert not ex.inputs and not any(p in ex.prompt for p in PLACEHOLDERS.values())
        assert words.split() == [CONCEPTS[k] for k in scene_concepts(ex.scenes[0])]
        assert ex.answer in ex.choices and ex.choices == _options(ex.prompt)
    assert seen == {(m, f"text_{t}") for m in MODALITIES for t in QUESTION_TYPES[m]}
    # one task: asked of the modalities that have it only
    firsts = [text_own_question(rng, "first") for _ in range(40)]
    assert {e.task for e in firsts} == {"text_first"}
    assert {e.prompt.split(":")[0] for e in firsts} == {m for m in MODALITIES if "first" in QUESTION_TYPES[m]}
    with pytest.raises(ValueError, match="question type 'colour'"):
        text_own_question(rng, "colour")


def test_text_questions_valid():
    rng = np.random.default_rng(2)
    for _ in range(200):
        ex = text_question(rng)
        if ex.task in ("text_common", "text_common_easy"):
            lists = [line.split(": ", 1)[1].split() for line in ex.prompt.split("\n")[:-2]]
            opts = _options(ex.prompt)
            gold = opts[LETTERS.index(ex.letter)]
            assert gold == ex.answer and all(gold in l for l in lists)
            for o in opts:
                if o != gold:
                    n_in = sum(o in l for l in lists)
                    assert n_in < len(lists)
                    if ex.task == "text_common":
                        assert n_in > 0


def test_tokenizer_placeholders_are_single_tokens():
    tok = build_tokenizer()
    for ph in PLACEHOLDERS.values():
        ids = tok(f"image: {ph}\nwhat is in the input?", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(ph) in ids
        assert tok.unk_token_id not in ids
    for w in CONCEPTS:
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id


def test_ocr_glyphs_sit_in_one_encoder_patch_each():
    """OCR images: each digit's ink lies inside the 8x8 patch ``glyph_patches`` names (so one patch token
    carries one glyph), left to right in the string's order."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        img, truth = render_capability("ocr", rng)
        patches = img.reshape(3, 4, 8, 4, 8).transpose(1, 3, 0, 2, 4).max(axis=2)  # [4, 4, 8, 8] brightest channel
        ink = (patches > 0.6).sum(axis=(2, 3))
        named = [p for p, _ in truth["glyph_patches"]]
        assert [d for _, d in truth["glyph_patches"]] == [int(c) for c in truth["text"]]
        assert named == sorted(named) and len(set(p // 4 for p in named)) == 1
        assert all(ink.reshape(-1)[p] >= 5 for p in named)
        assert all(ink.reshape(-1)[p] <= 2 for p in range(16) if p not in named)


def test_mcub_records_validate(tmp_path):
    counts = build_mcub(tmp_path, n_per_combination=3, n_val=4, seed=1)
    assert counts["mcub/mcub-2.json"] == 6 * 3 and counts["mcub/mcub-3.json"] == 4 * 3  # 3 per combination
    assert counts["mcub/mcub-4.json"] == 3 and counts["mcub/val.json"] == 11 * 4  # 4 per combination
    for name in ("mcub-2", "mcub-3"):
        recs = read_records(tmp_path / "mcub" / f"{name}.json")
        assert all(sum(r["subset"] == s for r in recs) == 3 for s in {r["subset"] for r in recs})
    val = read_records(tmp_path / "mcub" / "val.json")
    assert all(sum(r["subset"] == f"val:{t}" for r in val) == 4 for t in {r["subset"][4:] for r in val})
    for name in ("mcub-2", "mcub-3", "mcub-4", "val"):
        for rec in read_records(tmp_path / "mcub" / f"{name}.json"):
            validate_record(rec)
            assert all(p.startswith("mcub/inputs/") for v in rec["modal_inputs"].values() for p in v)
            inputs = record_inputs(rec, tmp_path)
            n_inputs = sum(len(v) for v in inputs.values())
            assert n_inputs == {"mcub-2": 2, "mcub-3": 3, "mcub-4": 4}.get(name, n_inputs)
            sets = [set(w for w in s if w) for s in rec["scenes"]]
            opts = _options(rec["conversations"][0]["value"])
            gold = opts[LETTERS.index(rec["conversations"][1]["value"])]
            assert rec["choices"] == opts and rec["answer_text"] == gold
            common = [o for o in opts if all(o in s for s in sets)]
            assert common == [gold]  # exactly one option common to all inputs
            for o in opts:
                if o != gold:
                    assert 0 < sum(o in s for s in sets) < len(sets)
    # determinism: same seed -> same records; more items per combination keep the fewer as their first ones
    other = tmp_path / "again"
    build_mcub(other, n_per_combination=5, n_val=4, seed=1)
    a = read_records(tmp_path / "mcub" / "mcub-3.json")
    b = read_records(other / "mcub" / "mcub-3.json")
    b_first = [r for r in b if int(r["id"].rsplit("-", 1)[1]) < 3]
    assert [r["conversations"] for r in a] == [r["conversations"] for r in b_first]
    ra, rb = record_inputs(a[0], tmp_path), record_inputs(b_first[0], other)
    assert all(torch.equal(x, y) for k in ra for x, y in zip(ra[k], rb[k]))


def test_data_jobs_keep_to_their_own_folders(tmp_path):
    """The two data jobs share the data root: each rewrites only its folders, so rebuilding MCUB-mini (e.g. at
    another size) leaves the sets the zoo's models were scored on - and whatever else is there - in place."""
    evals = build_model_evals(tmp_path, n_own=4, n_capability=2, seed=1, modalities=["image", "audio"],
                              capability_tasks=["vqa"])
    assert set(evals) == {"eval/image.json", "eval/audio.json", "capability/vqa.json"}
    (tmp_path / "notes.txt").write_text("mine")
    own_before = (tmp_path / "eval" / "image.json").read_bytes()
    build_mcub(tmp_path, n_per_combination=2, n_val=1, seed=1, modalities=["image", "audio"])
    build_mcub(tmp_path, n_per_combination=3, n_val=1, seed=1, modalities=["image", "audio"])
    assert len(read_records(tmp_path / "mcub" / "mcub-2.json")) == 3
    assert (tmp_path / "eval" / "image.json").read_bytes() == own_before
    for rec in read_records(tmp_path / "eval" / "image.json"):
        assert all(p.startswith("inputs/") for v in rec["modal_inputs"].values() for p in v)
        record_inputs(rec, tmp_path)  # the own-task inputs are all still there
    build_model_evals(tmp_path, n_own=4, n_capability=2, seed=1, modalities=["image", "audio"], capability_tasks=["vqa"])
    for rec in read_records(tmp_path / "mcub" / "mcub-2.json"):
        record_inputs(rec, tmp_path)  # and the MCUB inputs survive the other job
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_schema_rejects_bad_records():
    good = {"id": "x", "conversations": [{"from": "human", "value": "image: <image>\nq? A. a B. b C. c D. d"},
                                         {"from": "gpt", "value": "B"}],
            "modal_inputs": {"vision": ["inputs/image/x.npy"]}}
    MCUBRecord.model_validate(good)
    bad = dict(good, modal_inputs={"vision": ["a.npy", "b.npy"]})
    with pytest.raises(ValueError):
        validate_record(bad)
    bad2 = dict(good, conversations=[good["conversations"][0], {"from": "gpt", "value": "E"}])
    with pytest.raises(ValueError):
        validate_record(bad2)
    bad3 = dict(good, modal_inputs={"smell": ["a.npy"]})
    with pytest.raises(ValueError):
        validate_record(bad3)


@pytest.mark.parametrize("modality", MODALITIES)
def test_encoders_map_raw_to_tokens(modality):
    from workbench.world.encoders import MODALITY_ENCODERS, Projector, Tower
    torch.manual_seed(0)
    enc = MODALITY_ENCODERS[modality]()
    x = torch.from_numpy(render(modality, sample_scene(np.random.default_rng(0)), 0))
    t = Tower(enc, Projector(64, 32))
    one = t(x)
    assert one.shape == (enc.n_tokens, 32)
    two = t(torch.stack([x, x]))
    assert torch.allclose(two[0], one, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 32, 16, 16), (3, 8, 7, 9)])
def test_max_pool_2x2_is_max_pool2d(shape):
    """Without a gradient: ``max_pool2d(x, 2)`` bit for bit (odd edges dropped, a NaN kept, an all-equal window, the
    output's layout); with one: ``max_pool2d`` itself, the same gradient (a tie's to one element)."""
    from torch.nn.functional import gelu, max_pool2d

    from workbench.world.encoders import MaxPool2x2
    torch.manual_seed(0)
    x = gelu(torch.randn(shape) * 8)  # GELU's -0.0 and ties below about -6
    x[0, 0, 0, 0] = float("nan")
    x[-1, -1, :2, :2] = 1.5
    pool = MaxPool2x2()
    with torch.no_grad():
        out = pool(x)
    ref = max_pool2d(x, 2)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0)) and torch.isnan(out[0, 0, 0, 0])
    assert torch.equal(torch.signbit(out.nan_to_num(7.0)), torch.signbit(ref.nan_to_num(7.0)))
    y = x.nan_to_num(0.0).requires_grad_(True)
    g = torch.autograd.grad(pool(y).sum(), y)[0]
    y2 = y.detach().clone().requires_grad_(True)
    assert torch.equal(g, torch.autograd.grad(max_pool2d(y2, 2).sum(), y2)[0])
    assert pool(y.detach()).grad_fn is None and not pool(y.detach()).requires_grad
    with pytest.raises(RuntimeError):  # a 1-pixel side: max_pool2d's error, not an empty tensor
        with torch.no_grad():
            pool(torch.zeros(2, 4, 1, 6))
