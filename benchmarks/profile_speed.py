"""Speed and memory of the streaming interference profile against the I/O floor.

Makes synthetic sharded bf16 safetensors checkpoints (``benchmarks/synthetic.py``: a Llama-shaped
base of ``--params`` parameters and ``--experts`` experts = base + small dense Gaussian noise) in a
temporary folder, then, in the same run, each in a fresh subprocess:

1. the I/O floor: read every input tensor (base + experts) once through ``CheckpointReader``
   into a fresh buffer (the reader memory-maps, so the copy is what reads the bytes), no arithmetic;
   and a stricter one, the page-touch floor: every page of every tensor faulted in (one byte per
   page), no copy - what the profile's prefetch thread does since the kernels read the mapped
   pages themselves. Both ratios are printed; the target is stated against the first;
2. the EXACT ``profile_interference`` over the same files on ``--device`` (``threads`` of the
   library: ``--profile-threads``, default the library's ``None``: the child's torch threads);
3. unless ``--sample 0``: the SAMPLED estimate ``profile_interference(..., sample=M)`` (M entries
   per tensor, ``--sample``, default 65536; not the exact profile: see its docstring for the error).

Prints the times, the ratios to the floor (target: 1.5x or less) in wall time and in CPU time
(of the measured work alone, and of the whole process with its imports), labelled exact and
sampled, and the memory of each subprocess: peak
RSS (``ru_maxrss``, which also counts memory-mapped checkpoint pages that were touched) and
peak anonymous RSS (sampled from ``/proc/self/status``: the process's own allocations - this
is the number that must stay bounded as the model grows). The floor runs twice (before and
after the profile; a third time at 1 thread when ``--threads`` > 1) and the fastest is used, so
page-cache state and thread contention favour the floor, not us (on the shared, loaded 2-core box
a 2-thread floor was measured 10x slower than a 1-thread one).

    python benchmarks/profile_speed.py                     # ~300M params, 4 experts, auto device
    python benchmarks/profile_speed.py --params 50M --sample 0   # exact profile only
    python benchmarks/profile_speed.py --params 7B --device cuda --dir /scratch/bench
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from synthetic import (LlamaShape, evict_page_cache, folder_bytes, parse_count, resident_fraction,  # noqa: E402
                       write_checkpoints)


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
# imports before the clock starts, for every mode (numba: the profile's kernels; their machine code
# is loaded from the on-disk cache, or compiled, inside the timed call - a per-process cost)
from workbench.io import CheckpointReader
from workbench.analysis import profile_interference
import numba
t0 = time.perf_counter()
c0 = time.process_time()
if mode in ("floor", "touch"):
    readers = [CheckpointReader(f) for f in folders]
    nbytes = 0
    for name in readers[0].keys():
        for r in readers:
            t = r.get(name)            # memory-mapped: no bytes read yet
            if mode == "floor":
                buf = torch.empty_like(t)
                buf.copy_(t)           # the read itself (page faults + memcpy), no arithmetic
            else:                      # the bytes brought into memory, not copied: one byte per page
                buf = t.reshape(-1).view(torch.uint8)
                int(buf[::4096].max())
            nbytes += t.numel() * t.element_size()
            del t, buf
    extra = {{"bytes": nbytes}}
else:
    experts = {{f"e{{i}}": folders[i + 1] for i in range(len(folders) - 1)}}
    prof = profile_interference(folders[0], experts, device={device!r}, progress=False,
                                threads={profile_threads!r}, sample={sample!r})
    if prof.pairs.shape[0] == 0:
        raise SystemExit("empty profile")
    extra = {{"io_wait_s": prof.meta.get("seconds_waiting_for_io"), "n_tensors": prof.meta.get("n_tensors"),
              "device": prof.meta.get("device")}}
    if torch.cuda.is_available() and "cuda" in str(prof.meta.get("device")):
        extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
secs = time.perf_counter() - t0
work_cpu = time.process_time() - c0
ru = resource.getrusage(resource.RUSAGE_SELF)
stop = True; th.join()
print(json.dumps({{"seconds": secs, "work_cpu_seconds": work_cpu, "cpu_seconds": ru.ru_utime + ru.ru_stime, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "peak_anon_kb": peak["anon_kb"], "peak_file_kb": peak["file_kb"], **extra}}))
"""


