"""The streaming merge engine: any registered method, tensor by tensor, on a chosen device.

ONE merge loop, :func:`stream_merge`, serves every merge: it reads ``(base, experts)`` per tensor
name from a source, runs the method (one lookup: :func:`resolve_method`, one parameter rule:
:func:`method_params`, one seeding: :func:`tensor_generator` ``(seed, name)``, one call:
:func:`call_method`) and hands the result to a sink, which casts it and checks it finite (sources
and sinks: :mod:`workbench.io.stream`). Two entry points:

- :func:`merge` / :func:`merge_with_report`: checkpoint folders to a new checkpoint folder
  (``FolderSource`` -> ``FolderSink``; the engine's name filter :class:`~workbench.io.filters.NameFilter`);
- :func:`merge_into`: a module or state dict in memory, merged in place or into task vectors
  (``ModuleSource`` -> ``MemorySink``; what :mod:`workbench.compose` builds NaiveMC and MMER with).

``merge(config)`` does, in order:

1. **validation, before anything is written**: the method and its parameters (typed by the
   method's signature: :func:`workbench.config.typed_params`), the paths (the output is not an
   input, inside one, or around one; not a file; ``overwrite`` replaces only an earlier output),
   every checkpoint's header (corrupt or truncated files), every expert's tensor names and shapes
   against the base (LoRA adapters: their targets and delta shapes, and the base they name) -
   the checks of :mod:`workbench.io.validate`, shared with ``workbench profile``;
2. optional **global TIES trimming** (``params: {trim: global}``): streaming passes over the
   merged tensors find, per expert, the exact magnitude threshold that keeps the top
   ``density`` fraction of all its task-vector entries (a histogram of the magnitudes' float32
   bit patterns locates the threshold's bin, a second pass sorts only that bin's values);
3. the **merge pass**: a background thread reads the next tensors (queue depth 2) while the
   current ones are computed in float32 on the device; each result is cast to the stored dtype
   and written at once by a planned :class:`~workbench.io.CheckpointWriter`, so memory holds a
   few tensors, never the model. Tensors the name filter keeps are copied from the base
   bit-identically. Method extras (MMER masks) are bit-packed and saved under ``<output>/mmer/``
   (the MMER store: :mod:`workbench.io.mmer_store`).
   What is written is checked finite after the cast to the output dtype, and each expert's
   ``||tau|| / ||theta_0||`` is tallied: above :data:`~workbench.io.validate.FOREIGN_RATIO` a
   warning names it (``strict``: the merge fails and nothing is written).
   On a CPU, weight average, task arithmetic, DARE linear, TIES and DARE-TIES run instead as the
   compiled, row-chunked kernels of :mod:`workbench.merging.kernels` over memory-mapped inputs (the
   same values; ``WORKBENCH_COMPILED_MERGE=0`` runs the torch methods; the report's ``path`` says
   which ran); the same finiteness and foreign-expert checks apply.

Every random draw uses a generator seeded from ``(seed, tensor name)``, so results do not depend
on the order tensors are processed in, nor on batching.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .config import MergeConfig, typed_params
from .device import resolve_device
from .errors import CheckpointError, ConfigError, WorkbenchError
from .io.experts import open_expert
from .io.filters import NameFilter
from .io.lora import is_lora_adapter
from .io.reader import CheckpointReader
from .io.stream import FolderSink, FolderSource, MemorySink, ModuleSource, StreamItem, prefetch, read_item, to_device
from .io.validate import (ROW_STRIDE, TaskVectorNorms, check_output_path, check_output_target, remove_stale_temporaries)
from .io.writer import CheckpointWriter

#: histogram used to locate the global trim threshold (2**15 bins of float32 bit patterns; LO/HI unused).
_HIST_LO, _HIST_HI, _HIST_BINS = -80.0, 20.0, 1 << 15
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------- helpers
def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, name)`` only (sha256), independent of processing order."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with :func:`tensor_seed`."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(tensor_seed(seed, name))
    return g


#: the name of a method given as a plain callable (:func:`resolve_method`).
CALLABLE_METHOD = "<callable>"


def resolve_method(method: Any, registry: Mapping[str, Any] | None = None):
    """The one method lookup: the :class:`MethodSpec` of a name from ``registry`` or
    :mod:`workbench.merging`; a spec is returned as it is, a plain callable
    ``fn(base, experts, name=, generator=, **params)`` wrapped in one (named :data:`CALLABLE_METHOD`).

    Raises:
        ConfigError: for an unknown method (listing the known ones).
    """
    if not isinstance(method, str):
        if hasattr(method, "fn"):
            return method
        from .merging.registry import MethodSpec

        return MethodSpec(name=CALLABLE_METHOD, fn=method, defaults={}, doc="a callable given directly")
    if registry is None:
        from .merging import get_method

        return get_method(method)
    if method not in registry:
        raise ConfigError(f"unknown merge method {method!r}; known: {', '.join(sorted(registry))}")
    return registry[method]


def method_params(spec, params: Mapping[str, Any] | None, label: str | None = None) -> dict:
    """The parameters a method runs with: its defaults updated with ``params``, checked
    (:meth:`MethodSpec.check_params`) and typed by its signature (:func:`workbench.config.typed_params`);
    a plain callable (:data:`CALLABLE_METHOD`) takes ``params`` as given."""
    params = dict(params or {})
    if spec.name == CALLABLE_METHOD:
        return params
    spec.check_params(params)
    return {**dict(getattr(spec, "defaults", {}) or {}), **typed_params(spec.fn, params, label or spec.name)}


# ---------------------------------------------------------------------------------------- global trim
def _hist_index(a: torch.Tensor) -> torch.Tensor:
    """Bin of each magnitude (float32, ``>= 0``) in the fixed histogram: the top 15 bits of its
    IEEE pattern (exponent and 7 mantissa bits; monotone in the value, ``2**15`` bins, zero in
    bin 0 together with the smallest subnormals). One shift per entry, no logarithm."""
    return a.view(torch.int32) >> 16


def _hist_add(hist: torch.Tensor, a: torch.Tensor) -> None:
    """Add the non-zero magnitudes ``a`` (float32, ``>= 0``) to ``hist`` (zeros are counted out
    of bin 0 instead of being filtered out first)."""
    hist += torch.bincount(_hist_index(a), minlength=_HIST_BINS)
    hist[0] -= a.numel() - int(torch.count_nonzero(a))


def _taus(items: list[StreamItem], device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    for item in items:
        b = item.base.to(device=device, dtype=torch.float32)
        for i, x in enumerate(item.experts):
            yield i, (to_device(x, b, device) - b).reshape(-1)


def global_trim_thresholds(units, read, n_experts: int, density: float, device: torch.device,
                           progress: bool = True) -> list[float]:
    """Per expert, the magnitude ``t_i`` such that ``|τ_i| >= t_i`` keeps the top ``density``
    fraction of all entries of τ_i over the merged tensors (k = ceil(density · total), exact).

    Two streaming passes: a histogram of |τ_i| (by float32 bit pattern) finds the bin holding the k-th largest value;
    the second pass collects only that bin's values and takes the exact order statistic.
    """
    from tqdm.auto import tqdm

    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    hists = [torch.zeros(_HIST_BINS, dtype=torch.long, device=device) for _ in range(n_experts)]
    total = 0
    with contextlib.closing(prefetch(units, read)) as stream:
        for items in tqdm(stream, total=len(units), desc="global trim 1/2", disable=not progress, leave=False):
            total += sum(it.base.numel() for it in items)
            for i, tau in _taus(items, device):
                _hist_add(hists[i], tau.abs_())
    k = max(1, math.ceil(density * total))
    targets = []  # (bin, rank within the bin) per expert, or None = keep everything
    for h in hists:
        from_top = torch.flip(h, [0]).cumsum(0)
        if int(from_top[-1]) < k:  # fewer non-zeros than k: keep every entry
            targets.append(None)
            continue
        j = int(torch.searchsorted(from_top, torch.tensor(k, device=device)))
        b = _HIST_BINS - 1 - j
        above = int(from_top[j - 1]) if j > 0 else 0
        targets.append((b, k - above))
    # one buffer per expert, sized from the histogram up front: no small long-lived allocations
    # interleaved with the per-tensor ones (they fragment the heap and keep freed memory resident)
    pools = [torch.empty(int(hists[i][t[0]]) if t is not None else 0, dtype=torch.float32)
             for i, t in enumerate(targets)]
    fill = [0] * n_experts
    if any(t is not None for t in targets):
        with contextlib.closing(prefetch(units, read)) as stream:
            for items in tqdm(stream, total=len(units), desc="global trim 2/2", disable=not progress, leave=False):
                for i, tau in _taus(items, device):
                    if targets[i] is None:
                        continue
                    a = tau.abs_()
                    hit = _hist_index(a) == targets[i][0]
                    if targets[i][0] == 0:
                        hit &= a > 0
                    sel = a[hit]
                    pools[i][fill[i]:fill[i] + sel.numel()] = sel.cpu()
                    fill[i] += sel.numel()
    out = []
    for i, t in enumerate(targets):
        if t is None:
            out.append(0.0)
            continue
        if fill[i] != pools[i].numel():  # both passes bin identically; anything else is a bug
            raise RuntimeError(f"global trim: {fill[i]} values in the threshold bin, histogram said {pools[i].numel()}")
        vals = pools[i].sort(descending=True).values
        out.append(float(vals[t[1] - 1]))
    return out


# ---------------------------------------------------------------------------------------- the engine
@dataclass
class MergeReport:
    """What a merge did (also saved as ``workbench_merge.json`` in the output)."""

    output: Path
    method: str
    params: dict
    merged: list[str]
    kept: list[str]
    seconds: float
    device: str
    thresholds: list[float] | None = None
    #: per merged 2-D tensor, the method's report facts (WUDI / OptMerge: objective start / end,
    #: gradient ratio, converged; see ``workbench.merging.quadratic._solve``); empty for other methods
    objectives: dict[str, dict] = field(default_factory=dict)
    path: str = "torch"  # "compiled": the fused CPU kernels of workbench.merging.kernels ran


def call_method(fn: Callable, base: torch.Tensor, experts: list[torch.Tensor], name: str, seed: int, params: dict,
                *, device: torch.device | str = "cpu", report: list | None = None) -> tuple[torch.Tensor, dict]:
    """One tensor through a method's ``fn`` (the engine's and the composition's one call):
    ``fn(base, experts, name=, generator=, **params)`` with the generator of :func:`tensor_generator`
    ``(seed, name)`` on ``device``; returns ``(merged, extras)`` (a method's :class:`MergeResult`
    unwrapped; ``{}`` for a bare tensor). ``report``: the list a reporting method appends its facts to."""
    gen = tensor_generator(seed, name, device)
    extra = {"report": report} if report is not None else {}
    out = fn(base, experts, name=name, generator=gen, **params, **extra)
    if hasattr(out, "merged") and hasattr(out, "extras"):
        return out.merged, dict(out.extras or {})
    return out, {}


def use_batched(spec, device: torch.device) -> bool:
    """Batch same-shape tensors through ``spec.batched_fn``: only on CUDA (on CPU one tensor at a
    time is as fast and keeps memory lowest)."""
    return getattr(spec, "batched_fn", None) is not None and device.type == "cuda"


def _batch_units(names: list[str], infos: Mapping[str, Any], device: torch.device, n_experts: int,
                 batch_size: int | None) -> list[list[str]]:
    """Group same-shape 2-D tensors into batches bounded by ``batch_size`` or by free GPU memory."""
    groups: dict[tuple, list[str]] = {}
    singles = []
    for n in names:
        shape = tuple(infos[n].shape)
        (groups.setdefault(shape, []) if len(shape) == 2 else singles).append(n)
    if batch_size is None:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 2**30
        budget = free // 4
    units = [[n] for n in singles]
    for shape, members in groups.items():
        bs = batch_size
        if bs is None:
            per = math.prod(shape) * 4 * (2 * n_experts + 6)  # inputs, stacks, workspace (float32)
            bs = max(1, int(budget // max(per, 1)))
        for i in range(0, len(members), bs):
            units.append(members[i:i + bs])
    return units


def stream_merge(source, sink, units: Sequence[Sequence[tuple[str, bool]]], spec, params: dict, *, seed: int = 0,
                 device: torch.device | None = None, thresholds: list[float] | None = None, batched: bool = False,
                 norms: TaskVectorNorms | None = None, label: str | None = None,
                 compiled_write: Callable[[StreamItem], None] | None = None, progress: bool = False) -> dict[str, dict]:
    """THE merge loop, for every source and sink: per unit of ``(name, merged)`` pairs (read ahead
    by :func:`prefetch` from ``source.read``), a kept tensor goes to ``sink.keep``; a merged one whose
    experts all equal the base (read ``None``, e.g. outside every LoRA target) is the base and kept
    too; the others run through the method (:func:`call_method`: one seeding,
    :func:`tensor_generator` ``(seed, name)``) in float32 on ``device`` (``None``: where the base
    tensor is) and go to ``sink.put`` (which casts and checks them finite), with the method's
    extras. ``compiled_write``: the compiled CPU path writes merged tensors itself.
    Returns the per-tensor report facts of a reporting method (WUDI / OptMerge)."""
    from tqdm.auto import tqdm

    label = label or spec.name
    objectives: dict[str, dict] = {}

    def merge_unit(items: list[StreamItem]) -> None:
        # a function of its own, so that no local outlives the unit (memory stays bounded)
        todo = []
        for it in items:
            if it.merged and any(x is not None for x in it.experts):
                todo.append(it)
                continue
            if it.merged and norms is not None:  # tau = 0 on this tensor, tallied as the method would see it
                b = it.base.to(device=device or it.base.device, dtype=torch.float32)
                norms.observe(it.name, b, [b] * len(it.experts))
            sink.keep(it)
        if not todo:
            return
        if compiled_write is not None:
            for it in todo:
                compiled_write(it)
            return
        results = _compute(spec, todo, device or todo[0].base.device, seed, params, thresholds, batched, norms)
        for it, (merged, extras, facts) in zip(todo, results):
            if facts:
                objectives[it.name] = facts
            if tuple(merged.shape) != tuple(it.base.shape):
                raise WorkbenchError(f"method {label!r} returned shape {list(merged.shape)} for tensor "
                                     f"{it.name!r}, expected {list(it.base.shape)}")
            sink.put(it.name, merged, extras, f"method {label!r}")

    with tqdm(total=sum(len(u) for u in units), desc=f"merge {label}", unit="tensor", disable=not progress) as bar:
        with contextlib.closing(prefetch(units, source.read)) as stream:  # stops the reader thread on errors
            for items in stream:
                merge_unit(items)
                bar.update(len(items))
                del items
    return objectives


def merge_into(base: torch.nn.Module | Mapping[str, torch.Tensor], experts: Sequence[Any], method: Any = "weight_average",
               params: Mapping[str, Any] | None = None, *, keep: Sequence[str] = (), seed: int = 0,
               task_vectors: bool = False, dtype: torch.dtype | None = None, progress: bool = False) -> MemorySink:
    """The in-memory merge (:class:`ModuleSource` -> :class:`MemorySink`, through :func:`stream_merge`):
    every floating tensor of ``base`` (a module's parameters, tied ones once, or a state dict) except
    those matching a ``keep`` regex (:class:`NameFilter` ``(exclude=keep, keep_defaults=False)``) is
    merged from the ``experts`` (:class:`~workbench.io.experts.Expert`) by ``method`` (a name, a spec or
    a callable: :func:`resolve_method`; ``params``: :func:`method_params`), where the tensor is.
    The results replace the base's tensors in place, or (``task_vectors=True``) are kept as
    ``merged - base`` in the returned sink's ``tensors`` (in ``dtype``, default the base's)."""
    spec = resolve_method(method)
    source = ModuleSource(base, experts)
    flt = NameFilter(exclude=tuple(keep), keep_defaults=False)
    sink = MemorySink(source, task_vectors=task_vectors, dtype=dtype)
    stream_merge(source, sink, [[(n, True)] for n in source.tensors if flt.merged(n)], spec,
                 method_params(spec, params), seed=seed, progress=progress)
    return sink


def merge(config: MergeConfig | dict | str | Path, *, methods: Mapping[str, Any] | None = None,
          progress: bool = True) -> Path:
    """Merge the experts of ``config`` into a new Hugging Face folder and return its path.

    Args:
        config: a :class:`MergeConfig`, a dict, or a YAML path.
        methods: a registry to use instead of :data:`workbench.merging.METHODS` (tests).
        progress: show tqdm bars.

    Raises:
        ConfigError: unknown method / parameter, bad paths - before anything is written.
        CheckpointError: unreadable, inconsistent or non-finite inputs (file and tensor named);
            the temporary output is removed.
    """
    return merge_with_report(config, methods=methods, progress=progress).output


def merge_with_report(config: MergeConfig | dict | str | Path, *, methods: Mapping[str, Any] | None = None,
                      progress: bool = True) -> MergeReport:
    """:func:`merge`, returning a :class:`MergeReport`."""
    t0 = time.perf_counter()
    cfg = MergeConfig.coerce(config)
    spec = resolve_method(cfg.method, methods)
    params = method_params(spec, cfg.params, cfg.method)

    # ---- paths
    inputs = [cfg.base, *cfg.experts]
    for p in inputs:
        if not Path(p).exists():
            raise ConfigError(f"input path does not exist: {p}")
    check_output_path(cfg.output, inputs)
    remove_stale_temporaries(cfg.output)
    check_output_target(cfg.output, cfg.overwrite)
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from e

    # ---- checkpoints: headers, names, shapes
    if is_lora_adapter(cfg.base):
        raise ConfigError(f"the base {cfg.base} is a LoRA adapter; give the full base model")
    compiled = compiled_merge_available(cfg.method, params, device, cfg.experts, methods)
    base = CheckpointReader(cfg.base, mmap=compiled)
    experts = [open_expert(p, mmap=compiled) for p in cfg.experts]
    for e in experts:
        e.validate(base, refuse_foreign=cfg.strict)
    names = base.keys()
    infos = {n: base.info(n) for n in names}
    flt = NameFilter(cfg.include, cfg.exclude, cfg.keep_defaults, cfg.keep_patterns()).with_overrides(
        tuple(getattr(spec, "include", ()) or ()), tuple(getattr(spec, "exclude", ()) or ()))
    merged_names = [n for n in names if infos[n].dtype.is_floating_point and flt.merged(n)]
    merged_set = set(merged_names)
    out_dtype = _DTYPES[cfg.dtype] if cfg.dtype else None

    def dtype_of(n: str) -> torch.dtype:
        d = infos[n].dtype
        return out_dtype if (out_dtype is not None and d.is_floating_point) else d

    source = FolderSource(base, experts, checked=not compiled)

    pool = _compiled_pool() if compiled else (None, 1)  # (threads or None, workers)

    # ---- global trim (TIES over all parameters)
    params_asked = dict(params)
    thresholds = None
    if str(params.get("trim", "tensor")) == "global":
        # the experts are trimmed here (before the method runs: before DARE's drop in dare_ties),
        # then the method runs without a trim of its own
        density = float(params.get("density", params.get("k", 0.2)))
        if compiled:
            try:
                thresholds = _compiled_global_trim(merged_names, base, experts, density, pool, progress)
            except BaseException:
                if pool[0] is not None:
                    pool[0].shutdown()
                raise
        else:
            thresholds = global_trim_thresholds([[(n, True)] for n in merged_names], source.read, len(experts), density,
                                                device, progress)
        params = {**params, "trim": "tensor", "density": 1.0}

    # ---- schedule: units of names read together
    batched = use_batched(spec, device)
    if batched:
        merged_units = _batch_units(merged_names, infos, device, len(experts), cfg.batch_size)
    else:
        merged_units = [[n] for n in merged_names]
    units = [[(n, True) for n in u] for u in merged_units] + [[(n, False)] for n in names if n not in merged_set]

    config_updates = {}
    if out_dtype is not None:
        config_updates["torch_dtype"] = cfg.dtype
        if base.config and "dtype" in base.config:
            config_updates["dtype"] = cfg.dtype
    compiled_settings = _compiled_settings(cfg.method, params, len(experts), thresholds) if compiled else None
    plan = [(n, infos[n].shape, dtype_of(n)) for n in names]
    norms = TaskVectorNorms([str(p) for p in cfg.experts])

    with pool[0] or contextlib.nullcontext(), CheckpointWriter(cfg.output, copy_from=base.folder, max_shard_bytes=cfg.max_shard_bytes, plan=plan,
                          copy_tokenizer=cfg.copy_tokenizer, config_updates=config_updates,
                          overwrite=cfg.overwrite) as w:
        sink = FolderSink(w, dtype_of, cfg.output)

        def compiled_write(it: StreamItem) -> None:
            _compiled_write(w, it, cfg, compiled_settings, dtype_of(it.name), base, experts, pool, norms)

        objectives = stream_merge(source, sink, units, spec, params, seed=cfg.seed, device=device,
                                  thresholds=thresholds, batched=batched, norms=norms, label=cfg.method,
                                  compiled_write=compiled_write if compiled else None, progress=progress)
        norms.check(strict=cfg.strict, files=[e.path for e in experts])
        if sink.extras:
            sink.extras.save(w, cfg.method, params_asked)
        report = MergeReport(cfg.output, cfg.method, params_asked, merged_names,
                             [n for n in names if n not in merged_set], 0.0, str(device), thresholds, objectives,
                             "compiled" if compiled else "torch")
        w.save_json("workbench_merge.json", {
            "config": cfg.model_dump(mode="json"), "params_used": params_asked, "device": str(device),
            "n_merged": len(merged_names), "n_kept": len(names) - len(merged_names), "kept": report.kept,
            "global_trim_thresholds": thresholds, **_objective_summary(objectives), "path": report.path,
            "workbench_version": _version()})
    report.seconds = time.perf_counter() - t0
    base.close()
    for e in experts:
        e.close()
    return report


# ---------------------------------------------------------------------------------------- compiled CPU path
# The fused CPU kernels of workbench.merging.kernels: the same values as the torch methods (tested bit
# for bit), one pass per row chunk over the memory-mapped inputs. Everything here is dispatch.
def compiled_merge_available(method: str, params: dict, device: torch.device, expert_paths: Sequence[Path],
                             methods: Mapping[str, Any] | None = None) -> bool:
    """Whether the merge runs on the compiled CPU path (:func:`workbench.merging.kernels.compiled_merge_available`;
    never with a test registry of other methods)."""
    if methods is not None:
        return False
    from .merging.kernels import compiled_merge_available as available

    return available(method, params, device, len(expert_paths), not any(is_lora_adapter(p) for p in expert_paths))


def _compiled_pool():
    """``(threads, workers)``: a thread pool over column ranges, one worker per torch thread and one
    more that writes the previous output chunk meanwhile (``(None, 1)`` with one thread); the caller
    shuts it down (``with``)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = torch.get_num_threads()
    return (ThreadPoolExecutor(workers + 1, thread_name_prefix="workbench-merge"), workers) if workers > 1 \
        else (None, 1)


