"""Merge speed and memory against the I/O floor (and against mergekit where it is installed).

Makes synthetic sharded Llama-shaped checkpoints (``benchmarks/synthetic.py``: a base and
``--experts`` experts = base + a dense Gaussian task vector, ``--dtype`` bf16, ``--shard-size``
shards), then, in the same run, each measurement in a fresh child process:

1. the **I/O floor**: read every input tensor (base and experts) into a fresh buffer and write the
   output (the base's tensors) with ``safetensors.torch.save_file`` in shards of the same size -
   no arithmetic, no dtype conversion. It runs before and after the methods; the faster is used;
2. each **method** (``weight_average``, ``task_arithmetic``, ``ties`` density 0.2, ``dare_linear``,
   ``dare_ties``; more with ``--methods``) through ``workbench.engine.merge``, every tensor merged
   (``keep_defaults: false``, the same work as the floor and as mergekit);
3. where mergekit is installed (``--mergekit-python``, a separate venv - never ours): the same task
   arithmetic and TIES merges with ``mergekit-yaml ... --no-copy-tokenizer`` (``HF_HUB_OFFLINE=1``).

Each child's time (measured inside it, around the work, and as the process's wall time) and peak
RSS (``os.wait4``'s ``ru_maxrss`` of that child alone: it counts the memory-mapped checkpoint pages
it touched) and peak anonymous RSS (its own allocations, sampled from ``/proc/<pid>/status``) are
printed with the ratio to the floor: ``--repeats`` rounds (3) of the floor and every method,
interleaved; a method's time is the median of its rounds, its ratio the median over the fastest floor
and, printed as ``paired``, the median of its rounds' ratios to the floor of the same round.
Each child does its work ``--passes`` times (2; the output removed between passes, outside the
clock): the first pass is the cold process a one-off CLI merge is (imports, numba's load of its
cached kernels, the first touch of the memory the output takes), the last the steady state of a
sweep, which merges many times in one process; both are printed with their ratios to the floor's
same pass. On a virtual machine that hands freed memory back to its host (free page reporting:
the project's 2-core box), the first touch of memory after that costs about a second per GB and
falls unevenly on the floor and the merges: read the steady state beside the cold one there.
``--rss-params`` repeats the floor and every method on a larger model of the same tensor shapes
(more layers) to show that peak memory does not grow with the model. Results go to ``data/benchmarks/merge_speed_<params>_<device>.{json,csv}``.

    python benchmarks/merge_speed.py                                  # 272M, bf16, 200MB shards, 3 experts
    python benchmarks/merge_speed.py --methods +tsv,wudi,optmerge     # the defaults plus these
    python benchmarks/merge_speed.py --mergekit-python /work/mergekit-venv/bin/python
    python benchmarks/merge_speed.py --profile ties                   # cProfile of one method's merge

Timings on a shared machine are noisy: compare the ratios measured within one run, and read the
machine's load (printed) beside them.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _shown(path) -> str:
    """A path as the printed output (kept as a results log) shows it: relative to the repository, or
    ``<outside the repository>/<name>`` - no machine's absolute paths in a committed log."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT.resolve()))
    except ValueError:
        return f"<outside the repository>/{p.name}"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from synthetic import LlamaShape, folder_bytes, parse_bytes, parse_count, write_checkpoints  # noqa: E402

DEFAULT_METHODS = ["weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
OPTIONAL_METHODS = ["tsv", "wudi", "optmerge"]
#: parameters of each method in the benchmark (the issue's settings).
METHOD_PARAMS = {"ties": {"density": 0.2}, "dare_linear": {"drop_rate": 0.2},
                 "dare_ties": {"drop_rate": 0.2, "density": 0.2}}
#: CPU targets (issue 20): method time / I/O floor.
TARGETS = {"weight_average": 1.3, "task_arithmetic": 1.3, "ties": 3.0, "dare_linear": 3.0, "dare_ties": 3.0}
#: speed-up targets over mergekit on the same files (issue 20): ours / mergekit >= this
MERGEKIT_TARGETS = {"task_arithmetic": 3.0, "ties": 10.0}
#: peak anonymous memory target of every method, MB (issue 20), at both model sizes
ANON_TARGET_MB = 300
#: mergekit equivalents: (merge_method, per-model parameters, global parameters).
MERGEKIT = {"task_arithmetic": ("task_arithmetic", {"weight": 1.0}, {"normalize": False}),
            "ties": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True})}


