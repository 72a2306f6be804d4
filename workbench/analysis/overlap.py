"""Overlap of per-expert binary masks: MMER masks, TIES / DARE keep-masks, TALL-style masks.

Everything streams one tensor at a time: a *mask source* yields ``(tensor_name, masks, support)``
with ``masks`` a ``[N, n]`` bool tensor (one flattened mask per expert, in expert order) and
``support`` a ``[n]`` bool tensor or ``None``. The support is the set of entries the masks
select *from* - for MMER the non-zero entries of the merged vector tau* (a mask bit where
tau* = 0 changes nothing), for TALL the non-zero entries of the multi-task vector, for TIES the
non-zero entries of the merged vector; ``None`` means every entry. All overlap statistics are
taken inside the support; ``density`` is also reported over all entries.

Per tensor :class:`MaskOverlap` holds tidy frames with counts, so every group statistic is exact
(sums of counts, then the ratio):

- ``density``: rows (tensor, expert): ``kept_all`` (mask bits set anywhere), ``kept`` (inside the
  support), ``n_support``; metrics ``density = kept_all / numel``, ``density_support = kept / n_support``.
- ``pairs``: rows (tensor, expert_a, expert_b): ``inter``, ``union``, ``size_a``, ``size_b``;
  ``iou = inter / union`` (Jaccard index), ``overlap_min = inter / min(size_a, size_b)`` per tensor.
- ``coverage``: rows (tensor): ``n_support`` and ``used_by_<k>`` for k = 0..N (entries of the support
  set by exactly k experts); ``share_none``, ``share_one``, ``share_all``.
- ``patterns``: rows (tensor, pattern, count): counts of each exact membership pattern inside the
  support; ``pattern`` is a string of 0/1 in expert order (``"1010"``: experts 1 and 3 only).
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import CheckpointError, ConfigError
from .interference import iter_task_vectors, parse_name
from .store import save_frames, save_json

__all__ = [
    "MASK_METHODS",
    "MaskOverlap",
    "OVERLAP_METRICS",
    "analyze_masks",
    "compute_masks",
    "coverage_counts",
    "expert_count_sweep",
    "lambda_sweep",
    "load_mmer_masks",
    "method_masks",
    "pairwise_iou",
    "pattern_counts",
    "sweep_table",
]

MaskSource = Iterable[tuple[str, torch.Tensor, "torch.Tensor | None"]]
MASK_METHODS = ("mmer", "tall", "ties", "dare")


# ----------------------------------------------------------------------------------- pure statistics
def _as_bool_matrix(masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(masks, torch.Tensor):
        m = masks
    else:
        m = torch.stack([torch.as_tensor(x).reshape(-1) for x in masks])
    if m.dim() == 1:
        m = m[None]
    if m.dim() > 2:
        m = m.reshape(m.shape[0], -1)
    return m.bool()


def _restrict(masks: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    return masks if support is None else masks & support.reshape(1, -1).bool()


def pairwise_iou(masks: torch.Tensor, support: torch.Tensor | None = None, *, chunk_size: int = 1 << 22) -> dict[str, np.ndarray]:
    """Intersection and union counts of every pair of masks (inside ``support``).

    Returns ``{"inter": [N, N], "sizes": [N]}`` as int64 arrays; the union of ``i, j`` is
    ``sizes[i] + sizes[j] - inter[i, j]``. Counted with float32 matmuls on chunks of at most
    ``2**24`` entries (exact integers), summed in float64.
    """
    m = _restrict(_as_bool_matrix(masks), support)
    N, n = m.shape
    inter = torch.zeros(N, N, dtype=torch.float64, device=m.device)
    chunk_size = int(min(chunk_size, 1 << 24))
    for s in range(0, n, chunk_size):
        f = m[:, s:s + chunk_size].to(torch.float32)
        inter += (f @ f.T).double()
    inter_np = np.rint(inter.cpu().numpy()).astype(np.int64)
    return {"inter": inter_np, "sizes": np.diag(inter_np).copy()}


def pattern_counts(masks: torch.Tensor, support: torch.Tensor | None = None) -> np.ndarray:
    """Counts of each exact membership pattern: ``out[code]`` with ``code = sum_i mask_i << i``.

    Only entries inside ``support`` are counted (every entry when ``None``). Length ``2**N``.
    """
    m = _as_bool_matrix(masks)
    N = m.shape[0]
    if N > 20:
        raise ConfigError(f"membership patterns of {N} experts (2**{N} patterns) are too many; at most 20")
    weights = (2 ** torch.arange(N, device=m.device, dtype=torch.int64))[:, None]
    codes = (m.to(torch.int64) * weights).sum(0)
    if support is not None:
        codes = codes[support.reshape(-1).bool()]
    return torch.bincount(codes, minlength=2**N).cpu().numpy().astype(np.int64)


def coverage_counts(masks: torch.Tensor, support: torch.Tensor | None = None) -> np.ndarray:
    """``out[k]`` = entries of the support set by exactly ``k`` experts, ``k = 0..N``."""
    m = _restrict(_as_bool_matrix(masks), support)
    N = m.shape[0]
    k = m.sum(0)
    if support is not None:
        k = k[support.reshape(-1).bool()]
    return torch.bincount(k, minlength=N + 1).cpu().numpy().astype(np.int64)


def pattern_label(code: int, n: int) -> str:
    """The 0/1 string of a pattern code in expert order (``code`` bit i = expert i)."""
    return "".join("1" if (code >> i) & 1 else "0" for i in range(n))


# ----------------------------------------------------------------------------------- metrics
def _ratio(num: str, den: str) -> Callable[[pd.DataFrame], pd.Series]:
    def f(d: pd.DataFrame) -> pd.Series:
        den_v = d[den].astype(float)
        return d[num].astype(float) / den_v.where(den_v != 0)
    return f


def _overlap_min(d: pd.DataFrame) -> pd.Series:
    den = np.minimum(d["size_a"].astype(float), d["size_b"].astype(float))
    return d["inter"].astype(float) / den.where(den != 0)


@dataclass(frozen=True)
class OverlapMetric:
    """A mask-overlap metric: its frame, the summed columns, and how to form it from sums."""

    frame: str
    columns: tuple[str, ...]
    fn: Callable[[pd.DataFrame], pd.Series]
    doc: str


OVERLAP_METRICS: dict[str, OverlapMetric] = {
    "density": OverlapMetric("density", ("kept_all", "numel"), _ratio("kept_all", "numel"),
                             "share of all entries the expert's mask sets"),
    "density_support": OverlapMetric("density", ("kept", "n_support"), _ratio("kept", "n_support"),
                                     "share of the support (e.g. tau* != 0) the expert's mask keeps"),
    "iou": OverlapMetric("pairs", ("inter", "union"), _ratio("inter", "union"), "intersection over union (Jaccard)"),
    "overlap_min": OverlapMetric("pairs", ("inter", "size_a", "size_b"), _overlap_min,
                                 "intersection / the smaller mask (1: one mask inside the other)"),
    "share_none": OverlapMetric("coverage", ("used_by_0", "n_support"), _ratio("used_by_0", "n_support"),
                                "share of the support used by no expert"),
    "share_one": OverlapMetric("coverage", ("used_by_1", "n_support"), _ratio("used_by_1", "n_support"),
                               "share of the support used by exactly one expert"),
    "share_all": OverlapMetric("coverage", ("used_by_all", "n_support"), _ratio("used_by_all", "n_support"),
                               "share of the support used by every expert"),
}
_ENTITY = {"density": ["expert"], "pairs": ["expert_a", "expert_b"], "coverage": [], "patterns": ["pattern"]}


def _summarize(df: pd.DataFrame, metric: str, by: Sequence[str], exact: bool) -> pd.DataFrame:
    spec = OVERLAP_METRICS[metric]
    keys = [*by, *[c for c in _ENTITY[spec.frame] if c not in by]]
    if not len(df):
        return pd.DataFrame(columns=[*keys, metric, "n_tensors"])
    if exact:
        if keys:
            g = df.groupby(keys, dropna=False, sort=True)
            sums = g[list(dict.fromkeys(spec.columns))].sum().reset_index()
            sums["n_tensors"] = g.size().values
        else:
            sums = df[list(spec.columns)].sum().to_frame().T
            sums["n_tensors"] = len(df)
        sums[metric] = spec.fn(sums).astype(float)
        return sums[[*keys, metric, "n_tensors"]]
    vals = df[keys].copy()
    vals[metric] = spec.fn(df).astype(float)
    if not keys:
        return pd.DataFrame({metric: [vals[metric].mean()], "n_tensors": [len(vals)]})
    g = vals.groupby(keys, dropna=False, sort=True)
    out = g[metric].mean().reset_index()
    out["n_tensors"] = g.size().values
    return out


@dataclass
class MaskOverlap:
    """Tidy overlap statistics of one mask set (see the module docstring for the frames)."""

    experts: list[str]
    density: pd.DataFrame
    pairs: pd.DataFrame
    coverage: pd.DataFrame
    patterns: pd.DataFrame
    meta: dict = field(default_factory=dict)

    FRAMES = ("density", "pairs", "coverage", "patterns")

    def summary(self, metric: str, by: Sequence[str] = ("layer", "module"), *, exact: bool = True) -> pd.DataFrame:
        """``metric`` per group ``by`` (and per expert / pair). ``exact``: ratio of summed counts."""
        if metric not in OVERLAP_METRICS:
            raise ConfigError(f"unknown overlap metric {metric!r}; known: {sorted(OVERLAP_METRICS)}")
        return _summarize(getattr(self, OVERLAP_METRICS[metric].frame), metric, tuple(by), exact)

    def pattern_table(self, *, layer: int | None = None, module: str | None = None, drop_empty: bool = True) -> pd.DataFrame:
        """Counts of each exact membership pattern summed over tensors (optionally one layer / module).

        Columns: one bool column per expert, ``pattern``, ``degree`` (experts in the pattern),
        ``count``, ``share`` (of the counted entries); sorted by count, largest first.
        """
        df = self.patterns
        if layer is not None:
            df = df[df["layer"] == layer]
        if module is not None:
            df = df[df["module"] == module]
        n = len(self.experts)
        counts = df.groupby("pattern")["count"].sum() if len(df) else pd.Series(dtype="int64")
        rows = []
        for code in range(2**n):
            lab = pattern_label(code, n)
            c = int(counts.get(lab, 0))
            if drop_empty and c == 0:
                continue
            rows.append({**{e: lab[i] == "1" for i, e in enumerate(self.experts)}, "pattern": lab,
                         "degree": lab.count("1"), "count": c})
        out = pd.DataFrame(rows, columns=[*self.experts, "pattern", "degree", "count"])
        total = out["count"].sum()
        out["share"] = out["count"] / total if total else np.nan
        return out.sort_values(["count", "pattern"], ascending=[False, True], kind="stable").reset_index(drop=True)

    def pair_matrix(self, metric: str = "iou", *, layer: int | None = None, module: str | None = None) -> pd.DataFrame:
        """Symmetric ``N x N`` matrix of a pair metric over all tensors (or one layer / module); diagonal 1."""
        df = self.pairs
        if layer is not None:
            df = df[df["layer"] == layer]
        if module is not None:
            df = df[df["module"] == module]
        s = _summarize(df, metric, (), True)
        mat = pd.DataFrame(np.eye(len(self.experts)), index=self.experts, columns=self.experts)
        for _, r in s.iterrows():
            mat.loc[r["expert_a"], r["expert_b"]] = r[metric]
            mat.loc[r["expert_b"], r["expert_a"]] = r[metric]
        return mat

    def totals(self) -> dict[str, float]:
        """Whole-model scalars: mean density, mean pairwise IoU (each pair exact over all tensors), shares."""
        out: dict[str, float] = {}
        if len(self.density):
            out["density"] = float(self.summary("density", ()).loc[:, "density"].mean())
            out["density_support"] = float(self.summary("density_support", ()).loc[:, "density_support"].mean())
        if len(self.pairs):
            out["iou"] = float(self.summary("iou", ())["iou"].mean())
        if len(self.coverage):
            for m in ("share_none", "share_one", "share_all"):
                out[m] = float(self.summary(m, ())[m].iloc[0])
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write the four frames as CSV and Parquet plus ``meta.json``."""
        out = save_frames(out_dir, {name: getattr(self, name) for name in self.FRAMES})
        save_json(out / "meta.json", {**self.meta, "experts": self.experts})
        return out


