"""Synthetic sharded Llama-shaped safetensors checkpoints for the benchmarks.

A base model and ``n`` experts (``expert = base + noise``: a dense Gaussian task vector), written
as Hugging Face folders (``config.json`` of a ``LlamaForCausalLM``, ``model-0000i-of-0000n.safetensors``
shards and ``model.safetensors.index.json``), so that both ``workbench`` and mergekit read them.
Values are drawn per tensor from a generator seeded by ``(seed, model, tensor name)``, so the
files do not depend on the shard size or on the order of writing; ``device="cuda"`` draws on the
GPU (fast for 7B shapes; a CUDA generator draws different numbers than a CPU one).

    from synthetic import LlamaShape, write_checkpoints
    shape = LlamaShape.for_params(parse_count("272M"))      # hidden 1024, FFN 2816, 16 layers
    folders = write_checkpoints(tmp, shape, n_experts=3, dtype="bf16", shard_bytes=200_000_000)

``python benchmarks/synthetic.py OUT --params 272M --experts 3`` writes them from the shell.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "f16": "float16", "fp32": "float32", "float32": "float32", "f32": "float32"}

#: scale of the base weights and of the experts' task vectors (dense Gaussian noise).
BASE_STD, TAU_STD = 0.02, 0.002


def parse_count(s: str | int) -> int:
    """``"272M"`` -> 272_000_000, ``"7B"`` -> 7_000_000_000, ``"1.5e8"`` -> 150_000_000."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?)\s*", str(s))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a count from {s!r}")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def parse_bytes(s: str | int) -> int:
    """``"200MB"`` -> 200_000_000, ``"2GiB"`` -> 2 * 2**30, ``"5e8"`` -> 500_000_000."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(s))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a size in bytes from {s!r}")
    base = 1024 if m.group(3) else 1000
    exp = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * base**exp)


def torch_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPE_NAMES[name.lower()])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; one of {sorted(DTYPE_NAMES)}") from None


@dataclass(frozen=True)
class LlamaShape:
    """The tensor shapes of a Llama decoder (untied ``lm_head``, no biases)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int = 32000
    head_dim: int = 64

    @classmethod
    def for_params(cls, params: int, vocab: int = 32000, *, tiny: bool = True) -> "LlamaShape":
        """A Llama with about ``params`` parameters: the width is chosen by size class, then the
        number of layers that fits; tensor shapes stay the same across a size class, so two sizes
        of one class differ only in depth. Below 50M parameters the class is a tiny one (hidden 64,
        vocab at most 512); ``tiny=False`` keeps the 512-wide class there instead (at least one
        layer, so about 36M parameters or more: ``benchmarks/profile_speed.py``'s classes)."""
        if params >= 5_000_000_000:
            h, inter = 4096, 11008
        elif params >= 1_000_000_000:
            h, inter = 2048, 5632
        elif params >= 200_000_000:
            h, inter = 1024, 2816
        elif params >= 50_000_000 or not tiny:
            h, inter = 512, 1408
        else:  # tiny (smoke tests)
            h, inter, vocab = 64, 176, min(vocab, 512)
        per_layer = 4 * h * h + 3 * h * inter + 2 * h
        layers = max(1, round((params - 2 * vocab * h - h) / per_layer))
        return cls(h, inter, layers, vocab)

    @classmethod
    def llama_7b(cls, layers: int = 32, hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000) -> "LlamaShape":
        """Llama-2-7B's shapes (hidden 4096, 32 layers, FFN 11008, vocab 32000)."""
        return cls(hidden, intermediate, layers, vocab, head_dim=128 if hidden % 128 == 0 else 64)

    def deeper(self, params: int) -> "LlamaShape":
        """The same tensor shapes with the number of layers that gives about ``params`` parameters."""
        h, f = self.hidden, self.intermediate
        per_layer = 4 * h * h + 3 * h * f + 2 * h
        layers = max(1, round((params - 2 * self.vocab * h - h) / per_layer))
        return LlamaShape(h, f, layers, self.vocab, self.head_dim)

    def plan(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in Hugging Face ``LlamaForCausalLM`` naming."""
        h, f = self.hidden, self.intermediate
        plan: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            for m in ("q", "k", "v", "o"):
                plan[f"{p}.self_attn.{m}_proj.weight"] = (h, h)
            plan[f"{p}.mlp.gate_proj.weight"] = (f, h)
            plan[f"{p}.mlp.up_proj.weight"] = (f, h)
            plan[f"{p}.mlp.down_proj.weight"] = (h, f)
            plan[f"{p}.input_layernorm.weight"] = (h,)
            plan[f"{p}.post_attention_layernorm.weight"] = (h,)
        plan["model.norm.weight"] = (h,)
        plan["lm_head.weight"] = (self.vocab, h)
        return plan

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.plan().values())

    @property
    def largest_tensor(self) -> int:
        return max(math.prod(s) for s in self.plan().values())

    def hf_config(self, dtype_name: str = "bfloat16") -> dict:
        """A ``config.json`` that transformers (and mergekit) read as a ``LlamaForCausalLM``."""
        heads = max(1, self.hidden // self.head_dim)
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": self.vocab,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                "tie_word_embeddings": False, "torch_dtype": dtype_name, "bos_token_id": 1, "eos_token_id": 2,
                "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False}

    def describe(self) -> str:
        return (f"{self.n_params / 1e6:.1f}M params (hidden {self.hidden}, FFN {self.intermediate}, "
                f"{self.layers} layers, vocab {self.vocab})")


def shard_groups(plan: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors packed into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in plan.items():
        b = itemsize * math.prod(shape)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += b
    return shards


def tensor_seed(seed: int, model: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{model}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _draw(shape, seed: int, model: int, name: str, device):
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, model, name))
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32)


def write_checkpoints(out: str | Path, shape: LlamaShape, n_experts: int = 3, *, dtype: str = "bf16",
                      shard_bytes: int = 200_000_000, seed: int = 0, device: str = "cpu",
                      tau_std: float = TAU_STD, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``out/base`` and ``out/expert{i}`` (i < ``n_experts``); return the folders, base first.

    ``expert_i = base + tau_std * N(0, 1)`` (a dense task vector), rounded to ``dtype``. Memory: one
    shard of the base and one of an expert at a time. A folder whose ``synthetic.json`` matches the
    request is reused (not rewritten).
    """
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    td = torch_dtype(dtype)
    dname = str(td).replace("torch.", "")
    plan = shape.plan()
    itemsize = torch.empty((), dtype=td).element_size()
    groups = shard_groups(plan, itemsize, shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    folders = [out / "base"] + [out / f"expert{i}" for i in range(n_experts)]
    stamp = {"shape": asdict(shape), "dtype": dname, "shard_bytes": shard_bytes, "seed": seed, "tau_std": tau_std,
             "device_type": torch.device(device).type}
    todo = []
    for mi, f in enumerate(folders):
        done = f / "synthetic.json"
        if done.exists() and json.loads(done.read_text()) == {**stamp, "model": mi}:
            continue
        f.mkdir(parents=True, exist_ok=True)
        todo.append(mi)
    if not todo:
        return folders
    t0 = time.perf_counter()
    dev = torch.device(device)
    for si, names in enumerate(tqdm(groups, desc="writing synthetic shards", unit="shard", disable=not progress)):
        base = {n: BASE_STD * _draw(plan[n], seed, 0, n, dev) for n in names}
        if 0 in todo:
            save_file({n: t.to(td).cpu() for n, t in base.items()}, str(folders[0] / files[si]), metadata={"format": "pt"})
        for mi in todo:
            if mi == 0:
                continue
            exp = {n: (b + tau_std * _draw(plan[n], seed, mi, n, dev)).to(td).cpu() for n, b in base.items()}
            save_file(exp, str(folders[mi] / files[si]), metadata={"format": "pt"})
            del exp
        del base
    total = sum(itemsize * math.prod(plan[n]) for n in plan)
    index = {"metadata": {"total_size": total},
             "weight_map": {n: files[si] for si, names in enumerate(groups) for n in names}}
    for mi in todo:
        f = folders[mi]
        (f / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (f / "config.json").write_text(json.dumps(shape.hf_config(dname), indent=1))
        (f / "synthetic.json").write_text(json.dumps({**stamp, "model": mi}))
    if log:
        log(f"wrote {len(todo)} synthetic checkpoint(s) of {shape.describe()} in {time.perf_counter() - t0:.1f}s")
    return folders


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _files(folders) -> list[Path]:
    return sorted(f for d in folders for f in Path(d).rglob("*") if f.is_file())


def evict_page_cache(folders) -> None:
    """Drop the page cache of every file under ``folders`` (``posix_fadvise(DONTNEED)`` after one
    ``sync``: dirty pages cannot be dropped), so the next read comes from the disk, as it does for
    checkpoints larger than the machine's memory (four 7B experts + base: ~67 GB in bf16). Needs no
    privileges; :func:`resident_fraction` tells whether it worked."""
    import os
    os.sync()  # flushes every file's dirty pages: no per-file fdatasync needed
    for f in _files(folders):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(folders) -> float | None:
    """Fraction of the bytes of the files under ``folders`` that are in the page cache (``mincore``
    on a read-only map of each file; ``None`` where that is unavailable)."""
    import ctypes
    import mmap
    import os
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for f in _files(folders):
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in vec) * page
                total += n * page
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--params", type=parse_count, default=parse_count("272M"))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shard-size", type=parse_bytes, default=parse_bytes("200MB"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    shape = LlamaShape.for_params(args.params)
    folders = write_checkpoints(args.out, shape, args.experts, dtype=args.dtype, shard_bytes=args.shard_size,
                                seed=args.seed, device=args.device, log=print)
    print("\n".join(str(f) for f in folders))
    return folders


if __name__ == "__main__":
    main()
