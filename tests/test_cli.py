"""Config + CLI: ``python -m workbench merge CONFIG.yaml`` and ``methods``, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_forward_llama, run_forward_llava, standin_methods, state_dict_of, tree_digest

from workbench import cli, engine
from workbench.config import MergeConfig
from workbench.errors import ConfigError
from workbench.io import NameFilter

REPO = Path(__file__).resolve().parents[1]


def _write_yaml(path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def standin(monkeypatch):
    """Route the CLI's method lookup to the stand-in registry."""
    reg = standin_methods()
    orig = engine.resolve_method
    monkeypatch.setattr(engine, "resolve_method", lambda name, registry=None: orig(name, reg))
    return reg


# ------------------------------------------------------------------------------------------ config
def test_yaml_relative_paths_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "cfgs").mkdir()
    y = _write_yaml(tmp_path / "cfgs" / "m.yaml", method="ties", base="../base", experts=["../e1", "/abs/e2"],
                    output="out", params={"density": 0.3}, max_shard_size="10MB")
    cfg = MergeConfig.from_yaml(y)
    assert cfg.base == (tmp_path / "cfgs" / ".." / "base")
    assert cfg.experts[1] == Path("/abs/e2") and cfg.output == tmp_path / "cfgs" / "out"
    assert cfg.max_shard_bytes == 10 * 10**6 and cfg.device == "auto" and cfg.seed == 0 and cfg.dtype is None
    assert cfg.copy_tokenizer is True


@pytest.mark.parametrize("bad", [{"dtype": "float8"}, {"max_shard_size": "2XB"}, {"experts": []},
                                 {"device": "tpu"}, {"exclude": ["["]}, {"unknown_key": 1}])
def test_config_errors(tmp_path, bad):
    data = {"method": "x", "base": "b", "experts": ["e"], "output": "o", **bad}
    with pytest.raises(ConfigError) as info:
        MergeConfig.from_dict(data)
    assert next(iter(bad)) in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        MergeConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        MergeConfig.from_yaml(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_merge_with_relative_yaml_and_set(tiny_llama, tiny_llama_experts, tmp_path, standin, capsys):
    y = _write_yaml(tmp_path / "merge.yaml", method="dare", base=os.path.relpath(tiny_llama, tmp_path),
                    experts=[os.path.relpath(e, tmp_path) for e in tiny_llama_experts], output="merged",
                    device="cpu", params={"p": 0.5})
    assert cli.main(["merge", str(y), "--quiet", "--set", "p=0.0", "--set", "lam=1.0"]) == 0
    out = tmp_path / "merged"
    assert "merged 14 tensors" in capsys.readouterr().out
    got = state_dict_of(out)
    base = state_dict_of(tiny_llama)
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    k = "model.layers.0.mlp.gate_proj.weight"  # p=0 -> plain task arithmetic
    assert torch.allclose(got[k], base[k] + sum(e[k] - base[k] for e in exps), atol=1e-5)
    assert json.loads((out / "workbench_merge.json").read_text())["params_used"]["p"] == 0.0


def test_cli_error_exit_status_names_the_file(tiny_llama, tiny_llama_experts, tmp_path, standin, capsys):
    y = _write_yaml(tmp_path / "m.yaml", method="average", base=str(tiny_llama),
                    experts=[str(tmp_path / "does_not_exist")], output=str(tmp_path / "o"))
    assert cli.main(["merge", str(y)]) == 2
    assert "does_not_exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_register_command_is_one_call(capsys):
    seen = {}
    cli.register_command("echo-test", "test command", lambda p: p.add_argument("word"),
                         lambda a: seen.setdefault("word", a.word) and 0)
    try:
        assert cli.main(["echo-test", "hello"]) == 0
        assert seen == {"word": "hello"}
    finally:
        cli.COMMANDS.pop("echo-test")


def test_lazy_command_missing_module_is_clear(monkeypatch):
    monkeypatch.setitem(cli.LAZY_COMMANDS, "ghost", ("workbench.no_such_module", "a ghost"))
    with pytest.raises(SystemExit, match="not available"):
        cli.main(["ghost"])


def test_cli_methods_lists_registry(capsys):
    from workbench.merging import METHODS

    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out
        assert f"{METHODS[name].pretty_name}: " in out and METHODS[name].reference in out  # display name, citation


def test_cli_methods_name_explains_every_parameter(capsys):
    from workbench.merging import METHODS

    assert cli.main(["methods", "ties"]) == 0
    out = capsys.readouterr().out
    for name in METHODS["ties"].defaults:
        assert f"  {name}: " in out, f"parameter {name} not explained"
    assert "density: float = 0.2" in out  # type from the signature, default from the registry
    assert "trim: str = 'per_tensor'  one of 'per_tensor', 'tensor', 'global'" in out  # choices
    assert "top ``density`` magnitudes" in out  # the docstring's sentence about it


def test_cli_version_and_unknown_preset_are_one_line(capsys):
    import workbench

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"workbench {workbench.__version__}"
    assert cli.main(["zoo", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nope'" in err[0] and "default" in err[0] and "tiny" in err[0]


def _every_method():
    from workbench.merging import METHODS

    return sorted(METHODS)


@pytest.mark.parametrize("method", _every_method())
def test_every_method_end_to_end_llama(method, tiny_llama, tiny_llama_experts, tmp_path):
    before = {p: tree_digest(p) for p in [tiny_llama, *tiny_llama_experts]}
    y = _write_yaml(tmp_path / "m.yaml", method=method, base=str(tiny_llama),
                    experts=[str(e) for e in tiny_llama_experts], output=str(tmp_path / "out"), device="cpu",
                    max_shard_size="40KB")
    assert cli.main(["merge", str(y), "--quiet"]) == 0
    out = tmp_path / "out"
    assert torch.isfinite(run_forward_llama(out)).all()
    base, got = state_dict_of(tiny_llama), state_dict_of(out)
    for k in base:
        if not NameFilter().merged(k):
            assert torch.equal(got[k], base[k]), k
    assert before == {p: tree_digest(p) for p in [tiny_llama, *tiny_llama_experts]}


@pytest.mark.parametrize("method", _every_method())
def test_every_method_end_to_end_llava(method, tiny_llava, tiny_llava_experts, tmp_path):
    y = _write_yaml(tmp_path / "m.yaml", method=method, base=str(tiny_llava),
                    experts=[str(e) for e in tiny_llava_experts], output=str(tmp_path / "out"), device="cpu")
    assert cli.main(["merge", str(y), "--quiet"]) == 0
    out = tmp_path / "out"
    assert torch.isfinite(run_forward_llava(out)).all()
    base, got = state_dict_of(tiny_llava), state_dict_of(out)
    for k in base:
        if not NameFilter().merged(k):
            assert torch.equal(got[k], base[k]), k


def test_real_weight_average_equals_direct_mean_via_subprocess(tiny_llama, tiny_llama_experts, tmp_path):
    from workbench.merging import METHODS

    name = "weight_average"
    assert name in METHODS
    y = _write_yaml(tmp_path / "m.yaml", method=name, base=str(tiny_llama),
                    experts=[str(e) for e in tiny_llama_experts], output=str(tmp_path / "out"), device="cpu")
    r = subprocess.run([sys.executable, "-m", "workbench", "merge", str(y), "--quiet"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    base, got = state_dict_of(tiny_llama), state_dict_of(tmp_path / "out")
    exps = [state_dict_of(e) for e in tiny_llama_experts]
    for k in base:
        want = torch.stack([e[k] for e in exps]).mean(0) if NameFilter().merged(k) else base[k]
        assert torch.allclose(got[k], want, atol=1e-6), k
