"""GPU merging at 7B scale: TIES, TSV and OptMerge against the I/O floor and the paper's 3.78 h.

Builds synthetic checkpoints of Llama-7B's tensor shapes (hidden 4096, 32 layers, FFN 11008,
vocab 32000, bf16; the base plus ``--experts`` experts = base + a dense Gaussian task vector),
drawn ON THE DEVICE from seeded generators and written to local disk (``benchmarks/synthetic.py``),
then measures, in one run and each in a fresh child process (``benchmarks/merge_speed.py``'s runner):

- the I/O floor: read every input tensor, write the output with safetensors (no arithmetic);
- ``ties`` (density 0.2), ``tsv``, ``optmerge`` with the paper's iterative solver (Adam, lr 1e-5,
  300 steps) and with the exact solver, through ``workbench.engine.merge`` on ``--device``:
  time, ratio to the floor, peak GPU memory (``torch.cuda.max_memory_allocated``), peak RSS;
- our OptMerge time against the paper's (Table 7: 3.78 h, 21.97 GB for Qwen2-VL-7B;
  ``data/published/optmerge_table7_cost.csv``);
- with ``--precision fp32,bf16`` (``fp32``, ``bf16``, ``tf32``; default ``fp32``): the iterative
  labels (``optmerge_iterative``, and ``wudi_iterative`` when asked for in ``--methods``) once per
  precision (results ``<label>`` for fp32, ``<label>_<precision>`` otherwise), and a precision check
  on one tensor of each 2-D shape of layer 0: time of the per-tensor solve per precision and, against
  fp32, the relative Frobenius error of ``tau_m`` and the objective difference (relative to the
  objective at the initialisation and to fp32's).

Targets: TIES within 1.2x the floor; OptMerge on the 7B shapes in under 10 minutes.

    python benchmarks/gpu_merge_7b.py --dir /local/bench7b --keep           # the full 7B shapes (~54 GB of inputs)
    python benchmarks/gpu_merge_7b.py --dir /local/bench7b --keep --methods optmerge_iterative   # one more method, same files
    python benchmarks/gpu_merge_7b.py --dir /local/bench7b --keep --methods optmerge_iterative,wudi_iterative --precision fp32,bf16
    python benchmarks/gpu_merge_7b.py --layers 1 --hidden 64 --intermediate 176 --vocab 256 --device cpu   # smoke

Every tensor is merged (``keep_defaults: false``: the floor's work; the paper keeps embeddings,
``lm_head`` and norms from the base, so this does a little more). Results are written to
``data/benchmarks/gpu_7b_<device>.json`` (``--out`` to change), merged with the methods already
there from an earlier run on the same shapes, so the methods can be run in separate commands
(each device command is limited to 10 minutes). A run with fewer layers also reports a linear
extrapolation to 32 layers (labelled as such).

Disk: the base + 3 experts take 4 x 13.5 GB; each merge output (13.5 GB) is deleted after it is
timed; ``--out-root`` puts outputs elsewhere (default: /dev/shm when it has room, else ``--dir``).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from merge_speed import machine_info, run_child  # noqa: E402
from synthetic import LlamaShape, folder_bytes, parse_bytes, write_checkpoints  # noqa: E402

#: label -> (method, params)
METHODS = {
    "ties": ("ties", {"density": 0.2}),
    "tsv": ("tsv", {}),
    "optmerge_iterative": ("optmerge", {"solver": "iterative"}),
    "optmerge_exact": ("optmerge", {"solver": "exact"}),
    "wudi_iterative": ("wudi", {"solver": "iterative"}),
}
#: run when --methods is not given (WUDI's Gram matrices on the 7B shapes are opt-in)
DEFAULT_METHODS = ("ties", "tsv", "optmerge_iterative", "optmerge_exact")
PRECISIONS = ("fp32", "bf16", "tf32")
TARGETS = {"ties": ("ratio_to_floor", 1.2), "optmerge_iterative": ("seconds", 600.0), "optmerge_exact": ("seconds", 600.0)}
PAPER_TABLE = ROOT / "data" / "published" / "optmerge_table7_cost.csv"


def paper_optmerge_cost(setting: str = "Qwen2-VL-7B") -> dict | None:
    """The paper's OptMerge hours and GPU memory (Table 7) for ``setting``."""
    if not PAPER_TABLE.exists():
        return None
    with open(PAPER_TABLE) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for r in rows:
        if r["setting"] == setting and r["method"] == "OptMerge":
            return {"setting": setting, "hours": float(r["hours"]), "memory_gb": float(r["memory_gb"]),
                    "source": "Wei et al. (ICLR 2026), Table 7, " + str(PAPER_TABLE.relative_to(ROOT))}
    return None


