"""The tiny zoo builds, is cached, loads, and every expert beats its base LLM on its own task.

``tiny_zoo`` is a session fixture other test modules can use (``from tests.test_zoo import tiny_zoo``
or via ``workbench.world.ensure_zoo("tiny")``, which is instant once built)."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import time
from pathlib import Path

import pytest
import torch

from workbench.world import Zoo, ensure_zoo
from workbench.world import PRESETS, build_zoo, plan_jobs


@pytest.fixture(scope="session")
def tiny_zoo() -> Zoo:
    return ensure_zoo("tiny")


def test_plan_default_has_everything():
    names = [j.name for j in plan_jobs("default")]
    lora_seeds = PRESETS["default"]["lora"]["seeds"]
    seeds = PRESETS["default"]["seeds"]
    assert len(seeds) >= 3  # issue #19: as many modality seeds as the budget allows, never fewer than three
    for m in ("image", "audio", "video", "point"):
        for s in seeds:
            assert f"{m}-full-s{s}" in names and f"{m}-damc-s{s}" in names
            # LoRA modality experts exactly for the preset's LoRA seeds
            assert (f"{m}-lora-s{s}" in names) == (s in lora_seeds)
    for t in ("vqa", "geometry", "chart", "ocr", "grounding"):
        assert f"capability-{t}-full-s0" in names and f"capability-{t}-lora-s0" in names
    # the joint oracle exactly for the preset's oracle seeds (a headroom row: seed 0 only, for the budget)
    oracle_seeds = PRESETS["default"]["oracle"]["seeds"]
    assert {n for n in names if n.startswith("oracle-")} == {f"oracle-s{s}" for s in oracle_seeds}
    assert "oracle-s0" in names


def test_modality_family_starts_from_the_instruct_llm():
    """The modality jobs depend on the instruct LLM (their theta_0, built from the text-pretrained
    LM); the capability family on the text-pretrained LM itself."""
    from workbench.world.zoo import MODALITY_BASE
    plan = {j.name: j for j in plan_jobs("default")}
    assert plan[MODALITY_BASE].deps == ["tokenizer", "base"]
    for name, j in plan.items():
        if j.kind in ("projector", "full", "lora", "damc", "oracle"):
            assert MODALITY_BASE in j.deps and "base" not in j.deps, name
        if j.kind in ("full", "lora"):
            assert j.config["base"] == MODALITY_BASE, name
        if j.kind.startswith("cap_") and j.kind != "cap_encoder":
            assert "base" in j.deps and MODALITY_BASE not in j.deps, name


def test_scheduler_starts_the_critical_path_first():
    """Jobs with more (transitive) dependents start first: the base LLM, on which every expert waits,
    before the encoders; counts match a direct closure over the dependency lists."""
    from workbench.world.scheduler import _n_dependents

    plan = plan_jobs("default")
    nd = _n_dependents(plan)
    closure: dict[str, set[str]] = {}
    for j in plan:  # dependencies come first in the plan: one pass builds every job's ancestors
        closure[j.name] = set(j.deps).union(*(closure[d] for d in j.deps))
    for j in plan:
        assert nd[j.name] == sum(j.name in closure[k.name] for k in plan), j.name
    assert nd["base"] > max(nd[f"encoder-{m}"] for m in ("image", "audio", "video", "point"))
    assert nd["image-damc-s2"] == 0 and nd["image-projector-s0"] >= 3


def test_tiny_zoo_builds_and_loads(tiny_zoo):
    z = tiny_zoo
    m = z.manifest
    full = z.experts(kind="full")
    assert len(full) >= 2 and len({m["models"][n]["modality"] for n in full}) >= 2
    caps = z.experts(family="capability", kind="full")
    assert len(caps) >= 2
    for name in full:
        e = m["models"][name]
        # the expert beats the base LLM (with the expert's projector) on its own task, both scorings
        assert e["own_task"]["loglik"] > e["own_task_base_llm"]["loglik"], (name, e)
        assert e["own_task"]["generate"] > e["own_task_base_llm"]["generate"], (name, e)
    for name in caps:
        e = m["models"][name]
        # capability experts beat the base VLM by greedy generation (they answer in the task's format;
        # the base VLM captions); at the tiny preset's budget they need not beat it by log-likelihood
        assert e["own_task"]["generate"] > e["own_task_base_llm"]["generate"], (name, e)
    # the capability family: an instruct base VLM with its own LLM (the experts' theta_0), mixture training
    base_vlm = m["models"]["capability-base"]
    assert base_vlm["kind"] == "base-vlm" and (z.path / base_vlm["llm"] / "model.safetensors").exists()
    assert all(z.base_llm_path(n) == z.path / base_vlm["llm"] for n in caps)
    mix = [n for n, e in m["models"].items() if e.get("kind") == "mixture"]
    assert mix and set(m["models"][mix[0]]["task_scores"]) == set(m["config"]["capability"]["tasks"])
    assert not set(mix) & set(z.experts(family="capability"))  # a reference row, not an expert to merge
    assert isinstance(z.load_expert(mix[0]).llm, torch.nn.Module)
    # loading: an expert answers its own eval set's first record
    name = full[0]
    model = z.load_expert(name)
    rec = z.own_eval(m["models"][name]["modality"])[0]
    scores = model.score_options(rec["conversations"][0]["value"], z.load_inputs(rec), ["A", "B", "C", "D"])
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert (z.base_path / "config.json").exists() and (z.expert_path(name) / "llm" / "model.safetensors").exists()
    # the modality experts' theta_0 is the instruct LLM, instruction-tuned from the text-pretrained LM
    assert all(z.base_llm_path(n) == z.base_path for n in full) and z.base_path.name == "instruct"
    assert z.base_hash == m["jobs"]["instruct"]["hash"] and m["jobs"]["instruct"]["result"]["text_own_task_acc"] > 25
    for sub in ("mcub-2", "val"):
        assert len(z.mcub(sub)) > 0


def test_rebuild_is_cached(tiny_zoo):
    t0 = time.time()
    z = build_zoo("tiny", progress=False)
    assert time.time() - t0 < 30
    assert z.manifest["models"].keys() == tiny_zoo.manifest["models"].keys()
    for name, e in z.manifest["models"].items():
        assert e["hash"] == tiny_zoo.manifest["models"][name]["hash"]
    # a cache check is not a build: the manifest keeps the time of the build that made the models
    assert z.manifest["build_wall_seconds"] == tiny_zoo.manifest["build_wall_seconds"]
    assert z.manifest["built"] == tiny_zoo.manifest["built"]
    assert z.manifest["jobs_trained"] == tiny_zoo.manifest["jobs_trained"] >= 0
    # and the library versions of that build (the models are not bit-stable across them)
    assert z.manifest["versions"] == tiny_zoo.manifest["versions"]


def test_a_missing_data_set_reruns_its_job_only(tiny_zoo, tmp_path):
    """A data job counts as built only while every file it wrote is there: removing MCUB-mini's test set
    reruns the MCUB job alone (no model depends on it), which writes the same records again."""
    import shutil

    from workbench.world.presets import data_root

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo.path, root, ignore=shutil.ignore_patterns(".build.lock"))
    shutil.copytree(data_root("tiny"), root / "data")
    before = (root / "data" / "mcub" / "mcub-2.json").read_bytes()
    (root / "data" / "mcub" / "mcub-2.json").unlink()
    z = build_zoo("tiny", out=root, jobs=1, progress=False)
    assert z.manifest["jobs_trained"] == 1
    assert z.manifest["jobs"]["data-mcub"]["finished"] != tiny_zoo.manifest["jobs"]["data-mcub"]["finished"]
    assert z.manifest["jobs"]["data"]["finished"] == tiny_zoo.manifest["jobs"]["data"]["finished"]
    assert (root / "data" / "mcub" / "mcub-2.json").read_bytes() == before


def test_mcub_size_changes_no_model_key():
    """MCUB-mini's size is the MCUB job's alone: changing it keeps every other job's key."""
    from workbench.world.presets import get_preset
    from workbench.world.scheduler import job_keys

    cfg = get_preset("tiny")
    cfg["data"]["mcub_per_combination"] += 1
    before, after = _tiny_keys(), job_keys(plan_jobs("tiny", cfg))
    assert {n for n in before if before[n] != after[n]} == {"data-mcub"}
    cfg["data"]["mcub_per_combination"] -= 1
    cfg["data"]["n_own"] += 1  # the own-task sets are scored by the jobs: their keys follow
    changed = {n for n, k in job_keys(plan_jobs("tiny", cfg)).items() if k != before[n]}
    assert {"data", "image-full-s0"} <= changed and not {"data-mcub", "instruct", "base"} & changed