def run_child(mode: str, folders: list[Path], device: str, threads: int, *, profile_threads: int | None = 1,
              sample: int | None = None, cold: bool = False) -> dict:
    """One measured subprocess; ``cold``: the checkpoints' page cache is dropped first (the fraction
    still resident is recorded as ``resident_before``)."""
    resident = None
    if cold:
        evict_page_cache(folders)
        resident = resident_fraction(folders)
    out = _run_child(mode, folders, device, threads, profile_threads=profile_threads, sample=sample)
    out["resident_before"] = resident
    return out


def _run_child(mode: str, folders: list[Path], device: str, threads: int, *, profile_threads: int | None,
               sample: int | None) -> dict:
    code = CHILD.format(root=str(ROOT), threads=threads, folders=[str(f) for f in folders], mode=mode, device=device,
                        profile_threads=profile_threads, sample=sample)
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
    ap.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 16)),
                    help="torch threads of each child process (the floor's copies use them)")
    ap.add_argument("--profile-threads", type=int, default=0,
                    help="profile_interference(threads=...) on CPU (default 0: None, the library's default: "
                         "as many workers as the child's torch threads, i.e. --threads)")
    ap.add_argument("--sample", type=parse_count, default=65536,
                    help="also time the sampled estimate with this many entries per tensor (0: skip)")
    ap.add_argument("--cold", action="store_true",
                    help="drop the checkpoints' page cache before every timed run (floor and profiles): reads "
                         "come from the disk, as for checkpoints larger than memory (4 x 7B + base)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape class below 50M params (smoke tests)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time the exact profile this many times (fresh children) and report the median run "
                         "(the floors: the fastest run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    llama = LlamaShape.for_params(args.params, tiny=args.tiny)
    pthreads = args.profile_threads or None
    shape = {"hidden": llama.hidden, "intermediate": llama.intermediate, "layers": llama.layers, "vocab": llama.vocab}
    n_params = llama.n_params
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="wb-profile-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        folders = write_checkpoints(root, llama, args.experts, dtype="bf16", shard_bytes=args.shard_bytes, seed=args.seed)
        write_s = time.perf_counter() - t
        total_bytes = sum(folder_bytes(f) for f in folders)
        print(f"model: {n_params / 1e6:.1f}M params/model ({shape}), base + {args.experts} experts, bf16, "
              f"{total_bytes / 1e9:.2f} GB on disk, written in {write_s:.1f}s", flush=True)
        cold = args.cold
        floor1 = run_child("floor", folders, args.device, args.threads, cold=cold)
        profs = [run_child("profile", folders, args.device, args.threads, profile_threads=pthreads, cold=cold)
                 for _ in range(args.repeat)]
        prof = sorted(profs, key=lambda r: r["seconds"])[(len(profs) - 1) // 2]  # the median run (lower middle)
        samp = (run_child("profile", folders, args.device, args.threads, profile_threads=pthreads, sample=args.sample,
                          cold=cold) if args.sample else None)
        floor2 = run_child("floor", folders, args.device, args.threads, cold=cold)
        floors = [floor1, floor2]
        if args.threads > 1:  # one more at 1 thread: on a loaded machine it can be much the faster
            floors.append(run_child("floor", folders, args.device, 1, cold=cold))
        touches = [run_child("touch", folders, args.device, 1, cold=cold) for _ in range(2)]
        touch = min(touches, key=lambda r: r["seconds"])
        floor = min(floors, key=lambda r: r["seconds"])
        floor_work_cpu = min(r["work_cpu_seconds"] for r in floors)
        ratio = prof["seconds"] / floor["seconds"]

        def work_cpu_ratio(r: dict) -> float:
            return r["work_cpu_seconds"] / max(floor_work_cpu, 1e-9)

        result = {"params_per_model": n_params, "experts": args.experts, "shape": shape, "bytes_read": total_bytes,
                  "device": prof.get("device"), "threads": args.threads,
                  "floor_s": floor["seconds"], "floor_runs_s": [r["seconds"] for r in floors],
                  "profile_s": prof["seconds"], "profile_runs_s": [r["seconds"] for r in profs], "ratio": ratio,
                  "touch_floor_s": touch["seconds"], "touch_floor_runs_s": [r["seconds"] for r in touches],
                  "ratio_to_touch_floor": prof["seconds"] / touch["seconds"],
                  "floor_cpu_s": floor["cpu_seconds"], "profile_cpu_s": prof["cpu_seconds"],
                  "cpu_ratio": prof["cpu_seconds"] / max(floor["cpu_seconds"], 1e-9),
                  "floor_work_cpu_s": floor_work_cpu,
                  "profile_work_cpu_s": prof["work_cpu_seconds"], "work_cpu_ratio": work_cpu_ratio(prof),
                  "profile_threads": pthreads, "sample": args.sample or None, "cold": cold,
                  "resident_before": {"floor": [r["resident_before"] for r in floors],
                                      "profile": prof["resident_before"]},
                  "load_avg_1m": os.getloadavg()[0], "io_wait_in_profile_s": prof.get("io_wait_s"),
                  "floor_peak_rss_mb": floor["maxrss_kb"] / 1024, "floor_peak_anon_mb": floor["peak_anon_kb"] / 1024,
                  "profile_peak_rss_mb": prof["maxrss_kb"] / 1024, "profile_peak_anon_mb": prof["peak_anon_kb"] / 1024,
                  "largest_tensor_mb_fp32": llama.largest_tensor * 4 / 2**20}
        if "cuda_peak_bytes" in prof:
            result["profile_cuda_peak_mb"] = prof["cuda_peak_bytes"] / 2**20
        if samp is not None:
            result.update({"sampled_s": samp["seconds"], "sampled_ratio": samp["seconds"] / floor["seconds"],
                           "sampled_work_cpu_s": samp["work_cpu_seconds"], "sampled_work_cpu_ratio": work_cpu_ratio(samp),
                           "sampled_cpu_s": samp["cpu_seconds"],
                           "sampled_cpu_ratio": samp["cpu_seconds"] / max(floor["cpu_seconds"], 1e-9),
                           "sampled_peak_anon_mb": samp["peak_anon_kb"] / 1024})
        if cold:
            print(f"COLD reads: page cache dropped before each run; resident before: floor runs "
                  f"{[r['resident_before'] for r in floors]}, profile {prof['resident_before']} (fraction of the bytes)")
        runs = ", ".join(f"{r['seconds']:.2f}s" for r in floors)
        print(f"I/O floor (read every tensor): {floor['seconds']:.2f}s  (runs: {runs}"
              f"{' - the last at 1 thread' if len(floors) > 2 else ''}; {total_bytes / floor['seconds'] / 1e9:.2f} GB/s)")
        print(f"page-touch floor (the bytes into memory, no copy: what the profile's reader does): "
              f"{touch['seconds']:.2f}s ({total_bytes / touch['seconds'] / 1e9:.2f} GB/s)")
        print(f"EXACT interference profile:    {prof['seconds']:.2f}s on {prof.get('device')} "
              f"(waiting for I/O {prof.get('io_wait_s')}s; threads={pthreads})"
              + (f"; median of {len(profs)} runs: " + ", ".join(f"{r['seconds']:.2f}s" for r in profs)
                 if len(profs) > 1 else ""))
        print(f"EXACT ratio profile / floor:   {ratio:.2f}x wall, {result['work_cpu_ratio']:.2f}x CPU "
              f"(work only: floor {result['floor_work_cpu_s']:.2f}s, profile {prof['work_cpu_seconds']:.2f}s)  "
              f"(target <= 1.5x); {result['ratio_to_touch_floor']:.2f}x the page-touch floor")
        if samp is not None:
            print(f"SAMPLED estimate (sample={args.sample} entries/tensor, NOT exact): {samp['seconds']:.2f}s; "
                  f"ratio {result['sampled_ratio']:.2f}x wall, {result['sampled_work_cpu_ratio']:.2f}x CPU (work only)")
        print(f"CPU time (user+sys, whole process incl. imports): floor {floor['cpu_seconds']:.1f}s, "
              f"exact profile {prof['cpu_seconds']:.1f}s ({result['cpu_ratio']:.2f}x)"
              + (f", sampled {samp['cpu_seconds']:.1f}s ({result['sampled_cpu_ratio']:.2f}x)" if samp else "")
              + f"; 1-min load {result['load_avg_1m']:.1f} "
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
