"""Smoke tests of the benchmark scripts: they run end to end on tiny models and print their ratio
lines and result files. Structure only - no timing is asserted (the timings are noisy by nature)."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import synthetic  # noqa: E402
from synthetic import LlamaShape, parse_bytes, parse_count, shard_groups, write_checkpoints  # noqa: E402

MERGEKIT_PY = Path("/work/mergekit-venv/bin/python")


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# ------------------------------------------------------------------------------------ synthetic
def test_parse_counts_and_sizes():
    assert parse_count("272M") == 272_000_000
    assert parse_count("7B") == 7_000_000_000
    assert parse_count("1.5e8") == 150_000_000
    assert parse_bytes("200MB") == 200_000_000
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("100KB") == 100_000


def test_llama_shapes():
    s = LlamaShape.for_params(parse_count("272M"))
    assert (s.hidden, s.intermediate, s.vocab) == (1024, 2816, 32000)
    assert abs(s.n_params - 272e6) / 272e6 < 0.02
    big = s.deeper(2 * s.n_params)
    assert (big.hidden, big.intermediate, big.vocab) == (s.hidden, s.intermediate, s.vocab)
    assert big.layers > s.layers and big.largest_tensor == s.largest_tensor
    b7 = LlamaShape.llama_7b()
    assert (b7.hidden, b7.intermediate, b7.layers, b7.vocab) == (4096, 11008, 32, 32000)
    assert 6.6e9 < b7.n_params < 6.8e9  # Llama-2-7B: 6.74B
    plan = b7.plan()
    assert plan["model.layers.31.mlp.down_proj.weight"] == (4096, 11008)
    assert plan["lm_head.weight"] == (32000, 4096)


def test_shard_groups_respect_size():
    plan = LlamaShape(64, 176, 3, 256).plan()
    groups = shard_groups(plan, 2, 50_000)
    assert [n for g in groups for n in g] == list(plan)
    for g in groups:
        sizes = [2 * math.prod(plan[n]) for n in g]
        assert sum(sizes) <= 50_000 or len(g) == 1


def test_write_checkpoints_readable(tmp_path):
    from workbench.io import CheckpointReader

    shape = LlamaShape(64, 176, 2, 256)
    folders = write_checkpoints(tmp_path, shape, 2, dtype="bf16", shard_bytes=40_000, progress=False)
    assert [f.name for f in folders] == ["base", "expert0", "expert1"]
    base, e0 = CheckpointReader(folders[0]), CheckpointReader(folders[1])
    assert base.keys() == sorted(shape.plan())
    assert len(list(folders[0].glob("model-*.safetensors"))) > 1
    name = "model.layers.1.mlp.up_proj.weight"
    assert base.info(name).dtype == torch.bfloat16 and base.info(name).shape == (176, 64)
    tau = e0.get(name).float() - base.get(name).float()
    assert 0.0005 < tau.std().item() < 0.005  # a dense task vector of the documented scale
    cfg = json.loads((folders[0] / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    from transformers import LlamaConfig

    assert LlamaConfig.from_pretrained(folders[0]).hidden_size == 64
    # same request: reused, not rewritten
    mtime = (folders[1] / "synthetic.json").stat().st_mtime_ns
    write_checkpoints(tmp_path, shape, 2, dtype="bf16", shard_bytes=40_000, progress=False)
    assert (folders[1] / "synthetic.json").stat().st_mtime_ns == mtime
    # the values do not depend on the sharding
    other = write_checkpoints(tmp_path / "other", shape, 2, dtype="bf16", shard_bytes=10**9, progress=False)
    assert torch.equal(CheckpointReader(other[1]).get(name), e0.get(name))


# ------------------------------------------------------------------------------------ merge_speed
def test_io_floor_copies_the_base(tmp_path):
    import merge_speed
    from workbench.io import CheckpointReader

    folders = write_checkpoints(tmp_path / "m", LlamaShape(64, 176, 1, 256), 2, shard_bytes=30_000, progress=False)
    out = tmp_path / "floor"
    got = merge_speed.io_floor(folders, out, 30_000)
    total = sum(synthetic.folder_bytes(f) for f in folders)
    assert got["bytes_read"] <= total and got["bytes_read"] > 0.9 * total
    r_out, r_base = CheckpointReader(out), CheckpointReader(folders[0])
    assert r_out.keys() == r_base.keys()
    for n in r_base.keys():
        assert torch.equal(r_out.get(n), r_base.get(n))


def test_mergekit_config_yaml(tmp_path):
    import yaml

    import merge_speed

    folders = [tmp_path / "base", tmp_path / "e0", tmp_path / "e1"]
    cfg = yaml.safe_load(merge_speed.mergekit_config("ties", folders, "bfloat16"))
    assert cfg["merge_method"] == "ties" and cfg["base_model"] == str(folders[0])
    assert [m["parameters"]["density"] for m in cfg["models"]] == [0.2, 0.2]
    ta = yaml.safe_load(merge_speed.mergekit_config("task_arithmetic", folders, "bfloat16"))
    assert ta["merge_method"] == "task_arithmetic" and ta["parameters"] == {"normalize": False}


def test_parse_methods():
    import merge_speed

    assert merge_speed.parse_methods("ties") == ["ties"]
    assert merge_speed.parse_methods("+tsv")[-1] == "tsv"
    assert set(merge_speed.OPTIONAL_METHODS) <= set(merge_speed.parse_methods("all"))


def test_merge_speed_smoke(tmp_path):
    res = _run([str(BENCH / "merge_speed.py"), "--params", "300k", "--shard-size", "60KB", "--methods",
                "task_arithmetic,ties", "--rss-params", "2x", "--rss-methods", "task_arithmetic", "--repeats", "2",
                "--mergekit-python", "none", "--dir", str(tmp_path / "w"), "--out-dir", str(tmp_path / "res")])
    out = res.stdout
    assert re.search(r"^io_floor\s+[\d.]+ s\s+1\.00x floor\s+peak RSS\s+\d+ MB", out, re.M), out
    for m, target in (("task_arithmetic", "1.3"), ("ties", "3.0")):
        assert re.search(rf"^{m}\s+[\d.]+ s\s+[\d.]+x floor\s+peak RSS\s+\d+ MB .*target <= {target}x: "
                         rf"work (met|MISSED), process [\d.]+x (met|MISSED)$", out, re.M), out
    assert "peak RSS by model size" in out and "load average" in out
    # the steady state: pass 2 of each child, against the floor's pass 2
    assert "steady state: pass 2 of each child" in out, out
    for m, target in (("task_arithmetic", "1.3"), ("ties", "3.0")):
        assert re.search(rf"^{m}\s+[\d.]+ s\s+[\d.]+x floor\s+paired\s+[\d.]+x\s+target <= {target}x: (met|MISSED)$",
                         out, re.M), out
    jsons = list((tmp_path / "res").glob("merge_speed_*M_cpu.json"))
    assert len(jsons) == 1
    data = json.loads(jsons[0].read_text())
    assert len(data["sizes"]) == 2 and data["sizes"][1]["params"] > data["sizes"][0]["params"]
    first = data["sizes"][0]
    assert set(first["methods"]) == {"task_arithmetic", "ties"}
    for r in first["methods"].values():
        assert r["seconds"] > 0 and r["maxrss_mb"] > 0 and r["ratio_to_floor"] > 0
        assert r["process_ratio_to_floor"] == pytest.approx(r["wall_s"] / first["floor"]["wall_s"])
        assert r["n_merged"] > 0 and r["n_kept"] == 0  # every tensor merged: the floor's work
        assert len(r["passes_s"]) == 2 and r["seconds"] == r["passes_s"][0] and r["warm_seconds"] == r["passes_s"][1]
        assert r["warm_ratio_to_floor"] == pytest.approx(r["warm_seconds_median"] / first["floor_warm_s"])
    rows = list(csv.DictReader(open(jsons[0].with_suffix(".csv"))))
    assert {r["what"] for r in rows} == {"io_floor", "workbench"}
    assert not list((tmp_path / "w").glob("*"))  # temporary checkpoints removed


@pytest.mark.slow
@pytest.mark.skipif(not MERGEKIT_PY.exists(), reason="mergekit venv not installed at /work/mergekit-venv")
def test_merge_speed_against_mergekit(tmp_path):
    res = _run([str(BENCH / "merge_speed.py"), "--params", "300k", "--shard-size", "60KB", "--methods",
                "task_arithmetic,ties", "--rss-params", "none", "--mergekit-python", str(MERGEKIT_PY),
                "--out-dir", str(tmp_path)])
    assert re.search(r"^mergekit ties\s+[\d.]+ s\s+[\d.]+x floor", res.stdout, re.M), res.stdout
    assert "ours/mergekit" in res.stdout
    assert re.search(r"target >= 3x faster: work (met|MISSED), process (met|MISSED); mergekit's own time is [\d.]+x "
                     r"the floor", res.stdout), res.stdout
    assert re.search(r"steady state \(pass 2\): mergekit [\d.]+ s = [\d.]+x the floor, ours [\d.]+x faster: "
                     r"(met|MISSED)", res.stdout), res.stdout
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(data["sizes"][0]["mergekit"]) == {"task_arithmetic", "ties"}
    assert all(len(r["passes_s"]) == 2 for r in data["sizes"][0]["mergekit"].values())


# ------------------------------------------------------------------------------------ gpu_merge_7b
def _gpu_smoke(tmp_path, methods: str, *extra: str):
    out = tmp_path / "gpu.json"
    res = _run([str(BENCH / "gpu_merge_7b.py"), "--layers", "1", "--hidden", "64", "--intermediate", "176",
                "--vocab", "256", "--device", "cpu", "--shard-size", "50KB", "--methods", methods,
                "--dir", str(tmp_path / "w"), "--out", str(out), *extra])
    return res.stdout, json.loads(out.read_text())


def test_gpu_merge_7b_smoke_on_cpu(tmp_path):
    out, data = _gpu_smoke(tmp_path, "ties,tsv,optmerge_exact")
    assert re.search(r"^io_floor\s+[\d.]+ s", out, re.M), out
    for label in ("ties", "tsv", "optmerge_exact"):
        assert re.search(rf"^{label}\s+[\d.]+ s\s+[\d.]+x floor", out, re.M), out
    assert "not the 7B tensor shapes" in out  # no claim against the paper at this size
    assert data["paper"]["hours"] == 3.78
    assert set(data["methods"]) == {"ties", "tsv", "optmerge_exact"}
    assert data["shape"] == {"hidden": 64, "intermediate": 176, "layers": 1, "vocab": 256}
    assert data["floor"]["seconds"] > 0 and data["methods"]["ties"]["ratio_to_floor"] > 0


@pytest.mark.slow
def test_gpu_merge_7b_iterative_on_cpu(tmp_path):
    out, data = _gpu_smoke(tmp_path, "optmerge_iterative", "--precision", "fp32,bf16")
    assert {"optmerge_iterative", "optmerge_iterative_bf16"} <= set(data["methods"])
    assert data["methods"]["optmerge_iterative"]["extrapolated_32_layers_s"] > 0
    assert data["methods"]["optmerge_iterative_bf16"]["params"]["precision"] == "bf16"
    rows = data["precision_check"]["optmerge_iterative"]
    assert len(rows) == 3 and all(0 < r["tau_rel_err"]["bf16"] <= 1e-2 for r in rows.values()), rows
    assert re.search(r"^precision optmerge_iterative .*bf16 [\d.]+ s \(tau_m rel err", out, re.M), out


def test_gpu_merge_7b_run_keys_and_precision_check(tmp_path):
    import gpu_merge_7b as g7

    keys = g7.run_keys(["ties", "optmerge_iterative", "wudi_iterative"], ["fp32", "bf16"])
    assert [k[0] for k in keys] == ["ties", "optmerge_iterative", "optmerge_iterative_bf16", "wudi_iterative",
                                    "wudi_iterative_bf16"]
    assert keys[0][3] == {"density": 0.2} and keys[1][3] == {"solver": "iterative"}
    assert keys[2][3] == {"solver": "iterative", "precision": "bf16"}
    assert [k[0] for k in g7.run_keys(["optmerge_iterative"], ["bf16"])] == ["optmerge_iterative_bf16"]
    folders = write_checkpoints(tmp_path, LlamaShape(64, 176, 1, 256), 3, dtype="bf16", shard_bytes=10**6,
                                progress=False)
    names = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    for method in ("optmerge", "wudi"):
        rows = g7.precision_check(folders, method, {"solver": "iterative", "steps": 20}, ["fp32", "bf16", "tf32"],
                                  "cpu", names)
        assert list(rows) == names and rows[names[0]]["shape"] == [176, 64]
        for r in rows.values():
            assert set(r["seconds"]) == {"fp32", "bf16", "tf32"}
            assert 0 < r["tau_rel_err"]["bf16"] <= 1e-2 and r["obj_rel_init"]["bf16"] <= 1e-3, r
            assert r["tau_rel_err"]["tf32"] == 0.0  # no TF32 on the CPU: fp32 bit for bit
    with pytest.raises(SystemExit):
        g7.main(["--device", "cpu", "--precision", "fp16"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_merge_7b_smoke_on_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    res = _run([str(BENCH / "gpu_merge_7b.py"), "--layers", "1", "--hidden", "256", "--intermediate", "688",
                "--vocab", "512", "--device", "cuda", "--methods", "ties,optmerge_exact", "--dir", str(tmp_path / "w"),
                "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["methods"]["ties"]["cuda_peak_mb"] > 0, res.stdout
    assert data["methods"]["optmerge_exact"]["device"].startswith("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_merge_7b_precision_on_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    res = _run([str(BENCH / "gpu_merge_7b.py"), "--layers", "1", "--hidden", "256", "--intermediate", "688",
                "--vocab", "512", "--device", "cuda", "--methods", "optmerge_iterative,wudi_iterative",
                "--precision", "fp32,bf16", "--dir", str(tmp_path / "w"), "--out", str(out)])
    data = json.loads(out.read_text())
    for label in ("optmerge_iterative", "wudi_iterative"):
        assert data["methods"][f"{label}_bf16"]["device"].startswith("cuda"), res.stdout
        for r in data["precision_check"][label].values():
            assert r["tau_rel_err"]["bf16"] <= 1e-2 and r["obj_rel_init"]["bf16"] <= 1e-3, r


# ------------------------------------------------------------------------------------ profile_speed
def test_profile_speed_smoke_prints_exact_and_sampled_ratios(tmp_path):
    out = tmp_path / "profile.json"
    res = _run([str(BENCH / "profile_speed.py"), "--params", "300k", "--tiny", "--shard-bytes", "60k",
                "--sample", "1000", "--threads", "1", "--repeat", "3", "--dir", str(tmp_path / "w"), "--json", str(out)])
    text = res.stdout
    assert re.search(r"^I/O floor \(read every tensor\): [\d.]+s", text, re.M), text
    assert re.search(r"^EXACT ratio profile / floor:\s+[\d.]+x wall, [\d.]+x CPU \(work only", text, re.M), text
    assert re.search(r"^page-touch floor \(the bytes into memory, no copy", text, re.M), text
    assert re.search(r"^SAMPLED estimate \(sample=1000 entries/tensor, NOT exact\): [\d.]+s; ratio [\d.]+x wall",
                     text, re.M), text
    data = json.loads(out.read_text())
    assert data["sample"] == 1000 and data["profile_threads"] is None  # the library's default
    assert len(data["touch_floor_runs_s"]) == 2
    runs = data["profile_runs_s"]
    assert len(runs) == 3 and data["profile_s"] == sorted(runs)[1]  # the median of the three
    assert re.search(r"; median of 3 runs: [\d.]+s, [\d.]+s, [\d.]+s$", text, re.M), text
    for k in ("ratio", "work_cpu_ratio", "sampled_ratio", "sampled_work_cpu_ratio", "floor_work_cpu_s",
              "touch_floor_s", "ratio_to_touch_floor"):
        assert data[k] > 0, k
    assert not list((tmp_path / "w").glob("*"))  # temporary checkpoints removed


def test_profile_speed_cold_drops_the_page_cache(tmp_path):
    """``--cold``: the page cache of the checkpoints is dropped before every timed run and the
    resident fraction measured (mincore) is recorded; read back, a file is resident again."""
    evict_page_cache, resident_fraction = synthetic.evict_page_cache, synthetic.resident_fraction
    d = tmp_path / "files"
    d.mkdir()
    (d / "a.bin").write_bytes(os.urandom(1 << 20))
    (d / "a.bin").read_bytes()
    before = resident_fraction([d])
    evict_page_cache([d])
    after = resident_fraction([d])
    if before is None or after is None:
        pytest.skip("mincore unavailable")  # the benchmark then records None, tested below
    (d / "a.bin").read_bytes()
    again = resident_fraction([d])
    assert 0.0 <= after <= again <= 1.0 and after <= before
    out = tmp_path / "profile.json"
    res = _run([str(BENCH / "profile_speed.py"), "--params", "300k", "--tiny", "--shard-bytes", "60k",
                "--sample", "0", "--threads", "1", "--cold", "--dir", str(tmp_path / "w"), "--json", str(out)])
    assert re.search(r"^COLD reads: page cache dropped before each run", res.stdout, re.M), res.stdout
    data = json.loads(out.read_text())
    assert data["cold"] is True and len(data["resident_before"]["floor"]) == 2
    for r in data["resident_before"]["floor"] + [data["resident_before"]["profile"]]:
        assert r is None or 0.0 <= r <= 1.0


def test_routed_eval_prints_both_classes_and_their_ratio_on_the_tiny_zoo():
    """benchmarks/routed_eval.py end to end on the tiny zoo: a line per composition with both timings, their ratio
    and the same predictions from the two routed-layer classes (NaiveMC has no routed layer: its ratio is noise)."""
    from workbench.world import ensure_zoo

    ensure_zoo("tiny")
    res = _run([str(BENCH / "routed_eval.py"), "--preset", "tiny", "--items", "8", "--repeats", "1"])
    lines = {ln.split(":")[0]: ln for ln in res.stdout.splitlines() if " ratio " in ln}
    assert {"naive_mc", "mmer"} <= set(lines), res.stdout
    assert "0 routed layers" in lines["naive_mc"] and "0 routed layers" not in lines["mmer"]
    for ln in lines.values():
        assert re.search(r"formed once \d+\.\d+, RoutedLinear \d+\.\d+; ratio \d+\.\d+; same predictions: True$",
                         ln), ln


def test_encoder_pool_prints_ratios_and_the_same_outputs():
    """benchmarks/encoder_pool.py end to end (small batch): a line per pooled shape and per encoder with both
    timings, their ratio and identical outputs."""
    res = _run([str(BENCH / "encoder_pool.py"), "--batch", "4", "--repeats", "1"])
    lines = [ln for ln in res.stdout.splitlines() if " ratio " in ln]
    assert len(lines) == 6, res.stdout
    assert {ln.split(" forward")[0] for ln in lines if " forward" in ln} == {"ImageEncoder", "VideoEncoder",
                                                                              "CapabilityEncoder"}
    for ln in lines:
        assert re.search(r"MaxPool2x2 \d+\.\d+ ms, max_pool2d \d+\.\d+ ms; ratio \d+\.\d+; same output: True$", ln), ln