# ---------------------------------------------------------------------------------------- children
def _child_main(spec: dict) -> dict:
    """Runs in the child process: the floor or one merge, ``spec["passes"]`` times (the output removed
    between passes, outside the clock); returns what it measured: ``seconds`` of the first pass (a
    fresh process: imports of the merge code, numba's load of its cached kernels, and the first touch
    of the memory the output's page cache takes) and ``warm_seconds`` of the last (the same work in a
    process that has done it once: what each merge of a sweep costs)."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out = Path(spec["output"])
    passes_s: list[float] = []
    res: dict = {}
    for p in range(max(1, int(spec.get("passes", 1)))):
        shutil.rmtree(out, ignore_errors=True)
        res = _child_pass(spec, out, profile=bool(spec.get("profile")) and p == 0)
        passes_s.append(res.pop("seconds"))
    res.update(seconds=passes_s[0], warm_seconds=passes_s[-1], passes_s=passes_s, threads=torch.get_num_threads())
    return res


def _child_pass(spec: dict, out: Path, profile: bool) -> dict:
    """One pass of the floor or the merge (imports inside the clock on the first pass, as a CLI pays them)."""
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    if spec["mode"] == "floor":
        extra = io_floor([Path(f) for f in spec["folders"]], out, int(spec["shard_bytes"]))
    else:
        import torch
        from workbench.config import MergeConfig
        from workbench.engine import merge_with_report

        cfg = MergeConfig(method=spec["method"], base=spec["folders"][0], experts=spec["folders"][1:], output=out,
                          params=spec.get("params") or {}, keep_defaults=bool(spec.get("keep_defaults", False)),
                          device=spec.get("device", "cpu"), seed=0, max_shard_size=int(spec["shard_bytes"]),
                          copy_tokenizer=False)
        rep = merge_with_report(cfg, progress=False)
        extra = {"n_merged": len(rep.merged), "n_kept": len(rep.kept), "device": rep.device}
        if rep.device.startswith("cuda"):
            extra["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    secs = time.perf_counter() - t0
    res = {"seconds": secs, **extra}
    if prof:
        import io
        import pstats

        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(int(spec.get("profile_top", 20)))
        res["profile"] = s.getvalue()
    return res


def io_floor(folders: list[Path], out: Path, shard_bytes: int) -> dict:
    """Read every tensor of every folder into a fresh buffer (the bytes are copied from the
    memory-mapped file: this is the read) and write the base's tensors with ``save_file`` in shards
    of ``shard_bytes``. No arithmetic, no conversion. Returns bytes read and written."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            wm = json.loads(idx.read_text())["weight_map"]
            return {k: folder / v for k, v in wm.items()}
        f = folder / "model.safetensors"
        with safe_open(str(f), "pt") as h:
            return {k: f for k in h.keys()}

    maps = [index(f) for f in folders]
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        h = handles.get(path)
        if h is None:
            h = handles[path] = safe_open(str(path), "pt")
        return h.get_tensor(name)

    out.mkdir(parents=True)
    names = list(maps[0])  # the base's order (its index order: shard by shard)
    read = written = 0
    buf: dict = {}
    buf_bytes = 0
    shards: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal buf, buf_bytes, written
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(buf, str(out / fname), metadata={"format": "pt"})
        shards.append((fname, list(buf)))
        written += buf_bytes
        buf, buf_bytes = {}, 0

    for name in names:
        base_copy = None
        for mi, m in enumerate(maps):
            t = get(m[name], name)
            c = torch.empty_like(t)
            c.copy_(t)  # the read (page faults + memcpy out of the page cache or the disk)
            read += c.numel() * c.element_size()
            if mi == 0:
                base_copy = c
            del t, c
        nb = base_copy.numel() * base_copy.element_size()
        if buf and buf_bytes + nb > shard_bytes:
            flush()
        buf[name] = base_copy
        buf_bytes += nb
        del base_copy
    if buf:
        flush()
    wm = {n: f for f, ns in shards for n in ns}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": written}, "weight_map": wm}))
    handles.clear()
    return {"bytes_read": read, "bytes_written": written}


