"""``python -m workbench profile``: the interference profile of experts against their base, from the shell.

    python -m workbench profile BASE image=path/to/expert1 audio=path/to/expert2 --out runs/profile

Writes the tidy tables of :class:`workbench.analysis.InterferenceProfile` (CSV + Parquet) and, with
``--figures``, one heatmap per metric (layers x module types) as PNG and SVG.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .errors import ConfigError

HELP = "interference profile of experts vs their base (cosine, sign conflicts, TIES/DARE survival)"


def _expert_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the shared base model (HF folder or weight file)")
    p.add_argument("experts", nargs="+", type=_expert_arg, metavar="NAME=PATH",
                   help="two or more experts (HF folders, peft LoRA adapters, zoo expert folders)")
    p.add_argument("--out", required=True, help="folder for the tables")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--topk", type=float, default=0.2, help="fraction kept by the TIES trim (default 0.2)")
    p.add_argument("--dare-p", type=float, default=0.2, help="DARE drop probability of the kept-fraction metrics")
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE draws (and of --sample)")
    p.add_argument("--sample", type=int, default=None, metavar="M",
                   help="an ESTIMATE from M entries per tensor instead of the exact profile (much faster on "
                        "a CPU; its standard errors are in profile_interference's docstring)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="worker threads on a CPU (default: torch's thread count, i.e. the cores)")
    p.add_argument("--figures", action="store_true", help="also write one heatmap per metric into OUT/figures")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="refuse experts that look fine-tuned from another base and LoRA adapters naming another "
                        "base model (default: a warning)")


def run(args: argparse.Namespace) -> int:
    from .analysis import profile_interference
    from .plots import metric_heatmap, save_figure

    experts = dict(args.experts)
    if len(experts) != len(args.experts):
        raise ConfigError("expert names must be unique")
    prof = profile_interference(args.base, experts, device=args.device, topk=args.topk, out_dir=args.out,
                                dare_p=args.dare_p, seed=args.seed, sample=args.sample, threads=args.threads,
                                refuse_foreign=args.strict, progress=not args.quiet)
    what = f"sampled estimate ({args.sample} entries per tensor)" if args.sample else "exact profile"
    print(f"{what} of {len(experts)} experts written to {args.out}")
    if args.figures:
        out = Path(args.out) / "figures"
        for metric in prof.metrics():
            try:
                fig = metric_heatmap(prof, metric)
            except (ValueError, KeyError):
                continue
            save_figure(fig, f"profile_{metric}", dir=out)
        print(f"heatmaps written to {out}")
    return 0