def _compiled_settings(method: str, params: dict, n: int, thresholds):
    from .merging.kernels import merge_settings

    return merge_settings(method, params, n, thresholds)


def _raise_nonfinite(name: str, base: CheckpointReader, experts: Sequence[Any], output: Path, method: str,
                     dtype: torch.dtype):
    """The compiled kernel met a non-finite value: name the input that holds it, else the result
    (non-finite in float32, or past the range of the output ``dtype``)."""
    read_item(name, True, base, experts, check=True)
    if dtype == torch.float32:
        what = "non-finite values"
    else:  # the float32 result was finite: the kernel counts the cast's overflow (float16 / bfloat16)
        what = f"non-finite values or values outside the {str(dtype).replace('torch.', '')} range (Inf after the cast)"
    raise CheckpointError(f"method {method!r} gives {what}; nothing written", file=output, tensor=name)


def _compiled_global_trim(names: list[str], base: CheckpointReader, experts: Sequence[Any], density: float,
                          pool, progress: bool) -> list[float]:
    from .merging.thresholds import global_trim_thresholds as compiled_thresholds

    out = compiled_thresholds(lambda: ((base.get(n), [e.read(n) for e in experts]) for n in names), len(experts),
                              density, pool=pool[0], workers=pool[1], progress=progress)
    if out is None:
        for n in names:
            read_item(n, True, base, experts, check=True)
        raise CheckpointError("non-finite task vector in the global trim", file=base.path)
    return out


