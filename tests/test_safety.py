"""Nothing lost, nothing silently wrong (issue 16): the real command line on tiny checkpoints.

Every case runs ``workbench merge CONFIG.yaml`` / ``workbench profile`` - as a subprocess
(``python -m workbench``) for the headline cases and the signals, else in-process through
:func:`workbench.cli.main`, the same entry point - and checks the exit code, the message (it names
the file / tensor / parameter), that the inputs are byte-identical and that nothing is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb_checkpoint, tiny_llama_config, tree_digest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from workbench import cli

REPO = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj.weight"


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def world(tiny_llama, tmp_path_factory):
    """The tiny Llama base, two true experts (base + N(0, 0.002^2): ||tau|| / ||theta_0|| ~ 0.1, as
    the issue's) and a foreign expert (an independently initialised Llama of the same shape: ~1.41)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("safety")
    true = [perturb_checkpoint(tiny_llama, root / f"true{i}", seed=20 + i, std=0.002) for i in (1, 2)]
    torch.manual_seed(7)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "foreign")
    return {"base": tiny_llama, "true": true, "foreign": root / "foreign"}


def write_cfg(folder: Path, base: Path, experts, output: Path, **kw) -> Path:
    cfg = {"method": "weight_average", "base": str(base), "experts": [str(e) for e in experts],
           "output": str(output), "device": "cpu", **kw}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"merge-{len(list(folder.glob('merge-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_inproc(capsys, *args) -> tuple[int, str]:
    """``workbench ARGS`` through :func:`workbench.cli.main`; ``(exit status, stderr)``."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_proc(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m workbench ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "workbench", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


#: ``python -c`` program: the real CLI, with the writer's first write into the LAST shard either
#: sending this process SIGTERM (MODE=term) or announcing itself in the file MARK and pausing
#: (MODE=pause), so the test can signal it from outside at that exact point.
_LAST_SHARD_HOOK = r"""
import os, signal, sys, time
from workbench.io import writer as W
orig = W.CheckpointWriter._write_planned
def hooked(self, name, tensor):
    if self._entries[name][0] == len(self._shard_files) - 1 and not getattr(self, "_hooked", False):
        self._hooked = True
        if os.environ["MODE"] == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            open(os.environ["MARK"], "w").close()
            time.sleep(120)
    return orig(self, name, tensor)
W.CheckpointWriter._write_planned = hooked
from workbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_hooked(mode: str, mark: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _LAST_SHARD_HOOK, *map(str, args)], env={
        **_env(), "MODE": mode, "MARK": str(mark)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "the hooked merge never reached the last shard"
        time.sleep(0.05)


def leftovers(out: Path) -> list[Path]:
    """The output and any temporary sibling of it."""
    return sorted(p for p in out.parent.glob(f"{out.name}*")) if out.parent.exists() else []


def digests(*folders: Path) -> dict:
    return {str(f): tree_digest(f) for f in folders}


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ overwrite
def test_overwrite_refuses_a_folder_that_is_not_a_merge_output(world, tmp_path, capsys):
    """``overwrite: true`` on a user's folder (``notes.txt``, ``thesis/``) is refused, untouched; a
    previous merge output (its ``workbench_merge.json``) is replaced."""
    out = tmp_path / "mine"
    (out / "thesis").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "thesis" / "ch1.tex").write_text("chapter 1")
    inputs = digests(world["base"], *world["true"], out)
    cfg = write_cfg(tmp_path, world["base"], world["true"], out, overwrite=True)
    r = run_proc("merge", cfg, "--quiet")
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr)
    assert str(out) in line and "notes.txt" in line and "workbench_merge.json" in line
    assert digests(world["base"], *world["true"], out) == inputs
    assert leftovers(out) == [out]
    # an output this tool wrote is replaced (in-process: the same entry point)
    done = tmp_path / "done"
    cfg2 = write_cfg(tmp_path, world["base"], world["true"], done)
    assert run_inproc(capsys, "merge", cfg2, "--quiet")[0] == 0
    (done / "extra.txt").write_text("stale")
    cfg3 = write_cfg(tmp_path, world["base"], world["true"], done, overwrite=True)
    rc, err = run_inproc(capsys, "merge", cfg3, "--quiet")
    assert rc == 0 and "warning" not in err, err
    assert not (done / "extra.txt").exists() and (done / "workbench_merge.json").is_file()
    assert leftovers(done) == [done]


