"""Speed and memory of the streaming interference profile against the I/O floor.

Makes synthetic sharded bf16 safetensors checkpoints (a Llama-shaped base of ``--params``
parameters and ``--experts`` experts = base + small noise) in a temporary folder, then, in the
same run, each in a fresh subprocess:

1. the I/O floor: read every input tensor (base + experts) once through ``CheckpointReader``
   into a fresh buffer (the reader memory-maps, so the copy is what reads the bytes), no arithmetic;
2. ``profile_interference`` over the same files on ``--device``.

Prints both times, the ratio (target: 1.5x or less), and the memory of each subprocess: peak
RSS (``ru_maxrss``, which also counts memory-mapped checkpoint pages that were touched) and
peak anonymous RSS (sampled from ``/proc/self/status``: the process's own allocations - this
is the number that must stay bounded as the model grows). The floor runs twice (before and
after the profile) and the faster is used, so page-cache state favours the floor, not us.

    python benchmarks/profile_speed.py                     # ~300M params, 4 experts, auto device
    python benchmarks/profile_speed.py --params 7B --device cuda --dir /scratch/bench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_count(s: str) -> int:
    """``"300M"`` -> 300_000_000, ``"7B"`` -> 7_000_000_000, ``"1.5e8"`` -> 150_000_000."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgG]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a parameter count from {s!r}")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def llama_plan(params: int, vocab: int = 32000) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Tensor names and shapes of a Llama-like model with about ``params`` parameters."""
    if params >= 5_000_000_000:
        h, inter = 4096, 11008
    elif params >= 1_000_000_000:
        h, inter = 2048, 5632
    elif params >= 200_000_000:
        h, inter = 1024, 2816
    else:
        h, inter = 512, 1408
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    layers = max(1, round((params - 2 * vocab * h - h) / per_layer))
    plan: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for l in range(layers):
        p = f"model.layers.{l}"
        for m in ("q", "k", "v", "o"):
            plan[f"{p}.self_attn.{m}_proj.weight"] = (h, h)
        plan[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        plan[f"{p}.mlp.up_proj.weight"] = (inter, h)
        plan[f"{p}.mlp.down_proj.weight"] = (h, inter)
        plan[f"{p}.input_layernorm.weight"] = (h,)
        plan[f"{p}.post_attention_layernorm.weight"] = (h,)
    plan["model.norm.weight"] = (h,)
    plan["lm_head.weight"] = (vocab, h)
    return plan, {"hidden": h, "intermediate": inter, "layers": layers, "vocab": vocab}


def write_models(out: Path, plan: dict[str, tuple[int, ...]], n_experts: int, shard_bytes: int, seed: int) -> list[Path]:
    """Write base + experts as sharded bf16 safetensors folders, one tensor at a time per shard."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    folders = [out / "base"] + [out / f"expert{i}" for i in range(n_experts)]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in plan.items():
        b = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += b
    n = len(shards)
    g = torch.Generator().manual_seed(seed)
    for si, names in enumerate(tqdm(shards, desc="writing shards", unit="shard")):
        fname = f"model-{si + 1:05d}-of-{n:05d}.safetensors"
        base = {k: (0.02 * torch.randn(plan[k], generator=g)).to(torch.bfloat16) for k in names}
        save_file(base, str(folders[0] / fname))
        for e in range(n_experts):
            exp = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
            save_file(exp, str(folders[e + 1] / fname))
            del exp
        del base
    index = {"metadata": {}, "weight_map": {k: f"model-{si + 1:05d}-of-{n:05d}.safetensors"
                                            for si, names in enumerate(shards) for k in names}}
    for f in folders:
        (f / "model.safetensors.index.json").write_text(json.dumps(index))
    return folders


CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
peak = {{"anon_kb": 0, "file_kb": 0}}
stop = False
def sample():
    while not stop:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak["anon_kb"] = max(peak["anon_kb"], int(line.split()[1]))
                    elif line.startswith("RssFile:"):
                        peak["file_kb"] = max(peak["file_kb"], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.02)
th = threading.Thread(target=sample, daemon=True); th.start()
folders = {folders!r}
mode = {mode!r}
t0 = time.perf_counter()
if mode == "floor":
    from workbench.io import CheckpointReader
    readers = [CheckpointReader(f) for f in folders]
    nbytes = 0
    for name in readers[0].keys():
        for r in readers:
            t = r.get(name)            # memory-mapped: no bytes read yet
            buf = torch.empty_like(t)
            buf.copy_(t)               # the read itself (page faults + memcpy), no arithmetic
            nbytes += buf.numel() * buf.element_size()
            del t, buf
    extra = {{"bytes": nbytes}}