def test_capability_task_steps_rekey_that_task_alone():
    """``capability.task_steps`` gives one task's experts (full and LoRA, every seed) their own step count and
    changes no other job's key; a task the preset does not train is an error naming the setting."""
    from workbench.world.presets import get_preset
    from workbench.world.scheduler import job_keys

    cfg = get_preset("tiny")
    cfg["capability"].pop("task_steps", None)
    before = job_keys(plan_jobs("tiny", cfg))
    cfg["capability"]["task_steps"] = {"vqa": cfg["capability"]["steps"] + 50}
    plan = {j.name: j for j in plan_jobs("tiny", cfg)}
    changed = {n for n, k in job_keys(list(plan.values())).items() if k != before[n]}
    assert changed == {n for n in plan if n.startswith("capability-vqa-")} and changed
    assert all(plan[n].config["steps"] == cfg["capability"]["steps"] + 50 for n in changed)
    assert plan["capability-geometry-full-s0"].config["steps"] == cfg["capability"]["steps"]
    cfg["capability"]["task_steps"] = {"chart": 10}  # not a task of the tiny preset
    with pytest.raises(ValueError, match="task_steps"):
        plan_jobs("tiny", cfg)


def test_capability_instruct_task_share():
    """``capability.instruct_task_share`` gives a task its own share of the instruct base VLM's batch (the other
    tasks split the rest of the tasks' 0.8): without it the parts are equal; with it, that task's share of the draws
    follows the setting and the others split the rest; it rekeys the capability family alone; an unknown task or
    shares past 0.8 are errors naming the setting."""
    import numpy as np
    from workbench.world import recipes
    from workbench.world.presets import get_preset
    from workbench.world.scheduler import job_keys

    tasks = list(recipes.CAP_TASKS)
    for shares, vqa, geometry in ((None, 0.16, 0.16), ({"vqa": 0.4}, 0.4, 0.1)):
        sampler, rng = recipes._cap_task_sampler(tasks, 0.8, caption=0.1, text=0.1, shares=shares), np.random.default_rng(0)
        drawn = [sampler(rng).task for _ in range(4000)]
        assert abs(drawn.count("vqa") / 4000 - vqa) < 0.03  # binomial sd <= 0.008
        assert abs(drawn.count("geometry") / 4000 - geometry) < 0.02
        assert abs(drawn.count("caption") / 4000 - 0.1) < 0.02

    cfg = get_preset("tiny")
    cfg["capability"].pop("instruct_task_share", None)
    before = job_keys(plan_jobs("tiny", cfg))
    cfg["capability"]["instruct_task_share"] = {"vqa": 0.5}
    plan = {j.name: j for j in plan_jobs("tiny", cfg)}
    changed = {n for n, k in job_keys(list(plan.values())).items() if k != before[n]}
    assert changed == {n for n in plan if n.startswith("capability-")} and "capability-base" in changed
    assert plan["capability-base"].config["task_share"] == {"vqa": 0.5}
    for bad in ({"chart": 0.2}, {"vqa": 0.9}, {"vqa": 0.0}):  # chart: not a task of the tiny preset
        cfg["capability"]["instruct_task_share"] = bad
        with pytest.raises(ValueError, match="instruct_task_share"):
            plan_jobs("tiny", cfg)


