"""Evaluation speed of routed compositions: each route's weight formed once, against RoutedLinear.

DAMC and MMER route every token of a composed LLM through ``W0 + Δ_route`` of its modality (routing.py).
:class:`workbench.routing.InferenceRoutedLinear` (what ``compose`` builds for evaluation) forms each route's
``W0 + Δ`` once; :class:`workbench.routing.RoutedLinear` (training) computes ``x W0ᵀ`` for every token plus each
route's delta. This script composes NaiveMC (no routes: the floor), DAMC and MMER from one seed of a zoo, scores
the same MCUB-mini items with both scorings (one thread; the towers' outputs cached by a first pass), the layers
switched between the two classes in alternation, and prints per method the milliseconds per item of each (the
fastest of ``--repeats``), their ratio and whether the predictions are the same.

    python benchmarks/routed_eval.py                      # the default zoo, 300 MCUB-mini-3 items
    python benchmarks/routed_eval.py --preset tiny --items 16
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default", help="zoo preset (its zoo must be built: python -m workbench zoo)")
    ap.add_argument("--items", type=int, default=300, help="MCUB-mini items (of one combination of modalities)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="the zoo's seed whose experts are composed")
    args = ap.parse_args(argv)

    import torch

    from workbench import routing as R
    from workbench.evaluate import CachedInputs, predict_scorings
    from workbench.studies.composition import ZooComposer, record_modalities
    from workbench.world import Zoo

    torch.set_num_threads(1)
    zoo = Zoo.coerce(None, args.preset)
    load = CachedInputs(zoo.load_inputs)
    for bench in ("mcub-3", "mcub-2"):
        try:
            recs = zoo.mcub(bench)
            break
        except FileNotFoundError:
            continue
    else:
        raise SystemExit(f"zoo {zoo.path}: no MCUB-mini test file (mcub-3 or mcub-2); "
                         "build it: python -m workbench zoo")
    mods = record_modalities(recs[0])
    recs = [r for r in recs if record_modalities(r) == mods][: args.items]
    print(f"zoo {zoo.path}, seed {args.seed}: {len(recs)} {bench} items over {'+'.join(mods)}, both scorings, "
          f"one thread, fastest of {args.repeats}")
    comp = ZooComposer(zoo, args.seed, search=False, progress=False, load_inputs=load)
    for method in ("naive_mc", "damc", "mmer"):
        if comp.members(method, mods) is None:
            print(f"{method}: not in this zoo")
            continue
        model = comp.build(method, mods)
        layers = [m for m in model.llm.modules() if isinstance(m, R.RoutedLinear)]
        predict_scorings(model, recs, load, ("loglik", "generate"))  # the towers' outputs, cached
        best, preds = {}, {}
        for _ in range(args.repeats):
            for cls in (R.InferenceRoutedLinear, R.RoutedLinear):
                for m in layers:
                    m.__class__ = cls
                t = time.perf_counter()
                out = predict_scorings(model, recs, load, ("loglik", "generate"))
                best[cls] = min(best.get(cls, float("inf")), time.perf_counter() - t)
                preds[cls] = {s: out[s]["pred"].astype(str).tolist() for s in out}
        fused, plain = (1e3 * best[c] / len(recs) for c in (R.InferenceRoutedLinear, R.RoutedLinear))
        same = preds[R.InferenceRoutedLinear] == preds[R.RoutedLinear]
        print(f"{method}: {len(layers)} routed layers; ms per item: formed once {fused:.2f}, RoutedLinear {plain:.2f}; "
              f"ratio {fused / plain:.2f}; same predictions: {same}")


if __name__ == "__main__":
    main()