else:
    from workbench.analysis import profile_interference
    experts = {{f"e{{i}}": folders[i + 1] for i in range(len(folders) - 1)}}
    prof = profile_interference(folders[0], experts, device={device!r}, progress=False)
    if prof.pairs.shape[0] == 0:
        raise SystemExit("empty profile")
    extra = {{"io_wait_s": prof.meta.get("seconds_waiting_for_io"), "n_tensors": prof.meta.get("n_tensors"),
              "device": prof.meta.get("device")}}
    if torch.cuda.is_available() and "cuda" in str(prof.meta.get("device")):
        extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
secs = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
stop = True; th.join()
print(json.dumps({{"seconds": secs, "cpu_seconds": ru.ru_utime + ru.ru_stime, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "peak_anon_kb": peak["anon_kb"], "peak_file_kb": peak["file_kb"], **extra}}))
"""


def run_child(mode: str, folders: list[Path], device: str, threads: int) -> dict:
    code = CHILD.format(root=str(ROOT), threads=threads, folders=[str(f) for f in folders], mode=mode, device=device)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} subprocess failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=parse_count, default=parse_count("300M"), help="base model size (e.g. 300M, 7B)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shard-bytes", type=parse_count, default=parse_count("500M"))
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)))
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    plan, shape = llama_plan(args.params)
    n_params = sum(int(__import__("math").prod(s)) for s in plan.values())
    root = Path(tempfile.mkdtemp(prefix="wb-profile-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        folders = write_models(root, plan, args.experts, args.shard_bytes, args.seed)
        write_s = time.perf_counter() - t
        total_bytes = sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
        print(f"model: {n_params / 1e6:.1f}M params/model ({shape}), base + {args.experts} experts, bf16, "
              f"{total_bytes / 1e9:.2f} GB on disk, written in {write_s:.1f}s", flush=True)
        floor1 = run_child("floor", folders, args.device, args.threads)
        prof = run_child("profile", folders, args.device, args.threads)
        floor2 = run_child("floor", folders, args.device, args.threads)
        floor = min(floor1, floor2, key=lambda r: r["seconds"])
        ratio = prof["seconds"] / floor["seconds"]
        result = {"params_per_model": n_params, "experts": args.experts, "shape": shape, "bytes_read": total_bytes,
                  "device": prof.get("device"), "threads": args.threads,
                  "floor_s": floor["seconds"], "floor_runs_s": [floor1["seconds"], floor2["seconds"]],
                  "profile_s": prof["seconds"], "ratio": ratio,
                  "floor_cpu_s": floor["cpu_seconds"], "profile_cpu_s": prof["cpu_seconds"],
                  "cpu_ratio": prof["cpu_seconds"] / max(floor["cpu_seconds"], 1e-9),
                  "load_avg_1m": os.getloadavg()[0], "io_wait_in_profile_s": prof.get("io_wait_s"),
                  "floor_peak_rss_mb": floor["maxrss_kb"] / 1024, "floor_peak_anon_mb": floor["peak_anon_kb"] / 1024,
                  "profile_peak_rss_mb": prof["maxrss_kb"] / 1024, "profile_peak_anon_mb": prof["peak_anon_kb"] / 1024,
                  "largest_tensor_mb_fp32": max(int(__import__("math").prod(s)) for s in plan.values()) * 4 / 2**20}
        if "cuda_peak_bytes" in prof:
            result["profile_cuda_peak_mb"] = prof["cuda_peak_bytes"] / 2**20
        print(f"I/O floor (read every tensor): {floor['seconds']:.2f}s  (runs: {floor1['seconds']:.2f}s, "
              f"{floor2['seconds']:.2f}s; {total_bytes / floor['seconds'] / 1e9:.2f} GB/s)")
        print(f"interference profile:          {prof['seconds']:.2f}s on {prof.get('device')} "
              f"(waiting for I/O {prof.get('io_wait_s')}s)")
        print(f"ratio profile / floor:         {ratio:.2f}x  (target <= 1.5x)")
        print(f"CPU time (user+sys, whole process incl. imports): floor {floor['cpu_seconds']:.1f}s, "
              f"profile {prof['cpu_seconds']:.1f}s ({result['cpu_ratio']:.2f}x); 1-min load {result['load_avg_1m']:.1f} "
              f"on {os.cpu_count()} CPUs (wall-clock ratios are unreliable on a loaded machine)")
        print(f"peak RSS  floor {result['floor_peak_rss_mb']:.0f} MB (anon {result['floor_peak_anon_mb']:.0f} MB) | "
              f"profile {result['profile_peak_rss_mb']:.0f} MB (anon {result['profile_peak_anon_mb']:.0f} MB); "
              f"largest tensor in fp32: {result['largest_tensor_mb_fp32']:.0f} MB")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return result
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"checkpoints kept in {root}")


if __name__ == "__main__":
    main()