def _compiled_write(w: CheckpointWriter, it: StreamItem, cfg: MergeConfig, settings, dtype: torch.dtype,
                    base: CheckpointReader, experts: Sequence[Any], pool, norms: TaskVectorNorms | None = None
                    ) -> None:
    from .merging.kernels import merge_tensor, task_vector_sq

    if norms is not None and it.base.dim() >= 2:  # the foreign-expert tally, as _compute's (strided rows)
        base_sq, tau_sq = task_vector_sq(it.base, it.experts, ROW_STRIDE, pool=pool[0])
        for i, t in enumerate(tau_sq):
            norms.add(it.name, it.base.dim(), i, t, base_sq)

    def parts(write) -> None:
        if not merge_tensor(settings, it.base, it.experts, dtype, tensor_seed(cfg.seed, it.name), write,
                            pool=pool[0], workers=pool[1]):
            _raise_nonfinite(it.name, base, experts, cfg.output, cfg.method, dtype)

    w.add_parts(it.name, parts)


def _version() -> str:
    """The installed package's version (from its metadata: ``pyproject.toml``)."""
    from importlib.metadata import version

    return version("mllm-workbench")


def _objective_summary(objectives: Mapping[str, dict]) -> dict:
    """The report's ``objectives`` (per tensor) and their totals (absent for methods without them)."""
    if not objectives:
        return {}
    facts = list(objectives.values())
    return {"objective_summary": {
        "n_tensors": len(facts), "n_converged": sum(bool(f["converged"]) for f in facts),
        "objective_start_total": sum(f["objective_start"] for f in facts),
        "objective_end_total": sum(f["objective_end"] for f in facts)},
        "objectives": dict(objectives)}


