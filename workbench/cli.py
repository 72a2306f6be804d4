"""Command line: ``python -m workbench <command>`` (or the ``workbench`` console script).

Adding a command is one call, from any module::

    from workbench.cli import register_command
    register_command("zoo", "build the miniature world's zoo", add_arguments, run)

where ``add_arguments(parser: argparse.ArgumentParser) -> None`` declares its options and
``run(args: argparse.Namespace) -> int | None`` does the work (``None`` means exit status 0).

Commands whose module may not be imported at start-up (it is heavy, or optional) are listed in
:data:`LAZY_COMMANDS` as ``name -> (module, help)``; the module must define ``add_arguments`` and
``run`` and is imported only when that command is used.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .errors import WorkbenchError, WorkbenchWarning


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how to declare its arguments, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Optional[int]]


#: Commands available without imports beyond this module.
COMMANDS: dict[str, Command] = {}

#: Commands defined in other modules, imported on use: ``name -> (module, help)``.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "zoo": ("workbench.world.cli", "build or inspect the miniature world's model zoo"),
    "reproduce": ("workbench.reproduce", "run the notebooks in order (papermill)"),
    "profile": ("workbench.profile_cli", "interference profile of experts vs their base"),
    "sweep": ("workbench.studies.sweep", "run a merging-benchmark sweep (local or on Ray) from a YAML file"),
}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], Optional[int]]) -> None:
    """Register (or replace) the subcommand ``name``."""
    COMMANDS[name] = Command(help, add_arguments, run)


def _load_lazy(name: str) -> Command:
    module, help_ = LAZY_COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise SystemExit(f"workbench {name}: not available yet (module {module} is missing)") from e
        raise
    return Command(getattr(mod, "HELP", help_), mod.add_arguments, mod.run)


# ------------------------------------------------------------------------------------ merge
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="merge config YAML (see workbench.config.MergeConfig)")
    p.add_argument("--output", "-o", help="override the config's output folder")
    p.add_argument("--device", help="override the config's device (auto, cpu, cuda)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method parameter (YAML value), e.g. --set density=0.3; repeatable")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _merge_run(args: argparse.Namespace) -> int:
    import yaml

    from .config import MergeConfig
    from .engine import merge_with_report

    cfg = MergeConfig.from_yaml(args.config)
    updates: dict = {}
    if args.output:
        from pathlib import Path

        updates["output"] = Path(args.output).resolve()
    if args.device:
        updates["device"] = args.device
    if args.overwrite:
        updates["overwrite"] = True
    if args.set:
        params = dict(cfg.params)
        for kv in args.set:
            key, sep, value = kv.partition("=")
            if not sep:
                from .errors import ConfigError

                raise ConfigError(f"--set expects KEY=VALUE, got {kv!r}")
            params[key.strip()] = yaml.safe_load(value)
        updates["params"] = params
    if updates:
        cfg = MergeConfig.from_dict({**cfg.model_dump(), **updates})
    report = merge_with_report(cfg, progress=not args.quiet)
    print(f"merged {len(report.merged)} tensors, kept {len(report.kept)} from the base, "
          f"with {report.method} on {report.device} in {report.seconds:.1f} s -> {report.output}")
    return 0


# ------------------------------------------------------------------------------------ methods
def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one method's documentation")


def _parameter_help(spec) -> list[tuple[str, str, str]]:
    """``(name, "type = default [choices]", what the docstring says of it)`` per parameter of a
    registered method: the type from the function's annotations, the default from the registry,
    the sentences of the function's docstring that name the parameter inside a ````literal````."""
    import inspect
    import re

    sig = inspect.signature(spec.fn)
    text = " ".join((inspect.getdoc(spec.fn) or spec.doc or "").split())
    sentences = re.split(r"(?<=[.;])\s+", text)

    def names(sentence: str, name: str) -> bool:  # the name as a word inside a ``literal``
        return any(re.search(rf"\b{re.escape(name)}\b", lit) for lit in re.findall(r"``(.+?)``", sentence))

    rows = []
    for name, default in spec.defaults.items():
        param = sig.parameters.get(name)
        ann = param.annotation if param is not None else inspect.Parameter.empty
        kind = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        kind = "" if ann is inspect.Parameter.empty else f"{kind} "
        choices = spec.choices.get(name)
        head = f"{kind}= {default!r}" + (f"  one of {', '.join(map(repr, choices))}" if choices else "")
        said = " ".join(s for s in sentences if names(s, name)) or "(not described in the docstring)"
        rows.append((name, head, said))
    return rows