def test_output_that_is_a_regular_file_is_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    for overwrite in (False, True):
        rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], world["true"], out,
                                                        overwrite=overwrite), "--quiet")
        assert rc == 2 and str(out) in one_line(err) and "not a folder" in err
        assert out.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------ folder layout
@pytest.mark.parametrize("shards_left", [True, False])
def test_single_file_wins_over_a_stale_index_as_in_transformers(world, tmp_path, capsys, shards_left):
    """``model.safetensors`` beside a stale ``model.safetensors.index.json`` (+ shards, or with the
    shards gone: a re-save unsharded over a sharded save): merged from ``model.safetensors``, which
    is what transformers loads, with a warning; the index alone used to be merged (or refused)."""
    from transformers import LlamaForCausalLM

    stale = tmp_path / "stale"
    LlamaForCausalLM.from_pretrained(world["foreign"]).save_pretrained(stale, max_shard_size="20KB")
    assert (stale / "model.safetensors.index.json").is_file() and not (stale / "model.safetensors").exists()
    if not shards_left:
        for f in stale.glob("model-*.safetensors"):
            f.unlink()
    shutil.copy2(world["true"][0] / "model.safetensors", stale / "model.safetensors")
    loaded = LlamaForCausalLM.from_pretrained(stale).state_dict()  # what transformers reads: the single file
    want = load_file(str(world["true"][0] / "model.safetensors"))
    assert all(torch.equal(loaded[k], want[k]) for k in want)

    inputs = digests(world["base"], stale, world["true"][1])
    out, ref = tmp_path / "out", tmp_path / "ref"
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], [stale, world["true"][1]], out),
                         "--quiet")
    assert rc == 0, err
    assert "model.safetensors.index.json" in err and str(stale) in err and "warning" in err
    assert run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], world["true"], ref), "--quiet")[0] == 0
    got, exp = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert got.keys() == exp.keys() and all(torch.equal(got[k], exp[k]) for k in exp)
    assert digests(world["base"], stale, world["true"][1]) == inputs


def test_lora_folder_without_adapter_config_names_the_missing_file(world, tiny_lora_adapters, tmp_path, capsys):
    ad = tmp_path / "ad"
    shutil.copytree(tiny_lora_adapters[0], ad)
    (ad / "adapter_config.json").unlink()
    out = tmp_path / "out"
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], [ad, tiny_lora_adapters[1]], out),
                         "--quiet")
    assert rc == 2 and str(ad / "adapter_config.json") in one_line(err) and "missing" in err
    assert "LoraAdapter" not in err and leftovers(out) == []


# ------------------------------------------------------------------------------------------ values
def test_float16_overflow_after_the_cast_is_refused_and_created_parents_removed(world, tmp_path, capsys):
    """A merged value past the float16 range (finite in float32) is refused after the cast, naming
    the tensor; the merge into ``a/new/deep/out`` removes the parents it created."""
    big = tmp_path / "big"
    shutil.copytree(world["true"][1], big)
    sd = load_file(str(big / "model.safetensors"))
    sd[Q][0, 0] = 2.0e5  # mean with the other expert ~1e5 > 65504
    save_file(sd, str(big / "model.safetensors"), metadata={"format": "pt"})
    inputs = digests(world["base"], world["true"][0], big)
    out = tmp_path / "a" / "new" / "deep" / "out"
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], [world["true"][0], big], out,
                                                    dtype="float16"), "--quiet")
    assert rc == 2
    line = one_line(err)
    assert repr(Q) in line and "float16" in line and str(out) in line
    assert not (tmp_path / "a").exists(), "the parents the failed merge created are removed"
    assert digests(world["base"], world["true"][0], big) == inputs


