"""``python -m workbench zoo --preset default|tiny [--out DIR] [--jobs 2] [--only NAME ...]``.

The main CLI wires this in with ``add_arguments(subparser)`` and ``run(args)``."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--preset", default="default", help="default (~40 min on 2 cores) | tiny (~2 min)")
    parser.add_argument("--out", default=None, help="zoo folder (default zoo/<preset>, or $WORKBENCH_ZOO/<preset>)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--only", nargs="*", default=None, help="build only these jobs (and their dependencies)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import sys

    from .presets import PRESETS
    from .scheduler import build_zoo
    if args.preset not in PRESETS:
        print(f"workbench zoo: unknown preset {args.preset!r}; the presets are: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    zoo = build_zoo(args.preset, out=args.out, jobs=args.jobs, progress=not args.quiet, only=args.only)
    m = zoo.manifest
    print(f"zoo {args.preset}: {zoo.path} ({len(m['models'])} models, last build {m['build_wall_seconds']} s wall, "
          f"{m.get('jobs_trained', '?')} of {len(m['jobs'])} jobs trained)")
    for name, e in m["models"].items():
        scores = e.get("own_task") or e.get("task_scores")
        print(f"  {name:28s} {json.dumps(scores)}  gap={json.dumps(e.get('gap'))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="workbench-zoo"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