def _methods_run(args: argparse.Namespace) -> int:
    import textwrap

    from .merging import METHODS, get_method

    if args.name:
        spec = get_method(args.name)
        print(f"{spec.name} ({spec.pretty_name}): {(spec.doc or '').strip()}")
        print(textwrap.fill(f"reference: {spec.reference}", width=100, subsequent_indent="    ",
                            break_on_hyphens=False))
        print("\nparameters (override with `--set NAME=VALUE` in `workbench merge`, or `params:` in the YAML):")
        for name, head, said in _parameter_help(spec):
            print(f"  {name}: {head}")
            print(textwrap.fill(said, width=100, initial_indent="      ", subsequent_indent="      "))
        flags = [f for f, on in (("runs batched", spec.batched_fn is not None),
                                 ("draws random numbers (seeded per tensor)", spec.needs_generator)) if on]
        if flags:
            print(f"\n{spec.name} {' and '.join(flags)}.")
        return 0
    width = max(len(n) for n in METHODS) if METHODS else 4
    for name in sorted(METHODS):
        spec = METHODS[name]
        doc = (spec.doc or "").strip().splitlines()
        flags = []
        if getattr(spec, "batched_fn", None) is not None:
            flags.append("batched")
        if getattr(spec, "needs_generator", False):
            flags.append("seeded")
        extra = f" [{', '.join(flags)}]" if flags else ""
        print(f"{name:<{width}}  {spec.pretty_name}: {dict(spec.defaults)}{extra}  {doc[0] if doc else ''}")
        print(f"{'':<{width}}  {spec.reference}")
    return 0


register_command("merge", "merge experts into one model from a YAML config", _merge_args, _merge_run)
register_command("methods", "list the merge methods (display name, citation, default parameters)", _methods_args,
                 _methods_run)


# ------------------------------------------------------------------------------------ main
def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; the lazy command ``selected`` (if any) gets its real arguments."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="workbench", description="mllm-workbench: merge and compose multimodal LLMs")
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    for name, (_, help_) in LAZY_COMMANDS.items():
        if name in COMMANDS:
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        if name == selected:
            cmd = _load_lazy(name)
            cmd.add_arguments(p)
            p.set_defaults(_run=cmd.run)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


#: commands that write their outputs atomically (a temporary name, renamed at the end): an
#: interrupt leaves nothing behind, and says so.
ATOMIC_COMMANDS = ("merge", "profile")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``signum``); raised in the main thread so that every ``with`` block
    and ``finally`` clause cleans up, as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def _show_warning(command: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, WorkbenchWarning):
            print(f"workbench {command}: warning: {message}", file=sys.stderr)
        else:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    return show


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 success, 2 usage or a workbench error, 128 + the
    signal's number when interrupted: 130 for Ctrl-C / SIGINT, 143 for SIGTERM).

    SIGTERM (a timeout, a batch scheduler's preemption) is handled like Ctrl-C: the command's
    clean-up runs (a merge removes its temporary output) and one line is printed, no traceback.
    :class:`~workbench.errors.WorkbenchWarning`\ s print as one line each.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in LAZY_COMMANDS else None)
    args = parser.parse_args(argv)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(args.command)
            warnings.simplefilter("always", WorkbenchWarning)
            status = args._run(args)
    except WorkbenchError as e:
        if args.traceback:
            raise
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.traceback:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        done = "; nothing written" if args.command in ATOMIC_COMMANDS else ""
        print(f"workbench {args.command}: interrupted{done}", file=sys.stderr)
        return 128 + int(signum)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