def test_mcub_generator_edit_changes_no_model_key(monkeypatch, tmp_path):
    """An edit of MCUB-mini's generator (its own training-path entry) rekeys the MCUB job alone."""
    from workbench.world import mcub

    before = _tiny_keys()
    source = inspect.getsource(mcub.build_mcub)
    edited = source.replace("# validation split", "# the validation split")
    assert edited != source
    (tmp_path / "edited_mcub.py").write_text("from pathlib import Path\n\nimport numpy as np\n\n"
                                             "from workbench.world.mcub import *  # noqa: F403\n"
                                             "from workbench.world.mcub import _clear, _write\n\n\n" + edited)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(mcub, "build_mcub", importlib.import_module("edited_mcub").build_mcub)
    after = _tiny_keys()
    assert {n for n in before if before[n] != after[n]} == {"data-mcub"}


def test_manifest_records_the_versions_of_the_build_that_trained(tmp_path):
    """zoo.json's ``versions``: the libraries of a build that trained a job, kept by a cache check."""
    import json

    from workbench.world.scheduler import Job, _write_manifest, library_versions

    plan = [Job("tokenizer", "tokenizer", {}, [], "tokenizer")]
    results = {"tokenizer": {"hash": "h", "seconds": 0.1, "result": {}}}
    _write_manifest(tmp_path, tmp_path, "tiny", {}, plan, results, 1.0, n_trained=1)
    first = json.loads((tmp_path / "zoo.json").read_text())["versions"]
    assert first == library_versions() and first["transformers"] and first["torch"]
    recorded = dict(first, transformers="0.0-older")
    m = json.loads((tmp_path / "zoo.json").read_text())
    (tmp_path / "zoo.json").write_text(json.dumps(dict(m, versions=recorded)))
    _write_manifest(tmp_path, tmp_path, "tiny", {}, plan, results, 1.0, n_trained=0)  # a cache check
    assert json.loads((tmp_path / "zoo.json").read_text())["versions"] == recorded