def _sample_memory(pid: int, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak["anon_kb"] = max(peak["anon_kb"], int(line.split()[1]))
        except OSError:
            pass
        stop.wait(0.02)


def run_process(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd``; return its wall time, its own peak RSS (``os.wait4``) and peak anonymous RSS
    (sampled), its exit code and output."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        peak = {"anon_kb": 0}
        stop = threading.Event()
        th = threading.Thread(target=_sample_memory, args=(p.pid, peak, stop), daemon=True)
        th.start()
        timer = threading.Timer(timeout, p.kill) if timeout else None
        if timer:
            timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if timer:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join()
        fo.seek(0)
        fe.seek(0)
        return {"rc": p.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024, "peak_anon_mb": peak["anon_kb"] / 1024,
                "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "nivcsw": ru.ru_nivcsw,
                "stdout": fo.read().decode(errors="replace"), "stderr": fe.read().decode(errors="replace")}


def run_child(spec: dict, env: dict | None = None) -> dict:
    """One measurement of ours (floor or merge) in a fresh Python process."""
    shutil.rmtree(spec["output"], ignore_errors=True)
    r = run_process([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env=env)
    shutil.rmtree(spec["output"], ignore_errors=True)
    if r["rc"] != 0:
        raise RuntimeError(f"{spec.get('method', spec['mode'])} child failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    res.update({k: r[k] for k in ("wall_s", "cpu_s", "maxrss_mb", "peak_anon_mb", "minflt", "majflt", "nivcsw")})
    res["loadavg_1m"] = os.getloadavg()[0]
    return res


def median_run(runs: list[dict]) -> dict:
    """The run of median ``seconds`` (its own memory and CPU), with every run's seconds and load."""
    order = sorted(runs, key=lambda r: r["seconds"])
    med = dict(order[(len(order) - 1) // 2])
    med["runs_s"] = [r["seconds"] for r in runs]
    med["runs_loadavg_1m"] = [r.get("loadavg_1m") for r in runs]
    med["peak_anon_mb_max"] = max(r["peak_anon_mb"] for r in runs)
    med["warm_seconds_median"] = statistics.median(r["warm_seconds"] for r in runs)
    return med


# ---------------------------------------------------------------------------------------- mergekit
def find_mergekit(python: str | None) -> Path | None:
    """The ``mergekit-yaml`` beside ``python`` (``"auto"``: /work/mergekit-venv, then PATH)."""
    cands = []
    if python and python != "auto":
        cands.append(Path(python).parent / "mergekit-yaml")
    elif python == "auto":
        cands.append(Path("/work/mergekit-venv/bin/mergekit-yaml"))
        w = shutil.which("mergekit-yaml")
        if w:
            cands.append(Path(w))
    for c in cands:
        if c.exists():
            return c
    return None


def mergekit_version(exe: Path) -> str:
    py = exe.parent / "python"
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def mergekit_config(method: str, folders: list[Path], dtype: str) -> str:
    import yaml

    mk_method, per_model, glob = MERGEKIT[method]
    cfg = {"merge_method": mk_method, "base_model": str(folders[0]),
           "models": [{"model": str(f), "parameters": dict(per_model)} for f in folders[1:]],
           "parameters": dict(glob), "dtype": dtype}
    return yaml.safe_dump(cfg, sort_keys=False)


#: what ``mergekit-yaml CONFIG OUT --no-copy-tokenizer --out-shard-size N --quiet`` does
#: (mergekit/scripts/run_yaml.py), with a clock around ``run_merge`` itself (and one around the imports).
MERGEKIT_DRIVER = r"""
import json, sys, time
t = time.perf_counter()
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
import_s = time.perf_counter() - t
import shutil
cfg_file, out, shard_params, passes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
opts = MergeOptions(copy_tokenizer=False, out_shard_size=shard_params, quiet=True)
opts.apply_global_options()
src = open(cfg_file, encoding="utf-8").read()
secs = []
for p in range(passes):
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(src)), out, options=opts, config_source=src)
    secs.append(time.perf_counter() - t)
print(json.dumps({"seconds": secs[0], "warm_seconds": secs[-1], "passes_s": secs, "import_s": import_s}))
"""


def run_mergekit(exe: Path, method: str, folders: list[Path], work: Path, dtype: str, shard_bytes: int,
                 env: dict, timeout: float | None, passes: int = 1) -> dict:
    """mergekit's TA or TIES on the same checkpoints, in mergekit's own venv (a child process):
    the time of ``run_merge`` (as ``mergekit-yaml`` calls it), the process's wall time and memory."""
    cfg = work / f"mergekit_{method}.yml"
    cfg.write_text(mergekit_config(method, folders, dtype))
    out = work / f"mergekit_out_{method}"
    shutil.rmtree(out, ignore_errors=True)
    # mergekit's --out-shard-size counts parameters: the same bytes per shard as ours
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    shard_params = max(1, shard_bytes // itemsize)
    py = exe.parent / "python"
    cmd = [str(py), "-c", MERGEKIT_DRIVER, str(cfg), str(out), str(shard_params), str(max(1, passes))]
    menv = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    r = run_process(cmd, env={**menv, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=timeout)
    ok = r["rc"] == 0 and any(out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    if not ok:
        raise RuntimeError(f"mergekit {method} failed (rc {r['rc']}):\n{r['stderr'][-3000:]}")
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    res.update({"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "maxrss_mb": r["maxrss_mb"], "peak_anon_mb": r["peak_anon_mb"],
                "cli": f"{Path(exe).name} {cfg.name} OUT --no-copy-tokenizer --out-shard-size {shard_params}"})
    return res


# ---------------------------------------------------------------------------------------- the run
def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host_cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_start": list(os.getloadavg())}
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        info["mem_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_methods(s: str) -> list[str]:
    """``"a,b"``: exactly these; ``"+c,d"``: the defaults plus these; ``"all"``: defaults + optional."""
    if s == "all":
        return DEFAULT_METHODS + OPTIONAL_METHODS
    if s.startswith("+"):
        extra = [m for m in s[1:].split(",") if m]
        return DEFAULT_METHODS + [m for m in extra if m not in DEFAULT_METHODS]
    return [m for m in s.split(",") if m]


def fmt_row(label: str, r: dict, floor: dict, target: float | None = None) -> str:
    ratio = r["seconds"] / floor["seconds"]
    proc_ratio = r["wall_s"] / floor["wall_s"]  # whole processes, imports included (the issue's own table's basis)
    t = ""
    if r.get("paired_ratio_median") is not None:
        t += f"  paired {r['paired_ratio_median']:5.2f}x"
    if target is not None:
        t += (f"  target <= {target:.1f}x: work {'met' if ratio <= target else 'MISSED'}, "
              f"process {proc_ratio:.2f}x {'met' if proc_ratio <= target else 'MISSED'}")
    cpu = ""
    if r.get("cpu_s") and floor.get("cpu_s"):
        cpu = f"  CPU {r['cpu_s']:6.1f} s ({r['cpu_s'] / floor['cpu_s']:5.2f}x)"
    return (f"{label:<24} {r['seconds']:8.2f} s  {ratio:6.2f}x floor  peak RSS {r['maxrss_mb']:7.0f} MB "
            f"(anon {r['peak_anon_mb']:6.0f} MB)  process {r['wall_s']:6.2f} s{cpu}{t}")


def _passes(r: dict) -> str:
    return " / ".join(f"{x:.2f}" for x in r.get("passes_s", [r["seconds"]])) + " s"


def measure_size(shape: LlamaShape, folders: list[Path], work: Path, methods: list[str], args, env: dict,
                 log) -> dict:
    """One untimed run of every method (a machine's first merge compiles the numba kernels into their
    on-disk cache: a one-time cost, out of the timings), then ``--repeats`` rounds of (floor, every
    method), interleaved so that each round's numbers share the machine's load; then one more floor. The floor is the fastest floor run (a quiet moment
    favours the floor, never us); each method is the median of its rounds."""
    common = {"folders": [str(f) for f in folders], "shard_bytes": args.shard_size, "threads": args.threads,
              "passes": args.passes}
    floor_spec = {**common, "mode": "floor", "output": str(work / "out_floor")}
    runs: dict[str, list] = {m: [] for m in methods}
    specs = {m: {**common, "mode": "merge", "method": m, "params": METHOD_PARAMS.get(m, {}), "device": args.device,
                 "keep_defaults": args.keep_defaults, "output": str(work / f"out_{m}"), "profile": m in args.profile}
             for m in methods}
    for m in methods:  # untimed: a machine's first merge compiles the numba kernels into their on-disk cache
        run_child({**specs[m], "profile": False}, env)
    floors = []
    for rnd in range(args.repeats):
        floors.append(run_child(floor_spec, env))
        log(f"  round {rnd + 1}: io_floor {_passes(floors[-1])} (minor faults {floors[-1]['minflt']}, "
            f"load {floors[-1]['loadavg_1m']:.2f})")
        for m in methods:
            r = run_child(specs[m], env)
            runs[m].append(r)
            log(f"  round {rnd + 1}: {m:<15} {_passes(r)} (anon {r['peak_anon_mb']:.0f} MB, "
                f"minor faults {r['minflt']}, load {r['loadavg_1m']:.2f})")
            if r.get("profile"):
                log(f"---- cProfile of {m} (main thread, by own time) ----\n{r['profile']}")
    floors.append(run_child(floor_spec, env))
    log(f"  io_floor (last) {_passes(floors[-1])}")
    floor = min(floors, key=lambda r: r["seconds"])
    floor_warm = min(f["warm_seconds"] for f in floors)
    out = {m: median_run(rs) for m, rs in runs.items()}
    for m, rs in runs.items():  # each run over the floor of its own round (the same load)
        out[m]["paired_ratio_median"] = statistics.median(r["seconds"] / f["seconds"] for r, f in zip(rs, floors))
        out[m]["warm_paired_ratio_median"] = statistics.median(r["warm_seconds"] / f["warm_seconds"]
                                                               for r, f in zip(rs, floors))
    return {"floor": floor, "floor_runs_s": [f["seconds"] for f in floors], "floor_warm_s": floor_warm,
            "floor_warm_runs_s": [f["warm_seconds"] for f in floors], "methods": out}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--params", type=parse_count, default=parse_count("272M"), help="parameters per model (272M)")
    ap.add_argument("--dtype", default="bf16", help="checkpoint dtype (bf16)")
    ap.add_argument("--shard-size", type=parse_bytes, default=parse_bytes("200MB"), help="shard size (200MB)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", type=parse_methods, default=list(DEFAULT_METHODS),
                    help=f"comma list; '+a,b' adds to the defaults; 'all' adds {','.join(OPTIONAL_METHODS)}")
    ap.add_argument("--rss-params", default="2x",
                    help="a second model size (same tensor shapes, more layers) for the peak-RSS check: '2x' "
                         "(default), a count like 544M, or 'none'")
    ap.add_argument("--rss-methods", type=parse_methods, default=list(DEFAULT_METHODS))
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (floor, methods); medians are reported (3)")
    ap.add_argument("--passes", type=int, default=2,
                    help="passes of the same work in each child process: the first is the cold process, the last "
                         "the steady state a sweep sees (2; 1 = cold only)")
    ap.add_argument("--mergekit-repeats", type=int, default=3, help="runs of each mergekit merge (median; 3)")
    ap.add_argument("--device", default="cpu", help="device of our merges (cpu, cuda, auto)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every child (0: torch's default)")
    ap.add_argument("--keep-defaults", action="store_true",
                    help="keep embed/lm_head/norms from the base (the paper's setting) instead of merging every tensor")
    ap.add_argument("--mergekit-python", default="auto",
                    help="python of a venv with mergekit ('auto': /work/mergekit-venv or PATH; 'none' to skip)")
    ap.add_argument("--mergekit-methods", default="task_arithmetic,ties")
    ap.add_argument("--mergekit-timeout", type=float, default=1800)
    ap.add_argument("--profile", default="", help="comma list of methods to run under cProfile (adds overhead)")
    ap.add_argument("--dir", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by a later run with --dir)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "data" / "benchmarks", help="results folder")
    ap.add_argument("--no-save", action="store_true", help="do not write the results files")
    ap.add_argument("--tag", default="", help="suffix of the results files' names")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(_child_main(json.loads(args.child))))
        return {}

    args.profile = [m for m in args.profile.split(",") if m]
    from workbench.merging import METHODS

    for m in args.methods + args.rss_methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; known: {', '.join(sorted(METHODS))}")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    def log(msg: str) -> None:
        print(msg, flush=True)

    shape = LlamaShape.for_params(args.params)
    sizes = [shape]
    if args.rss_params not in ("none", "", "0"):
        target = 2 * shape.n_params if args.rss_params == "2x" else parse_count(args.rss_params)
        big = shape.deeper(target)  # same tensor shapes, more layers
        if big.layers != shape.layers:
            sizes.append(big)

    mk_exe = None if args.mergekit_python == "none" else find_mergekit(args.mergekit_python)
    mk_methods = [m for m in args.mergekit_methods.split(",") if m in MERGEKIT]
    info = machine_info()
    dtype_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.dtype, args.dtype)
    log(f"machine: {info['host_cpu']} ({info['cpu_count']} cores), torch {info['torch']}, "
        f"load average {info['loadavg_start'][0]:.2f} / {info['loadavg_start'][1]:.2f} / {info['loadavg_start'][2]:.2f}")

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="wb-merge-speed-", dir=args.dir)) if not (args.dir and args.keep) else args.dir
    root.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "merge_speed", "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "machine": info, "dtype": dtype_name, "shard_bytes": args.shard_size, "experts": args.experts,
                    "device": args.device, "threads": args.threads or None, "keep_defaults": args.keep_defaults,
                    "method_params": {m: METHOD_PARAMS.get(m, {}) for m in args.methods}, "targets": TARGETS,
                    "anon_target_mb": ANON_TARGET_MB, "repeats": args.repeats,
                    "sizes": []}
    try:
        for si, shp in enumerate(sizes):
            models = root / f"models_{shp.n_params // 1_000_000}M"
            work = root / f"work_{si}"
            work.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            folders = write_checkpoints(models, shp, args.experts, dtype=args.dtype, shard_bytes=args.shard_size,
                                        seed=args.seed, progress=False)
            gen_s = time.perf_counter() - t
            nbytes = sum(folder_bytes(f) for f in folders)
            log(f"\nmodel: {shp.describe()}, base + {args.experts} experts, {args.dtype}, "
                f"{args.shard_size / 1e6:.0f} MB shards, {nbytes / 1e9:.2f} GB on disk (ready in {gen_s:.1f}s)")
            methods = args.methods if si == 0 else [m for m in args.rss_methods]
            meas = measure_size(shp, folders, work, methods, args, env, log)
            floor = meas["floor"]
            fs, fw = floor["seconds"], meas["floor_warm_s"]
            entry = {"params": shp.n_params, "shape": {"hidden": shp.hidden, "intermediate": shp.intermediate,
                                                        "layers": shp.layers, "vocab": shp.vocab},
                     "bytes_on_disk": nbytes, "largest_tensor_fp32_mb": shp.largest_tensor * 4 / 2**20,
                     "floor": floor, "floor_runs_s": meas["floor_runs_s"], "methods": {}, "mergekit": {}}
            log(f"\n{'':<24} {'time':>10}  {'ratio':>12}")
            log(fmt_row("io_floor", floor, floor) + f"  (runs: {', '.join(f'{x:.2f}' for x in meas['floor_runs_s'])} s; "
                f"{floor['bytes_read'] / fs / 1e9:.2f} GB/s read)")
            for m, r in meas["methods"].items():
                r = dict(r)
                r.pop("profile", None)
                r["ratio_to_floor"] = r["seconds"] / fs
                r["warm_ratio_to_floor"] = r["warm_seconds_median"] / fw
                r["cpu_ratio_to_floor"] = r["cpu_s"] / floor["cpu_s"]
                r["process_ratio_to_floor"] = r["wall_s"] / floor["wall_s"]
                r["target"] = TARGETS.get(m)
                entry["methods"][m] = r
                log(fmt_row(m, r, floor, TARGETS.get(m)))
            entry["floor_warm_s"] = fw
            entry["floor_warm_runs_s"] = meas["floor_warm_runs_s"]
            if args.passes > 1:
                log(f"\nsteady state: pass {args.passes} of each child (the same work again in the same process, as "
                    f"each merge of a sweep runs)")
                log(f"{'io_floor':<24} {fw:8.2f} s    1.00x floor  (runs: "
                    f"{', '.join(f'{x:.2f}' for x in meas['floor_warm_runs_s'])} s)")
                for m, r in entry["methods"].items():
                    t = TARGETS.get(m)
                    verdict = "" if t is None else (f"  target <= {t:.1f}x: "
                                                    f"{'met' if r['warm_ratio_to_floor'] <= t else 'MISSED'}")
                    log(f"{m:<24} {r['warm_seconds_median']:8.2f} s  {r['warm_ratio_to_floor']:6.2f}x floor  "
                        f"paired {r['warm_paired_ratio_median']:5.2f}x{verdict}")
            if si == 0 and mk_exe is not None and mk_methods:
                ver = mergekit_version(mk_exe)
                entry["mergekit_version"] = ver
                log(f"\nmergekit {ver} ({_shown(mk_exe)}), same checkpoints, every tensor merged, time of its run_merge:")
                for m in mk_methods:
                    try:
                        mk_runs = []
                        for _ in range(max(1, args.mergekit_repeats)):
                            mk_runs.append(run_mergekit(mk_exe, m, folders, work, dtype_name, args.shard_size, env,
                                                        args.mergekit_timeout, args.passes))
                            mk_runs[-1]["loadavg_1m"] = os.getloadavg()[0]
                            log(f"  mergekit {m}: {_passes(mk_runs[-1])} (load {mk_runs[-1]['loadavg_1m']:.2f})")
                        r = median_run(mk_runs)
                    except RuntimeError as e:
                        log(f"  mergekit {m}: FAILED: {str(e)[-800:]}")
                        entry["mergekit"][m] = {"error": str(e)[-2000:]}
                        continue
                    r["ratio_to_floor"] = r["seconds"] / fs
                    r["warm_ratio_to_floor"] = r["warm_seconds_median"] / fw
                    r["cpu_ratio_to_floor"] = r["cpu_s"] / floor["cpu_s"]
                    ours = entry["methods"].get(m)
                    line = fmt_row(f"mergekit {m}", r, floor)
                    if ours:
                        r["ours_over_mergekit"] = ours["seconds"] / r["seconds"]
                        r["ours_over_mergekit_warm"] = ours["warm_seconds_median"] / r["warm_seconds_median"]
                        r["ours_over_mergekit_process"] = ours["wall_s"] / r["wall_s"]
                        line += (f"\n{'':<24} ours/mergekit {r['ours_over_mergekit']:.3f} (ours "
                                 f"{1 / r['ours_over_mergekit']:.1f}x faster); whole processes, imports included: "
                                 f"{r['ours_over_mergekit_process']:.3f} (ours "
                                 f"{1 / r['ours_over_mergekit_process']:.1f}x faster)")
                        want = MERGEKIT_TARGETS.get(m)
                        if want:
                            def verdict(x: float) -> str:
                                return "met" if 1 / x >= want else "MISSED"
                            line += (f"\n{'':<24} target >= {want:.0f}x faster: work {verdict(r['ours_over_mergekit'])}, "
                                     f"process {verdict(r['ours_over_mergekit_process'])}; mergekit's own time is "
                                     f"{r['ratio_to_floor']:.2f}x the floor, so no tool can be more than "
                                     f"{r['ratio_to_floor']:.1f}x faster than it in work time")
                            if args.passes > 1:
                                x = r["ours_over_mergekit_warm"]
                                line += (f"\n{'':<24} steady state (pass {args.passes}): mergekit "
                                         f"{r['warm_seconds_median']:.2f} s = {r['warm_ratio_to_floor']:.2f}x the "
                                         f"floor, ours {1 / x:.1f}x faster: {verdict(x)}")
                    entry["mergekit"][m] = r
                    log(line)
            elif si == 0:
                log("\nmergekit: " + ("skipped (--mergekit-python none)" if args.mergekit_python == "none" else
                                   "not installed (see benchmarks/README.md); comparison skipped"))
            result["sizes"].append(entry)
            if not args.keep:
                shutil.rmtree(models, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        if len(result["sizes"]) > 1:
            log("\npeak RSS by model size (MB; ru_maxrss / anonymous):")
            for e in result["sizes"]:
                cells = [f"floor {e['floor']['maxrss_mb']:.0f}/{e['floor']['peak_anon_mb']:.0f}"]
                cells += [f"{m} {r['maxrss_mb']:.0f}/{r['peak_anon_mb']:.0f}" for m, r in e["methods"].items()
                          if m in args.rss_methods]
                log(f"  {e['params'] / 1e6:7.1f}M params ({e['shape']['layers']} layers): " + ", ".join(cells))
            worst = max(r["peak_anon_mb_max"] for e in result["sizes"] for r in e["methods"].values())
            log(f"  largest peak anonymous memory of any merge run: {worst:.0f} MB (target <= {ANON_TARGET_MB} MB: "
                f"{'met' if worst <= ANON_TARGET_MB else 'MISSED'})")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    log(f"\nload average at the end: {' / '.join(f'{x:.2f}' for x in result['machine']['loadavg_end'])}")
    if not args.no_save:
        save(result, args.out_dir, f"merge_speed_{shape.n_params // 1_000_000}M_{args.device}"
             + (f"_{args.tag}" if args.tag else ""), log)
    return result


def _round(x: float | None) -> float | str:
    return "" if not x else round(x, 3)


def save(result: dict, out_dir: Path, stem: str, log) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["date_utc", "params", "layers", "what", "method", "seconds", "process_s", "cpu_s", "ratio_to_floor",
            "warm_s", "warm_ratio_to_floor", "target",
            "maxrss_mb", "peak_anon_mb", "device", "threads", "loadavg_start", "cpu"]
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for e in result["sizes"]:
            fs = e["floor"]["seconds"]
            rows = [("io_floor", "io_floor", e["floor"])] + [("workbench", m, r) for m, r in e["methods"].items()]
            rows += [("mergekit", m, r) for m, r in e["mergekit"].items() if "error" not in r]
            for what, m, r in rows:
                w.writerow({"date_utc": result["date_utc"], "params": e["params"], "layers": e["shape"]["layers"],
                            "what": what, "method": m, "seconds": round(r["seconds"], 3), "process_s": round(r["wall_s"], 3),
                            "cpu_s": round(r.get("cpu_s", 0.0), 3),
                            "ratio_to_floor": round(r["seconds"] / fs, 3),
                            "warm_s": _round(e["floor_warm_s"] if what == "io_floor" else r["warm_seconds_median"]),
                            "warm_ratio_to_floor": _round(1.0 if what == "io_floor" else r["warm_ratio_to_floor"]),
                            "target": TARGETS.get(m) if what == "workbench" else "",
                            "maxrss_mb": round(r["maxrss_mb"], 1), "peak_anon_mb": round(r["peak_anon_mb"], 1),
                            "device": result["device"], "threads": r.get("threads", ""),
                            "loadavg_start": round(result["machine"]["loadavg_start"][0], 2),
                            "cpu": result["machine"]["host_cpu"]})
    log(f"results: {_shown(out_dir / (stem + '.json'))}, {_shown(out_dir / (stem + '.csv'))}")


if __name__ == "__main__":
    main()