def _compute(spec, items: list[StreamItem], device: torch.device, seed: int, params: dict,
             thresholds: list[float] | None, batched: bool,
             norms: TaskVectorNorms | None = None) -> list[tuple[torch.Tensor, dict, dict]]:
    """Run the method on a unit of merged tensors; returns ``(merged float32, extras, report facts)``
    per item (facts: what a method with ``spec.reports`` appends to its ``report`` list, e.g.
    WUDI's objective start / end; ``{}`` otherwise). ``norms`` observes each expert's task vector
    (:meth:`TaskVectorNorms.observe`: the foreign-expert check)."""
    reports = bool(getattr(spec, "reports", False))
    bases, expert_lists = [], []
    for it in items:
        b = it.base.to(device=device, dtype=torch.float32, non_blocking=True)
        ex = [to_device(x, b, device) for x in it.experts]
        if norms is not None:
            norms.observe(it.name, b, ex)
        if thresholds is not None:  # global trim: zero the task-vector entries below each expert's threshold
            ex = [_trim_expert(e, b, t) for e, t in zip(ex, thresholds)]
        bases.append(b)
        expert_lists.append(ex)
    if batched and len(items) > 1:
        names = [it.name for it in items]
        gens = [tensor_generator(seed, n, device) for n in names]
        base_stack = torch.stack(bases)
        expert_stacks = [torch.stack([ex[i] for ex in expert_lists]) for i in range(len(expert_lists[0]))]
        del bases, expert_lists
        facts: list[dict] = []
        out = spec.batched_fn(base_stack, expert_stacks, names=names, generators=gens, **params,
                              **({"report": facts} if reports else {}))
        if hasattr(out, "merged") and hasattr(out, "extras"):
            out = out.merged
        return [(out[i], {}, facts[i] if facts else {}) for i in range(len(items))]
    results = []
    for it, b, ex in zip(items, bases, expert_lists):
        facts = [] if reports else None
        merged, extras = call_method(spec.fn, b, ex, it.name, seed, params, device=device, report=facts)
        results.append((merged, extras, facts[0] if facts else {}))
    return results


def _trim_expert(e: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``b + where(|e - b| >= t, e - b, 0)`` with one temporary (the same values, +0 where dropped)."""
    d = torch.sub(e, b)
    if float(t) > 0:
        # kept entries are non-zero (|d| >= t > 0); dropped ones become +-0, and "+ 0.0" makes them +0
        d.mul_(d.abs() >= t).add_(0.0)
    return d.add_(b)