def test_second_build_waits_for_the_first(tiny_zoo):
    """Two builds of one zoo never run side by side: the second waits on the lock, then finds its
    jobs cached."""
    import fcntl
    import threading

    lock = open(tiny_zoo.path / ".build.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    finished = threading.Event()
    t = threading.Thread(target=lambda: (build_zoo("tiny", progress=False), finished.set()))
    t.start()
    try:
        assert not finished.wait(2.0), "build_zoo ran while another build held the lock"
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    t.join(60)
    assert finished.is_set()


def test_build_lock_says_it_waits_only_when_the_wait_is_long(tmp_path, monkeypatch, capsys):
    """A lock held for a moment (another notebook's cache check) is waited for silently; one held past
    QUIET_LOCK_WAIT_S (a build) is announced. Either way the lock is taken only once the holder lets go."""
    import fcntl
    import threading

    from workbench.world import scheduler

    def hold(seconds: float) -> float:
        lock = open(tmp_path / ".build.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        released = []
        timer = threading.Timer(seconds, lambda: (released.append(time.monotonic()),
                                                  fcntl.flock(lock, fcntl.LOCK_UN), lock.close()))
        timer.start()
        with scheduler._build_lock(tmp_path):
            got = time.monotonic()
        timer.join()
        assert got >= released[0]
        return got

    monkeypatch.setattr(scheduler, "QUIET_LOCK_WAIT_S", 5.0)
    hold(0.3)
    assert "another build" not in capsys.readouterr().out
    monkeypatch.setattr(scheduler, "QUIET_LOCK_WAIT_S", 0.2)
    hold(1.0)
    assert "another build is running" in capsys.readouterr().out


# ---- the job cache key: recipe version + the source of the training path only
def _tiny_keys() -> dict[str, str]:
    from workbench.world.scheduler import job_keys

    return job_keys(plan_jobs("tiny"))


def test_every_training_path_entry_exists():
    """Each declared entry resolves to source text (a renamed function fails here instead of
    silently leaving the key), and each kind's path holds the training loop it runs."""
    from workbench.world.scheduler import RECIPES, path_entry_source

    plan_jobs("tiny")  # loads the job-kind plugins (DAMC)
    assert {"tokenizer", "data", "encoder", "base", "projector", "full", "lora", "oracle", "damc"} <= set(RECIPES)
    for kind, recipe in RECIPES.items():
        assert len(set(recipe.training_path)) == len(recipe.training_path), kind
        for entry in recipe.training_path:
            assert path_entry_source(entry).strip(), (kind, entry)
        if kind not in ("tokenizer", "data", "mcub_data"):
            assert "workbench.world.training:train_mllm" in recipe.training_path, kind
    assert "workbench.routing:add_lora_routes" in RECIPES["damc"].training_path
    with pytest.raises(AttributeError):
        path_entry_source("workbench.world.training:no_such_function")


def _named_workbench_objects(obj) -> list[tuple[str, object]]:
    """``("module:qualname", object)`` of each workbench function, class or module constant the
    source of ``obj`` names (its globals and its imports; annotations aside)."""
    import ast
    import importlib.util
    import sys
    import textwrap

    from workbench.world.scheduler import _module_assignments

    module = sys.modules[obj.__module__]
    names, imports = set(), []

    class Visitor(ast.NodeVisitor):
        def visit_arg(self, node):  # annotations
            pass

        def visit_AnnAssign(self, node):
            if node.value is not None:
                self.visit(node.value)

        def visit_FunctionDef(self, node):
            for child in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d] + node.body:
                self.visit(child)

        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Load):
                names.add(node.id)

        def visit_ImportFrom(self, node):
            imports.append(node)

    Visitor().visit(ast.parse(textwrap.dedent(inspect.getsource(obj))))
    out = []
    for node in imports:
        name = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
        if name.startswith("workbench"):
            src = importlib.import_module(name)
            out += [(f"{name}:{a.name}", getattr(src, a.name)) for a in node.names]
    for n in names & set(module.__dict__):
        ref = module.__dict__[n]
        if inspect.isfunction(ref) or inspect.isclass(ref):
            out.append((f"{ref.__module__}:{ref.__qualname__}", ref))
        elif not inspect.ismodule(ref):  # a constant: where it is assigned
            out += [(f"{m}:{n}", ref) for m, mod in list(sys.modules.items())
                    if m.startswith("workbench") and getattr(mod, n, None) is ref and n in _module_assignments(m)]
    return [(key, ref) for key, ref in out if not inspect.ismodule(ref) and key.startswith("workbench")]


