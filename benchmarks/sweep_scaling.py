"""The same merging-benchmark sweep on a local Ray cluster of 1 and of 2 workers: wall time and speed-up.

The sweep is :func:`workbench.studies.merging_benchmark.capability_merging` (no reference rows: only the merge
cells, one per method x seed) on a zoo preset, with a fresh prediction cache per run so every
cell is computed. Each run starts its own local cluster (``ray.init(num_cpus=N)``, one CPU per
cell, so N cells run at once) and the time is taken around the sweep only (not the cluster's
start). The in-process executor (``local``) runs first as the baseline, and the tables of the
three runs are compared (they must be identical).

    python benchmarks/sweep_scaling.py                    # tiny zoo, 6 methods, the paper's λ grid
    python benchmarks/sweep_scaling.py --preset default --methods weight_average,ties,tsv,iso_c

What scales: independent cells, each a merge plus its evaluations, one per worker. What does not:
each worker process loads the zoo's base model and towers once (the local executor does it once
in all), the cluster's start, and a sweep of fewer cells than workers. On a shared machine the
numbers move with the load: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="zoo preset (or a zoo folder); default tiny")
    ap.add_argument("--methods", default="weight_average,task_arithmetic,ties,dare_linear,tsv,iso_c")
    ap.add_argument("--lambdas", default="0.1,0.3,0.5,0.7,1.0,1.5")
    ap.add_argument("--workers", default="1,2", help="Ray cluster sizes to time (CPUs = concurrent cells)")
    args = ap.parse_args(argv)

    import pandas as pd
    import ray
    import torch

    from workbench.studies import merging_benchmark as E

    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    lambdas = tuple(float(x) for x in args.lambdas.split(","))
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per cell: the workers inherit it
    print(f"start: {_load()}")

    def sweep(executor: str) -> tuple[float, pd.DataFrame]:
        with tempfile.TemporaryDirectory(prefix="wb-scaling-") as cache:
            t0 = time.perf_counter()
            df = E.capability_merging(args.preset, "full", methods, lambdas, device="cpu", references=False,
                                      cache=cache, progress=False, executor=executor)
            secs = time.perf_counter() - t0
        return secs, df.drop(columns=["pred_file"])

    base_s, base = sweep("local")
    print(f"local executor (in-process): {base_s:.1f} s for {len(methods)} cells")
    times = {}
    for n in (int(x) for x in args.workers.split(",")):
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            times[n], df = sweep("ray")
        finally:
            ray.shutdown()
        same = df.reset_index(drop=True).equals(base.reset_index(drop=True))
        print(f"ray, {n} worker(s): {times[n]:.1f} s (table identical to local: {same})")
    first = min(times)
    for n, s in times.items():
        if n != first:
            print(f"speed-up {first} -> {n} workers: {times[first] / s:.2f}x")
    print(f"end: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