@pytest.mark.parametrize("method, params, name, expected", [
    ("ties", {"density": "high"}, "density", "float"),
    ("task_arithmetic", {"scale": None}, "scale", "float"),
    ("task_arithmetic", {"weights": ["a", "b"]}, "weights", "Sequence[float]"),
    ("tsv", {"rank": 2.5}, "rank", "int"),
])
def test_wrongly_typed_parameters_name_parameter_and_type(world, tmp_path, capsys, method, params, name, expected):
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, world["base"], world["true"], out, method=method, params=params)
    rc, err = run_inproc(capsys, "merge", cfg, "--quiet")
    assert rc == 2
    line = one_line(err)
    assert f"parameter {name!r}" in line and expected in line and repr(params[name]) in line
    assert leftovers(out) == []


def test_wrongly_typed_parameter_real_cli_no_traceback(world, tmp_path):
    out = tmp_path / "out"
    r = run_proc("merge", write_cfg(tmp_path, world["base"], world["true"], out, method="ties",
                                    params={"density": "high"}), "--quiet")
    assert r.returncode == 2 and "parameter 'density'" in one_line(r.stderr) and "float" in r.stderr
    assert leftovers(out) == []


def test_a_number_written_as_yaml_string_is_accepted(world, tmp_path, capsys):
    """PyYAML reads ``1e-1`` as a string; a string that spells a number is converted, not refused."""
    out = tmp_path / "out"
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: task_arithmetic\nbase: {world['base']}\nexperts: [{world['true'][0]}, "
                   f"{world['true'][1]}]\noutput: {out}\ndevice: cpu\nparams: {{scale: 1e-1}}\n")
    assert isinstance(yaml.safe_load(cfg.read_text())["params"]["scale"], str)
    rc, err = run_inproc(capsys, "merge", cfg, "--quiet")
    assert rc == 0, err
    assert json.loads((out / "workbench_merge.json").read_text())["params_used"]["scale"] == 0.1


# ------------------------------------------------------------------------------------------ foreign experts
def test_foreign_expert_warns_and_strict_refuses(world, tmp_path, capsys):
    out = tmp_path / "out"
    experts = [world["true"][0], world["foreign"]]
    inputs = digests(world["base"], *experts)
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], experts, out), "--quiet")
    assert rc == 0
    warned = [line for line in err.splitlines() if "fine-tuned from another base" in line]
    assert len(warned) == 1 and str(world["foreign"]) in warned[0] and "model.layers." in warned[0]
    ratio = float(warned[0].split("= ")[1].split()[0])
    assert 1.3 < ratio < 1.5  # sqrt(2) for an independent init of the same scale
    shutil.rmtree(out)
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], experts, out, strict=True), "--quiet")
    assert rc == 2 and str(world["foreign"]) in one_line(err) and "strict" in err
    assert leftovers(out) == [] and digests(world["base"], *experts) == inputs
    # true experts: no warning at all
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], world["true"], out, strict=True),
                         "--quiet")
    assert rc == 0 and "warning" not in err, err


def test_profile_shows_the_same_foreign_warning(world, tmp_path, capsys):
    out = tmp_path / "prof"
    args = ["profile", world["base"], f"a={world['true'][0]}", f"b={world['foreign']}", "--out", out,
            "--device", "cpu", "-q"]
    rc, err = run_inproc(capsys, *args)
    assert rc == 0 and "fine-tuned from another base" in err and str(world["foreign"]) in err
    assert str(world["true"][0]) not in err
    rc, err = run_inproc(capsys, *args[:4], "--out", tmp_path / "strict", "--device", "cpu", "-q", "--strict")
    assert rc == 2 and str(world["foreign"]) in one_line(err)
    assert leftovers(tmp_path / "strict") == []