def test_training_paths_hold_what_their_code_names():
    """Each workbench function, class or constant that a kind's build function or training-path
    entry names is on that path too (or declared off it, ``recipes.OFF_PATH``): a helper a training
    function starts to call cannot stay outside the key."""
    from workbench.world.recipes import OFF_PATH
    from workbench.world.scheduler import RECIPES, resolve_path_entry

    plan_jobs("tiny")
    for kind, recipe in RECIPES.items():
        known = set(recipe.training_path) | set(OFF_PATH)
        # a class when some of its methods are on the path ("module:Class.method" -> "module:Class")
        known |= {e.partition(":")[0] + ":" + e.partition(":")[2].split(".")[0] for e in recipe.training_path}
        code = [recipe.build] + [resolve_path_entry(e) for e in recipe.training_path]
        missing = {(key, f.__qualname__) for f in code if inspect.isfunction(f) or inspect.isclass(f)
                   for key, ref in _named_workbench_objects(f) if key not in known and ref is not recipe.build}
        assert not missing, (kind, sorted(missing))


def test_job_key_follows_the_training_path_only(monkeypatch, tmp_path):
    """An edit inside a training function changes the key of every job that runs it (and of the
    jobs that depend on them); an edit outside the training path (generation, the zoo reader) or a
    move of a function does not."""
    from workbench import mllm
    from workbench.world import recipes, training
    from workbench.world.scheduler import RECIPES

    before = _tiny_keys()
    assert _tiny_keys() == before  # stable across calls

    def generate(self, prompt, modal_inputs=None, max_new_tokens=8):  # not on the training path
        return "edited"

    def summary(self, scoring="generate"):  # the zoo reader
        return None

    monkeypatch.setattr(mllm.MultimodalLM, "generate", generate)
    monkeypatch.setattr(Zoo, "summary", summary)
    assert _tiny_keys() == before

    # a move: the base LLM's build function in another module, its imports made absolute
    source = inspect.getsource(recipes._job_base)
    moved = (source.replace("from .training import", "from workbench.world.training import")
             .replace("from .tasks import", "from workbench.world.tasks import")
             .replace("from ..mllm import", "from workbench.mllm import"))
    assert moved.count("from workbench.") == 3
    (tmp_path / "moved_recipes.py").write_text("from __future__ import annotations\n\n\n" + moved)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(RECIPES, "base", dataclasses.replace(
        RECIPES["base"], build=importlib.import_module("moved_recipes")._job_base))
    assert _tiny_keys() == before

    source = inspect.getsource(training._lr_at)
    edited = source.replace("0.1 + 0.9", "0.2 + 0.8")  # one token of the learning-rate schedule
    assert edited != source
    (tmp_path / "edited_training.py").write_text("import math\n\n\n" + edited)
    monkeypatch.setattr(training, "_lr_at", importlib.import_module("edited_training")._lr_at)
    after = _tiny_keys()
    assert after["tokenizer"] == before["tokenizer"] and after["data"] == before["data"]
    assert after["image-full-s0"] != before["image-full-s0"] and after["base"] != before["base"]
    monkeypatch.undo()

    # a recipe version bump changes the kind's keys and those of the jobs downstream only
    monkeypatch.setitem(RECIPES, "projector", dataclasses.replace(RECIPES["projector"], version=2))
    bumped = _tiny_keys()
    assert bumped["base"] == before["base"] and bumped["image-projector-s0"] != before["image-projector-s0"]
    assert bumped["image-full-s0"] != before["image-full-s0"]