def run_keys(labels: list[str], precisions: list[str]) -> list[tuple[str, str, str, dict]]:
    """``(result key, label, method, params)`` per run: the iterative labels once per precision
    (key ``label`` for fp32, ``label_<precision>`` otherwise), the others once."""
    out = []
    for label in labels:
        method, params = METHODS[label]
        if params.get("solver") != "iterative":
            out.append((label, label, method, params))
            continue
        for p in precisions:
            out.append((label if p == "fp32" else f"{label}_{p}", label, method,
                        params if p == "fp32" else {**params, "precision": p}))
    return out


def _objective_setup(method: str, params: dict, N: int, m: int, n: int):
    """The objective (``None``: WUDI; else :class:`workbench.merging.Targets`) and the solver's
    initialisation."""
    from workbench.merging import optmerge_settings

    if method == "wudi":
        return None, params.get("init", "sum")
    targets, run = optmerge_settings(N, m, n, params.get("preset", "full_ft"),
                                     **{key: params.get(key) for key in ("k_ratio", "target", "projection", "init")})
    return targets, run["init"]


def precision_check(folders: list[Path], method: str, params: dict, precisions: list[str], device: str,
                    names: list[str]) -> dict:
    """Per tensor of ``names``: the per-tensor ``method`` solve on ``device`` in fp32 and in each
    other precision: seconds (after a 2-step warm-up), and against fp32 the relative Frobenius
    error of ``tau_m`` (``tau_rel_err``) and the objective difference relative to the objective
    at the initialisation (``obj_rel_init``) and to fp32's objective (``obj_rel``)."""
    import torch

    from workbench.io import CheckpointReader
    from workbench.merging import get_method, quadratic_merge_loss

    fn = get_method(method).fn
    dev = torch.device(device)
    readers = [CheckpointReader(f) for f in folders]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out = {}
    for name in names:
        base = readers[0].get(name).to(device=dev, dtype=torch.float32)
        experts = [r.get(name).to(device=dev, dtype=torch.float32) for r in readers[1:]]
        taus = torch.stack([e - base for e in experts])
        (m, n), N = base.shape, len(experts)
        k, init = _objective_setup(method, params, N, m, n)
        loss = lambda t: float(quadratic_merge_loss(t, taus, k).double())  # noqa: E731
        L0 = loss(taus.sum(0) if init == "sum" else taus.mean(0))
        row = {"shape": [m, n], "seconds": {}, "tau_rel_err": {}, "obj_rel_init": {}, "obj_rel": {}}
        tau = {}
        for p in ["fp32", *[q for q in precisions if q != "fp32"]]:
            fn(base, experts, **{**params, "precision": p, "steps": 2})
            sync()
            t = time.perf_counter()
            tau[p] = fn(base, experts, **{**params, "precision": p}) - base
            sync()
            row["seconds"][p] = time.perf_counter() - t
            if p != "fp32":
                row["tau_rel_err"][p] = float((tau[p] - tau["fp32"]).norm() / tau["fp32"].norm())
                L32, Lp = loss(tau["fp32"]), loss(tau[p])
                row["obj_rel_init"][p] = abs(Lp - L32) / L0
                row["obj_rel"][p] = abs(Lp - L32) / L32 if L32 > 0 else float("inf")
                del tau[p]
        out[name] = row
        del base, experts, taus, tau
    return out