def test_profile_foreign_check_reads_repo_relative_paths(world, tmp_path, monkeypatch):
    """Result files name files relative to the repository (``paths.repo_relative``); the profile's
    foreign check reads the base back from its meta, so a checkout-internal base must still resolve
    (whatever the working directory, as in a notebook run from ``notebooks/``)."""
    import workbench.paths as paths
    from workbench.analysis import profile_interference

    repo = tmp_path / "repo"
    base = shutil.copytree(world["base"], repo / "zoo" / "base")
    monkeypatch.setattr(paths, "REPO_ROOT", repo)
    monkeypatch.chdir(tmp_path)
    prof = profile_interference(base, {"a": world["true"][0], "b": world["true"][1]}, device="cpu", progress=False)
    assert prof.meta["base_path"] == "zoo/base"  # stored relative, read back from the repository root
    assert len(prof.per_expert) > 0


def _renamed_adapter(src: Path, dst: Path, base_name: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_lora_adapter_naming_another_base(world, tiny_lora_adapters, tmp_path, capsys):
    other = _renamed_adapter(tiny_lora_adapters[0], tmp_path / "other", "other-org/other-model")
    out = tmp_path / "out"
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], [other, tiny_lora_adapters[1]], out),
                         "--quiet")
    assert rc == 0
    named = [line for line in err.splitlines() if "other-org/other-model" in line]
    assert len(named) == 1 and str(other / "adapter_config.json") in named[0]
    assert str(tiny_lora_adapters[1]) + " was trained" not in err  # the fixture's adapter names this base
    shutil.rmtree(out)
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], [other, tiny_lora_adapters[1]], out,
                                                    strict=True), "--quiet")
    assert rc == 2 and "other-org/other-model" in one_line(err) and leftovers(out) == []
    rc, err = run_inproc(capsys, "profile", world["base"], f"a={other}", f"b={tiny_lora_adapters[1]}",
                         "--out", tmp_path / "prof", "--device", "cpu", "-q", "--strict")
    assert rc == 2 and "other-org/other-model" in one_line(err) and leftovers(tmp_path / "prof") == []


# ------------------------------------------------------------------------------------------ profile
def test_profile_refuses_an_adapter_for_another_architecture(tiny_llava, tiny_lora_adapters, tmp_path, capsys):
    """The Llama adapters on a LLaVA base: the merge refuses them, and now the profile too (it used
    to exit 0 with rel_norm 0.00 everywhere)."""
    inputs = digests(tiny_llava, *tiny_lora_adapters)
    out = tmp_path / "prof"
    rc, err = run_inproc(capsys, "profile", tiny_llava, *(f"e{i}={p}" for i, p in enumerate(tiny_lora_adapters)),
                         "--out", out, "--device", "cpu", "-q")
    assert rc == 2
    line = one_line(err)
    assert str(tiny_lora_adapters[0] / "adapter_model.safetensors") in line and "model.layers." in line
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, tiny_llava, tiny_lora_adapters, tmp_path / "m"),
                         "--quiet")
    assert rc == 2 and "model.layers." in err  # the same check, the same refusal
    assert leftovers(out) == [] and digests(tiny_llava, *tiny_lora_adapters) == inputs


def test_profile_out_inside_an_input_is_refused(world, tmp_path, capsys):
    inputs = digests(world["base"], *world["true"])
    rc, err = run_inproc(capsys, "profile", world["base"], f"a={world['true'][0]}", f"b={world['true'][1]}",
                         "--out", world["true"][0] / "prof", "--device", "cpu", "-q")
    assert rc == 2 and str(world["true"][0]) in one_line(err) and "inside" in err
    assert digests(world["base"], *world["true"]) == inputs