def test_job_keys_are_the_same_in_another_process():
    import subprocess
    import sys

    code = ("import json; from tests.test_zoo import _tiny_keys; print(json.dumps(_tiny_keys()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == _tiny_keys()


def test_zoo_coerce_takes_a_zoo_its_folder_or_a_preset(tmp_path, monkeypatch):
    """One way to open a zoo from what a caller passes: a :class:`Zoo` as is, a folder, a preset name
    (its ``zoo_root``), or ``None`` with a preset."""
    monkeypatch.setenv("WORKBENCH_ZOO", str(tmp_path))
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "zoo.json").write_text(json.dumps({"data_dir": str(tmp_path / "data"), "models": {}}))
    z = Zoo.coerce(folder)
    assert z.path == folder and Zoo.coerce(z) is z
    assert Zoo.coerce(str(folder)).path == folder
    assert Zoo.coerce("tiny").path == folder and Zoo.coerce(None, "tiny").path == folder
    with pytest.raises(ValueError):
        Zoo.coerce(None)
    with pytest.raises(FileNotFoundError):
        Zoo.coerce(tmp_path / "nowhere")


def test_llm_folders_name_the_weights_of_each_kind(tmp_path):
    models = {"a-full": "llm", "a-lora": "adapter", "a-damc": "adapter_text adapter_modality",
              "a-damc-full": "llm_text llm_modality", "a-projector": ""}
    for name, subs in models.items():
        for sub in subs.split() + ["projector"]:
            (tmp_path / "experts" / name / sub).mkdir(parents=True)
    (tmp_path / "zoo.json").write_text(json.dumps({"data_dir": str(tmp_path / "data"), "models": {
        name: {"path": f"experts/{name}"} for name in models}}))
    z = Zoo(tmp_path)
    for name, subs in models.items():
        assert z.llm_folders(name) == {s: tmp_path / "experts" / name / s for s in subs.split()}, name


def test_a_zoo_moved_with_its_inputs_reads_this_checkouts_inputs(tmp_path, monkeypatch):
    """zoo.json records its inputs' folder as an absolute path. Where that folder is gone and the zoo is the preset's
    zoo of this checkout, the checkout's inputs of the preset are read; a zoo elsewhere keeps the recorded folder
    (whose first read names it), and a recorded folder that exists is always the one read."""
    from workbench.world import zoo as zoo_module

    monkeypatch.setenv("WORKBENCH_ZOO", str(tmp_path / "zoos"))
    here = tmp_path / "checkout" / "data" / "generated" / "tiny"
    here.mkdir(parents=True)
    monkeypatch.setattr(zoo_module, "data_root", lambda preset: tmp_path / "checkout" / "data" / "generated" / preset)
    old = tmp_path / "old-checkout" / "data" / "generated" / "tiny"

    def zoo_at(folder: Path, data_dir: Path) -> Zoo:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "zoo.json").write_text(json.dumps({"preset": "tiny", "data_dir": str(data_dir), "models": {}}))
        return Zoo(folder)

    assert zoo_at(tmp_path / "zoos" / "tiny", old).data_dir == here  # moved: the old checkout is gone
    assert zoo_at(tmp_path / "elsewhere", old).data_dir == old  # not this checkout's zoo of the preset
    old.mkdir(parents=True)
    assert zoo_at(tmp_path / "zoos" / "tiny", old).data_dir == old  # the recorded folder, where it exists