def device_label(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def pick_out_root(need_bytes: int, fallback: Path) -> Path:
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * need_bytes:
            return Path(tempfile.mkdtemp(prefix="wb-gpu7b-out-", dir=shm))
    except OSError:
        pass
    return fallback


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shard-size", type=parse_bytes, default=parse_bytes("2GB"))
    ap.add_argument("--device", default="cuda", help="compute device of the merges (cuda, cuda:1, cpu)")
    ap.add_argument("--gen-device", default=None, help="where the synthetic weights are drawn (default: --device)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma list of {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})")
    ap.add_argument("--precision", default="fp32",
                    help=f"comma list of {', '.join(PRECISIONS)}: the iterative solvers' matmul precision; more "
                         "than fp32 also runs a bf16/tf32-vs-fp32 check on a few tensors")
    ap.add_argument("--no-floor", action="store_true", help="reuse the floor of an earlier run in --out")
    ap.add_argument("--dir", type=Path, default=None, help="where the checkpoints are written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the checkpoints in --dir")
    ap.add_argument("--out-root", type=Path, default=None, help="where merge outputs go (default: /dev/shm if roomy)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default data/benchmarks/gpu_7b_<device>.json)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available here (use --device cpu with a small --layers/--hidden)")
    labels = [m for m in args.methods.split(",") if m]
    for m in labels:
        if m not in METHODS:
            ap.error(f"unknown method label {m!r}; known: {', '.join(METHODS)}")
    precisions = list(dict.fromkeys(p for p in args.precision.split(",") if p))
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}; known: {', '.join(PRECISIONS)}")
    if not precisions:
        ap.error("--precision needs at least one of " + ", ".join(PRECISIONS))

    def log(msg: str) -> None:
        print(msg, flush=True)

    shape = LlamaShape.llama_7b(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)
    full = LlamaShape.llama_7b()
    info = machine_info()
    dev_label = device_label(args.device)
    out_json = args.out or (ROOT / "data" / "benchmarks" / f"gpu_7b_{dev_label}.json")
    log(f"machine: {info.get('gpu', 'no GPU')} / {info['host_cpu']} ({info['cpu_count']} cores), torch {info['torch']}, "
        f"load average {' / '.join(f'{x:.2f}' for x in info['loadavg_start'])}")
    log(f"model: {shape.describe()}, base + {args.experts} experts, {args.dtype}; merges on {args.device}")

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = args.dir if (args.dir and args.keep) else Path(tempfile.mkdtemp(prefix="wb-gpu7b-", dir=args.dir))
    root.mkdir(parents=True, exist_ok=True)
    models = root / f"models_{shape.hidden}x{shape.layers}_{shape.intermediate}_{shape.vocab}_e{args.experts}"
    need = 2 * shape.n_params * (args.experts + 1)
    free = shutil.disk_usage(root).free
    if not (models / "base" / "synthetic.json").exists() and free < 1.05 * need:
        raise SystemExit(f"not enough disk in {root}: {free / 1e9:.1f} GB free, the checkpoints need {need / 1e9:.1f} GB "
                         f"(use --dir elsewhere, fewer --experts or --layers)")
    out_root = args.out_root or pick_out_root(2 * shape.n_params, root)
    made_out_root = args.out_root is None and out_root != root
    prev = {}
    if out_json.exists():
        try:
            prev = json.loads(out_json.read_text())
        except json.JSONDecodeError:
            prev = {}
    same_shape = prev.get("shape") == {"hidden": shape.hidden, "intermediate": shape.intermediate,
                                       "layers": shape.layers, "vocab": shape.vocab} and prev.get("experts") == args.experts
    result = {"benchmark": "gpu_merge_7b", "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "device": args.device, "device_label": dev_label, "experts": args.experts,
              "dtype": args.dtype, "shape": {"hidden": shape.hidden, "intermediate": shape.intermediate,
                                             "layers": shape.layers, "vocab": shape.vocab},
              "params_per_model": shape.n_params, "keep_defaults": False,
              "methods": dict(prev.get("methods", {})) if same_shape else {},
              "floor": prev.get("floor") if same_shape else None, "paper": paper_optmerge_cost(),
              "precision_check": dict(prev.get("precision_check", {})) if same_shape else {}}
    try:
        t = time.perf_counter()
        folders = write_checkpoints(models, shape, args.experts, dtype=args.dtype, shard_bytes=args.shard_size,
                                    seed=args.seed, device=args.gen_device or args.device, progress=True, log=log)
        result["generate_s"] = time.perf_counter() - t
        nbytes = sum(folder_bytes(f) for f in folders)
        result["bytes_on_disk"] = nbytes
        log(f"checkpoints: {nbytes / 1e9:.1f} GB in {models} (ready in {result['generate_s']:.1f}s); outputs in {out_root}")
        common = {"folders": [str(f) for f in folders], "shard_bytes": args.shard_size, "threads": 0}
        if not args.no_floor or result["floor"] is None:
            r = run_child({**common, "mode": "floor", "output": str(out_root / "out_floor")})
            result["floor"] = r
            log(f"io_floor                 {r['seconds']:8.2f} s  ({r['bytes_read'] / r['seconds'] / 1e9:.2f} GB/s read, "
                f"peak RSS {r['maxrss_mb']:.0f} MB)")
        fs = result["floor"]["seconds"]
        for rkey, label, method, params in run_keys(labels, precisions):
            spec = {**common, "mode": "merge", "method": method, "params": params, "device": args.device,
                    "keep_defaults": False, "output": str(out_root / f"out_{rkey}")}
            r = run_child(spec)
            r["ratio_to_floor"] = r["seconds"] / fs
            r["method"], r["params"] = method, params
            if shape.layers != full.layers:
                # rough: time grows with the layers' share of the work (embeddings and lm_head counted once)
                r["extrapolated_32_layers_s"] = r["seconds"] * full.n_params / shape.n_params
            result["methods"][rkey] = r
            gpu = f"peak GPU {r['cuda_peak_mb'] / 1024:.2f} GiB" if "cuda_peak_mb" in r else "no GPU"
            tgt = ""
            if label in TARGETS:
                key, bound = TARGETS[label]
                unit = "s" if key == "seconds" else "x"
                if shape.hidden != full.hidden or shape.intermediate != full.intermediate:
                    tgt = f"  target <= {bound:g}{unit}: n/a (not the 7B tensor shapes)"
                else:
                    val = r.get("extrapolated_32_layers_s", r[key]) if key == "seconds" else r[key]
                    tgt = f"  target <= {bound:g}{unit}: {'met' if val <= bound else 'MISSED'}"
                    if key == "seconds" and "extrapolated_32_layers_s" in r:
                        tgt += f" (extrapolated to 32 layers: {val:.0f} s)"
            log(f"{rkey:<24} {r['seconds']:8.2f} s  {r['ratio_to_floor']:6.2f}x floor  {gpu}  peak RSS "
                f"{r['maxrss_mb']:.0f} MB{tgt}")
        paper = result["paper"]
        same_tensors = shape.hidden == full.hidden and shape.intermediate == full.intermediate
        for label in [k for k in result["methods"] if k.startswith("optmerge_")]:
            r = result["methods"].get(label)
            if not (r and paper):
                continue
            if not same_tensors:
                log(f"{label}: no comparison with the paper's {paper['hours']} h (not the 7B tensor shapes)")
                continue
            secs = r.get("extrapolated_32_layers_s", r["seconds"])
            r["paper_hours"] = paper["hours"]
            r["speedup_vs_paper"] = paper["hours"] * 3600 / secs
            note = " (extrapolated from %d layers)" % shape.layers if "extrapolated_32_layers_s" in r else ""
            log(f"{label}: {secs / 60:.2f} min{note} vs the paper's {paper['hours']} h for OptMerge on "
                f"{paper['setting']} ({paper['memory_gb']} GB GPU): {r['speedup_vs_paper']:.0f}x less time; "
                f"our peak GPU memory {r.get('cuda_peak_mb', float('nan')) / 1024:.2f} GiB")
        check = [lb for lb in labels if METHODS[lb][1].get("solver") == "iterative"]
        if check and any(p != "fp32" for p in precisions):
            names = [f"model.layers.0.{t}.weight" for t in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")]
            for label in check:
                method, params = METHODS[label]
                rows = precision_check(folders, method, params, precisions, args.device, names)
                result["precision_check"][label] = rows
                for name, row in rows.items():
                    cells = [f"{p} {row['seconds'][p]:.2f} s" + (
                        "" if p == "fp32" else f" (tau_m rel err {row['tau_rel_err'][p]:.1e}, objective diff "
                                               f"{row['obj_rel_init'][p]:.1e} of init, {row['obj_rel'][p]:.1e} of fp32's)")
                             for p in row["seconds"]]
                    log(f"precision {label} {name} {row['shape']}: " + " | ".join(cells))
    finally:
        if made_out_root:
            shutil.rmtree(out_root, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"results: {out_json}")
    return result


if __name__ == "__main__":
    main()