class _Accumulator:
    """Collects the per-tensor rows of one mask set."""

    def __init__(self, experts: Sequence[str], meta: dict | None = None):
        self.experts = list(experts)
        self.meta = dict(meta or {})
        self.rows: dict[str, list[dict]] = {k: [] for k in MaskOverlap.FRAMES}

    def add(self, name: str, masks: torch.Tensor, support: torch.Tensor | None) -> None:
        m = _as_bool_matrix(masks)
        N, n = m.shape
        if N != len(self.experts):
            raise CheckpointError(f"{N} masks for {len(self.experts)} experts", tensor=name)
        if support is not None and support.numel() != n:
            raise CheckpointError(f"support has {support.numel()} entries, masks {n}", tensor=name)
        layer, module = parse_name(name)
        key = {"tensor": name, "layer": layer, "module": module, "numel": n}
        n_support = int(support.sum()) if support is not None else n
        kept_all = m.sum(1).cpu().numpy()
        pi = pairwise_iou(m, support)
        for i, e in enumerate(self.experts):
            self.rows["density"].append({**key, "expert": e, "kept_all": int(kept_all[i]), "kept": int(pi["sizes"][i]),
                                         "n_support": n_support})
        for i, j in itertools.combinations(range(N), 2):
            inter = int(pi["inter"][i, j])
            a, b = int(pi["sizes"][i]), int(pi["sizes"][j])
            self.rows["pairs"].append({**key, "expert_a": self.experts[i], "expert_b": self.experts[j],
                                       "inter": inter, "union": a + b - inter, "size_a": a, "size_b": b})
        cov = coverage_counts(m, support)
        crow = {**key, "n_support": n_support, **{f"used_by_{k}": int(cov[k]) for k in range(N + 1)}}
        crow["used_by_all"] = int(cov[N])
        self.rows["coverage"].append(crow)
        pc = pattern_counts(m, support)
        for code in np.nonzero(pc)[0]:
            self.rows["patterns"].append({**key, "pattern": pattern_label(int(code), N), "count": int(pc[code])})

    def result(self) -> MaskOverlap:
        frames = {}
        for k, rows in self.rows.items():
            df = pd.DataFrame(rows)
            if len(df):
                df["layer"] = df["layer"].astype("Int64")
                for m, spec in OVERLAP_METRICS.items():
                    if spec.frame == k:
                        df[m] = spec.fn(df).astype(float)
            else:
                df = pd.DataFrame(columns=["tensor", "layer", "module", "numel", *_ENTITY[k]])
            frames[k] = df
        return MaskOverlap(self.experts, meta=self.meta, **frames)


