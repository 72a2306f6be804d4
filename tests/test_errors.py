"""Bad inputs: each raises naming the file (and tensor), writes nothing, and leaves inputs intact."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import standin_methods, tree_digest
from safetensors.torch import load_file, save_file

from workbench.engine import merge
from workbench.errors import CheckpointError, ConfigError

REG = standin_methods()
Q = "model.layers.1.self_attn.q_proj.weight"


def _edit_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _run_and_check(cfg: dict, inputs: list[Path], exc_type, *, file: Path | None, tensor: str | None):
    out = Path(cfg["output"])
    before = {p: tree_digest(p) for p in inputs}
    with pytest.raises(exc_type) as info:
        merge(cfg, methods=REG, progress=False)
    err = info.value
    if file is not None:
        assert str(file) in str(err), str(err)
        if isinstance(err, CheckpointError):
            assert err.file is not None and str(file) in err.file
    if tensor is not None:
        assert tensor in str(err)
        assert getattr(err, "tensor", None) == tensor
    assert not out.exists(), "nothing may be written on error"
    assert not list(out.parent.glob(f"{out.name}.tmp-*")), "temporary output left behind"
    assert before == {p: tree_digest(p) for p in inputs}, "inputs changed"
    return err


def _cfg(base, experts, out, method="average", **kw):
    return {"method": method, "base": str(base), "experts": [str(e) for e in experts], "output": str(out),
            "device": "cpu", **kw}


def test_shape_mismatch(tiny_llama, tiny_llama_experts, tmp_path):
    bad = _edit_copy(tiny_llama_experts[1], tmp_path / "bad",
                     lambda sd: sd.__setitem__(Q, torch.zeros(sd[Q].shape[0], sd[Q].shape[1] + 1)))
    experts = [tiny_llama_experts[0], bad]
    _run_and_check(_cfg(tiny_llama, experts, tmp_path / "out"), [tiny_llama, *experts], CheckpointError,
                   file=bad / "model.safetensors", tensor=Q)


def test_missing_tensor(tiny_llama, tiny_llama_experts, tmp_path):
    bad = _edit_copy(tiny_llama_experts[1], tmp_path / "bad", lambda sd: sd.pop(Q))
    experts = [tiny_llama_experts[0], bad]
    _run_and_check(_cfg(tiny_llama, experts, tmp_path / "out"), [tiny_llama, *experts], CheckpointError,
                   file=bad, tensor=Q)


def test_extra_tensor(tiny_llama, tiny_llama_experts, tmp_path):
    bad = _edit_copy(tiny_llama_experts[0], tmp_path / "bad", lambda sd: sd.__setitem__("extra.weight", torch.ones(2)))
    _run_and_check(_cfg(tiny_llama, [bad], tmp_path / "out"), [tiny_llama, bad], CheckpointError,
                   file=bad / "model.safetensors", tensor="extra.weight")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_expert(tiny_llama, tiny_llama_experts, tmp_path, value):
    def poison(sd):
        sd[Q] = sd[Q].clone()
        sd[Q][3, 5] = value
    bad = _edit_copy(tiny_llama_experts[2], tmp_path / "bad", poison)
    experts = [tiny_llama_experts[0], bad]
    _run_and_check(_cfg(tiny_llama, experts, tmp_path / "out"), [tiny_llama, *experts], CheckpointError,
                   file=bad / "model.safetensors", tensor=Q)


def test_non_finite_kept_base_tensor(tiny_llama, tiny_llama_experts, tmp_path):
    norm = "model.norm.weight"  # kept from the base: still checked

    def poison(sd):
        sd[norm] = sd[norm].clone()
        sd[norm][0] = float("-inf")
    bad = _edit_copy(tiny_llama, tmp_path / "badbase", poison)
    _run_and_check(_cfg(bad, tiny_llama_experts, tmp_path / "out"), [bad, *tiny_llama_experts], CheckpointError,
                   file=bad / "model.safetensors", tensor=norm)


def test_truncated_file(tiny_llama, tiny_llama_experts, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny_llama_experts[0], bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    err = _run_and_check(_cfg(tiny_llama, [bad], tmp_path / "out"), [tiny_llama, bad], CheckpointError,
                         file=f, tensor=None)
    assert "truncated" in str(err)


def test_corrupt_header(tiny_llama, tiny_llama_experts, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_experts[0], bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + 16] = b"#garbage garbage"  # break the JSON
    f.write_bytes(bytes(data))
    err = _run_and_check(_cfg(tiny_llama, [bad], tmp_path / "out"), [tiny_llama, bad], CheckpointError,
                         file=f, tensor=None)
    assert "header" in str(err)


def test_header_length_beyond_file(tiny_llama_experts, tmp_path, tiny_llama):
    bad = tmp_path / "corrupt2"
    shutil.copytree(tiny_llama_experts[0], bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**7)
    f.write_bytes(bytes(data))
    _run_and_check(_cfg(tiny_llama, [bad], tmp_path / "out"), [tiny_llama, bad], CheckpointError, file=f, tensor=None)


def test_wrong_offsets_in_header(tiny_llama, tiny_llama_experts, tmp_path):
    """A header whose offsets disagree with the shapes names the tensor."""
    bad = tmp_path / "offsets"
    shutil.copytree(tiny_llama_experts[0], bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[Q]["shape"] = [header[Q]["shape"][0], header[Q]["shape"][1] - 1]
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    _run_and_check(_cfg(tiny_llama, [bad], tmp_path / "out"), [tiny_llama, bad], CheckpointError, file=f, tensor=Q)


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_is_an_input(tiny_llama, tiny_llama_experts, tmp_path, where):
    out = {"same": tiny_llama_experts[1], "inside": tiny_llama_experts[1] / "sub",
           "around": tiny_llama_experts[1].parent}[where]
    before = {p: tree_digest(p) for p in [tiny_llama, *tiny_llama_experts]}
    with pytest.raises(ConfigError, match=str(tiny_llama_experts[1].parent)):
        merge(_cfg(tiny_llama, tiny_llama_experts, out), methods=REG, progress=False)
    assert not (tiny_llama_experts[1] / "sub").exists()
    assert not list(out.parent.glob("*.tmp-*"))
    assert before == {p: tree_digest(p) for p in [tiny_llama, *tiny_llama_experts]}


def test_unknown_method(tiny_llama, tiny_llama_experts, tmp_path):
    err = _run_and_check(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "out", method="nope"),
                         [tiny_llama, *tiny_llama_experts], ConfigError, file=None, tensor=None)
    assert "nope" in str(err)


def test_unknown_param(tiny_llama, tiny_llama_experts, tmp_path):
    err = _run_and_check(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "out", method="dare",
                              params={"p": 0.1, "densty": 0.3}),
                         [tiny_llama, *tiny_llama_experts], ConfigError, file=None, tensor=None)
    assert "densty" in str(err)


def test_unknown_config_field_and_bad_regex(tiny_llama, tiny_llama_experts, tmp_path):
    with pytest.raises(ConfigError, match="methd"):
        merge({**_cfg(tiny_llama, tiny_llama_experts, tmp_path / "out"), "methd": "x"}, methods=REG)
    with pytest.raises(ConfigError, match="regex"):
        merge(_cfg(tiny_llama, tiny_llama_experts, tmp_path / "out", include=["("]), methods=REG)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_llama, tiny_llama_experts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists"):
        merge(_cfg(tiny_llama, tiny_llama_experts, out), methods=REG, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    # overwrite replaces only a folder a merge wrote (or an empty one): never a user's folder
    with pytest.raises(ConfigError, match="keep.txt"):
        merge(_cfg(tiny_llama, tiny_llama_experts, out, overwrite=True), methods=REG, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    merge(_cfg(tiny_llama, tiny_llama_experts, out, overwrite=True), methods=REG, progress=False)
    (out / "stray.txt").write_text("y")  # a previous merge output (workbench_merge.json) is replaced whole
    merge(_cfg(tiny_llama, tiny_llama_experts, out, overwrite=True), methods=REG, progress=False)
    assert not (out / "stray.txt").exists() and (out / "model.safetensors").exists()


def test_method_failure_mid_merge_leaves_nothing(tiny_llama, tiny_llama_experts, tmp_path):
    """An exception half-way through (after some tensors were written) removes the temporary output."""
    from conftest import StandInSpec

    seen = []

    def flaky(base, experts, *, name="", generator=None):
        seen.append(name)
        if len(seen) == 5:
            raise RuntimeError("method crashed")
        return experts[0]

    reg = {"flaky": StandInSpec("flaky", flaky)}
    out = tmp_path / "out"
    try:
        merge(_cfg(tiny_llama, tiny_llama_experts, out, method="flaky"), methods=reg, progress=False)
    except RuntimeError as e:  # the caller still holds the traceback (and so the engine's frames)
        assert "crashed" in str(e)
        import threading

        assert not [t for t in threading.enumerate() if t.name == "workbench-prefetch"], "reader thread left running"
    else:
        pytest.fail("no error raised")
    assert len(seen) == 5
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_lora_adapter_on_wrong_base(tiny_llava, tiny_lora_adapters, tmp_path):
    _run_and_check(_cfg(tiny_llava, tiny_lora_adapters[:1], tmp_path / "out"),
                   [tiny_llava, tiny_lora_adapters[0]], CheckpointError,
                   file=tiny_lora_adapters[0] / "adapter_model.safetensors", tensor=None)


def test_bin_with_pickled_object_refused(tiny_llama, tmp_path):
    """weights_only=True: a .bin holding an arbitrary object is refused, naming the file."""
    bad = tmp_path / "binexp"
    bad.mkdir()
    torch.save({"w": torch.ones(2), "obj": _Evil()}, bad / "pytorch_model.bin")
    _run_and_check(_cfg(tiny_llama, [bad], tmp_path / "out"), [tiny_llama, bad], CheckpointError,
                   file=bad / "pytorch_model.bin", tensor=None)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