def test_profile_nan_error_names_the_experts_file_and_tensor(world, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(world["true"][1], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd[Q][1, 2] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rc, err = run_inproc(capsys, "profile", world["base"], f"a={world['true'][0]}", f"b={bad}", "--out",
                         tmp_path / "prof", "--device", "cpu", "-q")
    assert rc == 2
    line = one_line(err)
    assert str(bad / "model.safetensors") in line and repr(Q) in line and "'b'" in line
    assert str(world["base"]) not in line and leftovers(tmp_path / "prof") == []


# ------------------------------------------------------------------------------------------ signals, debris
def test_sigterm_during_the_write_of_the_last_shard(world, tmp_path):
    """SIGTERM (a timeout, Slurm preemption) in the middle of the last shard: one line, exit 143,
    no temporary folder, no parents left, inputs intact."""
    out = tmp_path / "new" / "out"
    inputs = digests(world["base"], *world["true"])
    cfg = write_cfg(tmp_path, world["base"], world["true"], out, max_shard_size="20KB")
    p = start_hooked("term", tmp_path / "mark", "merge", cfg, "--quiet")
    _, err = p.communicate(timeout=180)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert one_line(err) == "workbench merge: interrupted; nothing written"
    assert not (tmp_path / "new").exists() and digests(world["base"], *world["true"]) == inputs


def test_ctrl_c_from_outside_one_line_exit_130(world, tmp_path):
    out = tmp_path / "out"
    mark = tmp_path / "mark"
    cfg = write_cfg(tmp_path, world["base"], world["true"], out, max_shard_size="20KB")
    p = start_hooked("pause", mark, "merge", cfg, "--quiet")
    wait_for(mark, p)
    assert len(leftovers(out)) == 1  # the temporary folder, mid-write
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert one_line(err) == "workbench merge: interrupted; nothing written"
    assert leftovers(out) == []


def test_kill_9_debris_is_removed_by_the_next_merge(world, tmp_path, capsys):
    out = tmp_path / "out"
    mark = tmp_path / "mark"
    cfg = write_cfg(tmp_path, world["base"], world["true"], out, max_shard_size="20KB")
    p = start_hooked("pause", mark, "merge", cfg, "--quiet")
    wait_for(mark, p)
    p.kill()
    p.communicate(timeout=60)
    debris = leftovers(out)
    assert [d.name for d in debris] == [f"out.tmp-{p.pid}"]
    rc, err = run_inproc(capsys, "merge", cfg, "--quiet")
    assert rc == 0 and "removed the stale temporary folder" in err and str(debris[0]) in err
    assert leftovers(out) == [out]


def test_stale_folders_of_dead_processes_only(world, tmp_path, capsys):
    """Next to the output: a dead process's ``.tmp-`` folder is removed, its ``.old-`` folder (killed
    between an overwrite's two renames, the output missing) is the previous output and is put back;
    a live process's temporary folder is left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    (tmp_path / f"out.tmp-{dead.pid}").mkdir()
    (tmp_path / f"out.old-{dead.pid}").mkdir()
    (tmp_path / f"out.old-{dead.pid}" / "workbench_merge.json").write_text("{}")
    live = tmp_path / f"out.tmp-{os.getppid()}"
    live.mkdir()
    rc, err = run_inproc(capsys, "merge", write_cfg(tmp_path, world["base"], world["true"], out), "--quiet")
    assert rc == 2 and "restored the previous output" in err and "removed the stale temporary folder" in err
    assert "already exists" in err.splitlines()[-1]
    assert (out / "workbench_merge.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out", live.name]


# ------------------------------------------------------------------------------------------ corruption
_counter = iter(range(10**6))


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), where=st.sampled_from(["body", "header", "exponent"]), n=st.integers(1, 4))
def test_random_corruption_never_gives_a_wrong_output(world, tmp_path, capsys, data, where, n):
    """Random bytes written into an expert's safetensors header or body (or into the exponent byte of
    float32 entries, which makes NaN / Inf likely): the merge either fails
    (exit 2, naming the file, nothing written) or succeeds with exactly the merge of what the
    reference reader (``safetensors.torch.load_file``) reads from the damaged file - never exit 0
    with anything else (e.g. a misread header, or NaN / Inf written)."""
    case = tmp_path / f"case{next(_counter)}"
    bad = case / "bad"
    shutil.copytree(world["true"][1], bad)
    f = bad / "model.safetensors"
    raw = bytearray(f.read_bytes())
    head = 8 + int.from_bytes(raw[:8], "little")
    lo, hi = (0, head) if where == "header" else (head, len(raw))
    for _ in range(n):
        if where == "exponent":  # the top byte of a float32 (little-endian): 0x7f/0xff make NaN or Inf likely
            at = head + 4 * data.draw(st.integers(0, (len(raw) - head) // 4 - 1)) + 3
            raw[at] = data.draw(st.sampled_from([0x7F, 0xFF, 0x00, 0x80]))
            raw[at - 1] |= data.draw(st.sampled_from([0x80, 0x00]))
        else:
            raw[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
    f.write_bytes(bytes(raw))
    out = case / "out"
    rc, err = run_inproc(capsys, "merge", write_cfg(case, world["base"], [world["true"][0], bad], out,
                                                    keep_defaults=False), "--quiet")
    try:
        ref = load_file(str(f))
    except Exception:
        ref = None
    event(f"{where}: exit {rc}, reference reader {'reads' if ref is not None else 'rejects'} the file")
    if rc == 0:
        assert ref is not None, "accepted a file the reference reader rejects"
        got = load_file(str(out / "model.safetensors"))
        other = load_file(str(world["true"][0] / "model.safetensors"))
        assert got.keys() == ref.keys() == other.keys()
        for k, v in got.items():
            assert torch.isfinite(v).all(), k
            torch.testing.assert_close(v, (other[k] + ref[k]) / 2, rtol=0, atol=1e-6)
    else:
        assert rc == 2 and str(bad) in one_line(err), err
        assert leftovers(out) == []


# ------------------------------------------------------------------------------------------ the shared checks
@pytest.mark.parametrize("named, warns", [(None, False), ("", False), ("BASE", False), ("some-org/base", False),
                                          ("/elsewhere/other-model", True), ("meta-llama/Llama-2-7b-hf", True)])
def test_lora_base_name_rules(tiny_llama, tmp_path, named, warns):
    """The adapter's ``base_model_name_or_path`` matches the base's folder (path or name: a hub id
    ``org/name`` matches a folder called ``name``); anything else warns, and raises with strict."""
    from types import SimpleNamespace

    from workbench.errors import CheckpointError, WorkbenchWarning
    from workbench.io import CheckpointReader
    from workbench.io.validate import check_lora_base_name

    assert tiny_llama.name == "base"
    adapter = SimpleNamespace(path=tmp_path, adapter_config={"base_model_name_or_path":
                                                             str(tiny_llama) if named == "BASE" else named})
    base = CheckpointReader(tiny_llama)
    if not warns:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_lora_base_name(adapter, base, strict=True)
        return
    with pytest.warns(WorkbenchWarning, match="adapter_config.json"):
        check_lora_base_name(adapter, base)
    with pytest.raises(CheckpointError, match="strict"):
        check_lora_base_name(adapter, base, strict=True)


def test_task_vector_norms_ratio_and_rows():
    """The ratio is sqrt(sum |tau|^2 / sum |theta_0|^2) over matrices only; ``observe`` on every 8th
    row agrees with the full sums for i.i.d. entries, and an independent same-scale draw gives ~sqrt(2)."""
    from workbench.io.validate import TaskVectorNorms

    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 256, generator=g)
    near, far = base + 0.1 * torch.randn(512, 256, generator=g), torch.randn(512, 256, generator=g)
    n = TaskVectorNorms(["near", "far"])
    n.observe("w", base, [near, far])
    n.observe("norm", torch.ones(256), [torch.ones(256) * 5, torch.ones(256) * 5])  # vectors are left out
    assert abs(n.ratio(0) - 0.1) < 0.005 and abs(n.ratio(1) - 2 ** 0.5) < 0.03
    with pytest.warns(Warning, match="far"):
        assert n.check() == ["far"]