def analyze_masks(source: MaskSource | Mapping[str, Any], experts: Sequence[str], *, meta: dict | None = None) -> MaskOverlap:
    """Overlap statistics of a mask set.

    Args:
        source: an iterable of ``(tensor_name, masks [N, ...] bool, support [...] bool | None)``
            (e.g. :func:`load_mmer_masks`, :func:`method_masks`), or a dict
            ``{tensor_name: masks}`` / ``{tensor_name: (masks, support)}`` for small in-memory sets.
        experts: the expert names, in mask order.
    """
    acc = _Accumulator(experts, meta)
    items: Iterable = source.items() if isinstance(source, Mapping) else source
    for item in items:
        if isinstance(source, Mapping):
            name, v = item
            masks, support = (v if isinstance(v, tuple) else (v, None))
        else:
            name, masks, support = item
        acc.add(name, masks, support)
    return acc.result()


# ----------------------------------------------------------------------------------- mask computations
def compute_masks(
    taus: torch.Tensor,
    method: str,
    *,
    lam: float = 1.0,
    density: float = 0.2,
    dare_p: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-expert masks ``[N, n]`` of one tensor and their support ``[n]`` (built by :mod:`workbench.merging.masks`).

    - ``"mmer"``: ``tau* =`` TIES merge (:func:`workbench.merging.ties_merge_tau`, keep ``density``);
      ``m_i = |tau_i| > lam * |tau_i - tau*|`` (:func:`workbench.merging.mmer_masks`; the Manhattan-distance
      minimiser when ``lam = 1``); support ``tau* != 0``.
    - ``"tall"``: ``tau_MT = sum_i tau_i``; ``m_i = |tau_i| >= lam * |tau_MT - tau_i|`` and ``tau_i != 0``
      (:func:`workbench.merging.tall_masks` with ``nonzero_only``); support ``tau_MT != 0``.
    - ``"ties"``: TIES keep-masks (top-k and agreeing with the elected sign,
      :func:`workbench.merging.ties_keep_masks`); support: entries some expert keeps (``tau_m != 0``).
    - ``"dare"``: DARE keep-masks (:func:`workbench.merging.dare_keep_mask`, kept with probability
      ``1 - dare_p``); support: every entry.

    Args:
        taus: ``[N, n]`` float32 task vectors.
    """
    from ..merging import masks as M
    from ..merging import ties_merge_tau

    if method == "mmer":
        tau_star = ties_merge_tau(taus, density)
        return torch.stack(M.mmer_masks(taus, tau_star, lam)), tau_star != 0
    if method == "tall":
        mt = taus.sum(0)
        return torch.stack(M.tall_masks(taus, mt, lam, nonzero_only=True)), mt != 0
    if method == "ties":
        keep = torch.stack(M.ties_keep_masks(taus, density))
        return keep, keep.any(0)
    if method == "dare":
        if not 0.0 <= dare_p < 1.0:
            raise ConfigError(f"dare_p must be in [0, 1), got {dare_p}")
        return M.dare_keep_mask(taus.shape, dare_p, generator, device=taus.device), None
    raise ConfigError(f"unknown mask method {method!r}; known: {MASK_METHODS}")


def _config_key(c: Mapping[str, Any]) -> tuple:
    return (c.get("method", "mmer"), float(c.get("lam", 1.0)), tuple(c.get("subset", ())))


def sweep_masks(
    base: str | Path,
    experts: Mapping[str, str | Path],
    configs: Sequence[Mapping[str, Any]],
    device: str | torch.device = "auto",
    *,
    density: float = 0.2,
    dare_p: float = 0.2,
    seed: int = 0,
    names: Any = None,
    damc_set: str = "text",
    progress: bool = True,
) -> dict[tuple, MaskOverlap]:
    """One streaming pass over the task vectors, many mask sets.

    Each config is ``{"method": ..., "lam": ..., "subset": (expert names...)}`` (``subset``
    default: all experts; tau* / tau_MT are computed over the subset only). Returns
    ``{(method, lam, subset): MaskOverlap}``.
    """
    enames = list(experts)
    cfgs = []
    for c in configs:
        method = c.get("method", "mmer")
        if method not in MASK_METHODS:
            raise ConfigError(f"unknown mask method {method!r}; known: {MASK_METHODS}")
        subset = tuple(c.get("subset") or enames)
        unknown = [s for s in subset if s not in enames]
        if unknown:
            raise ConfigError(f"subset names unknown experts {unknown}; experts are {enames}")
        if len(subset) < 2:
            raise ConfigError(f"a mask set needs at least two experts, got subset {subset}")
        cfgs.append({"method": method, "lam": float(c.get("lam", 1.0)), "subset": subset})
    accs = {_config_key(c): _Accumulator(list(c["subset"]), {**c, "density": density, "dare_p": dare_p, "seed": seed})
            for c in cfgs}
    for batch in iter_task_vectors(base, experts, device, names=names, damc_set=damc_set,
                                   progress=progress, desc="masks"):
        for c in cfgs:
            idx = [enames.index(s) for s in c["subset"]]
            taus = batch.taus[idx]
            gen = None
            if c["method"] == "dare":
                gen = torch.Generator(device=taus.device)
                gen.manual_seed((seed * 1_000_003 + zlib.crc32(batch.name.encode())) % (2**63 - 1))
            masks, support = compute_masks(taus, c["method"], lam=c["lam"], density=density, dare_p=dare_p,
                                           generator=gen)
            accs[_config_key(c)].add(batch.name, masks, support)
    return {k: a.result() for k, a in accs.items()}


def method_masks(
    base: str | Path,
    experts: Mapping[str, str | Path],
    method: str = "mmer",
    device: str | torch.device = "auto",
    *,
    lam: float = 1.0,
    **kw: Any,
) -> MaskOverlap:
    """Overlap of one method's masks over all experts (see :func:`compute_masks` for the definitions)."""
    res = sweep_masks(base, experts, [{"method": method, "lam": lam}], device, **kw)
    return next(iter(res.values()))


def lambda_sweep(
    base: str | Path,
    experts: Mapping[str, str | Path],
    lams: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    method: str = "mmer",
    device: str | torch.device = "auto",
    **kw: Any,
) -> dict[tuple, MaskOverlap]:
    """Mask overlap as the threshold ``lam`` changes (one streaming pass). Keys ``(method, lam, subset)``."""
    return sweep_masks(base, experts, [{"method": method, "lam": l} for l in lams], device, **kw)


def expert_count_sweep(
    base: str | Path,
    experts: Mapping[str, str | Path],
    sizes: Sequence[int] = (2, 3, 4),
    method: str = "mmer",
    device: str | torch.device = "auto",
    *,
    lam: float = 1.0,
    **kw: Any,
) -> dict[tuple, MaskOverlap]:
    """Mask overlap as the number of merged experts grows: every subset of each size (one pass)."""
    names = list(experts)
    bad = [k for k in sizes if not 2 <= k <= len(names)]
    if bad:
        raise ConfigError(f"subset sizes {bad} not in [2, {len(names)}]")
    cfgs = [{"method": method, "lam": lam, "subset": s} for k in sizes for s in itertools.combinations(names, k)]
    return sweep_masks(base, experts, cfgs, device, **kw)


def sweep_table(results: Mapping[tuple, MaskOverlap]) -> pd.DataFrame:
    """One row per mask set: method, lam, subset, n_experts and :meth:`MaskOverlap.totals`."""
    rows = []
    for (method, lam, subset), r in results.items():
        rows.append({"method": method, "lam": lam, "subset": "+".join(subset), "n_experts": len(subset), **r.totals()})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- MMER masks on disk
def _unpack(packed: torch.Tensor, shape: Sequence[int], *, file: Path, tensor: str) -> torch.Tensor:
    from ..io.packing import unpack_mask

    try:
        return unpack_mask(packed, tuple(shape))
    except ValueError as e:
        raise CheckpointError(f"bad packed mask: {e}", file=file, tensor=tensor) from e


def load_mmer_masks(merged_dir: str | Path, experts: Sequence[str] | None = None, *,
                    base: str | Path | None = None, with_support: bool = True) -> tuple[list[str], Iterator]:
    """Stream the MMER masks an engine run wrote to ``<merged>/mmer/``.

    Reads ``masks.safetensors`` with keys ``<tensor>::mask_<i>`` (bit-packed uint8, MSB first;
    each key's shape in the file's metadata as the engine writes it, else in
    ``mmer.json["shapes"]``, else the merged checkpoint's header). Expert names: ``experts`` if
    given, else ``mmer.json["experts"]`` when present, else ``expert_0..``. The support is
    ``tau* != 0`` when a ``<tensor>::tau_star`` entry or ``mmer/tau_star.safetensors`` exists;
    else, when ``base`` (the base model the merge started from) is given, ``merged != base``
    (``tau* != 0`` read back from the merged weights; in a low-precision output a tiny ``tau*``
    entry that rounds away counts as 0); otherwise ``None`` (every entry).

    Returns ``(experts, source)`` for :func:`analyze_masks`.
    """
    from ..io.mmer_store import MMER_DIR, MMERStore

    merged = Path(merged_dir)
    store = MMERStore(merged / MMER_DIR)
    meta, mask_path, keys = store.info, store.masks_file, store.keys
    groups = store.mask_groups()
    n = max((len(v) for v in groups.values()), default=0)
    names = list(experts or meta.get("experts") or meta.get("modalities") or [f"expert_{i}" for i in range(n)])
    if n and len(names) != n:
        raise CheckpointError(f"{n} masks per tensor but {len(names)} expert names {names}", file=mask_path)
    shapes = meta.get("shapes") or {}
    reader: list = []

    def shape_of(t: str, key: str) -> tuple[int, ...]:
        entry = store.entry(key)
        if entry is not None:
            try:
                return tuple(entry["shape"])
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"bad mask metadata: {e}", file=mask_path, tensor=key) from e
        if t in shapes:
            return tuple(shapes[t])
        if not reader:
            from ..io import CheckpointReader

            reader.append(CheckpointReader(merged))
        return tuple(reader[0].info(t).shape)

    tau_path = store.tau_star_file
    base_reader: list = []
    merged_reader: list = []
    if base is not None and with_support:
        from ..io import CheckpointReader
        from .interference import _open_base

        base_reader.append(_open_base(base))
        merged_reader.append(CheckpointReader(merged))

    def source():
        from safetensors import safe_open

        with store.open() as f:
            tf = safe_open(str(tau_path), framework="pt") if (with_support and tau_path is not None) else None
            tkeys = set(tf.keys()) if tf is not None else set()
            for t in sorted(groups):
                idx = groups[t]
                if sorted(idx) != list(range(len(names))):
                    raise CheckpointError(f"mask indices {sorted(idx)} do not match {len(names)} experts",
                                          file=mask_path, tensor=t)
                masks = torch.stack([_unpack(f.get_tensor(idx[i]), shape_of(t, idx[i]), file=mask_path,
                                             tensor=idx[i]).reshape(-1) for i in range(len(names))])
                support = None
                if with_support and f"{t}::tau_star" in keys:
                    support = f.get_tensor(f"{t}::tau_star").reshape(-1) != 0
                elif t in tkeys:
                    support = tf.get_tensor(t).reshape(-1) != 0
                elif with_support and base_reader:
                    support = (merged_reader[0].get(t).reshape(-1) != base_reader[0].get(t).reshape(-1))
                yield t, masks, support

    return names, source()
