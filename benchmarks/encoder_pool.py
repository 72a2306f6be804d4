"""The encoders' 2x2 max-pool without max_pool2d where no gradient flows (``encoders.MaxPool2x2``), against
``nn.MaxPool2d(2)``.

A frozen encoder runs in every step of the zoo's expert training and in every first encoding of an evaluation.
This script times, one thread, with no gradient: the pooling alone on each encoder's feature maps, and each
encoder's whole forward on a batch of its inputs with its pools as they are (``MaxPool2x2``) and swapped for
``nn.MaxPool2d(2)`` (the fastest of ``--repeats``), and prints per line both times, their ratio and whether the
outputs are the same bit for bit.

    python benchmarks/encoder_pool.py                 # batch 64, as the zoo trains
    python benchmarks/encoder_pool.py --batch 8 --repeats 2
"""
from __future__ import annotations

import argparse
import time


def _fastest(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _swap_pools(module, to_max_pool2d: bool):
    """Every pool of ``module`` as ``nn.MaxPool2d(2)`` (``to_max_pool2d``) or ``MaxPool2x2``, in place."""
    from torch import nn

    from workbench.world.encoders import MaxPool2x2
    for m in module.modules():
        for name, child in list(m.named_children()):
            if isinstance(child, (MaxPool2x2, nn.MaxPool2d)):
                setattr(m, name, nn.MaxPool2d(2) if to_max_pool2d else MaxPool2x2())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="inputs per forward (the zoo trains on 64)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import torch
    from torch.nn.functional import gelu, max_pool2d

    from workbench.world.encoders import CapabilityEncoder, ImageEncoder, MaxPool2x2, VideoEncoder
    from workbench.world.generators import RAW_SHAPES

    torch.set_num_threads(1)
    torch.manual_seed(0)
    b = args.batch
    pool = MaxPool2x2()
    with torch.no_grad():
        # the feature maps each pool sees: image / capability [B, 32, 32, 32] and [B, 48, 16, 16]; video per frame
        for label, shape in (("pool [B,32,32,32]", (b, 32, 32, 32)), ("pool [B,48,16,16]", (b, 48, 16, 16)),
                             ("pool [8B,32,16,16]", (8 * b, 32, 16, 16))):
            x = gelu(torch.randn(shape))
            new, ref = _fastest(lambda: pool(x), args.repeats), _fastest(lambda: max_pool2d(x, 2), args.repeats)
            same = torch.equal(pool(x), max_pool2d(x, 2))
            print(f"{label}: MaxPool2x2 {new * 1e3:.2f} ms, max_pool2d {ref * 1e3:.2f} ms; ratio {new / ref:.2f}; "
                  f"same output: {same}")
        for enc, raw in ((ImageEncoder(), RAW_SHAPES["image"]), (VideoEncoder(), RAW_SHAPES["video"]),
                         (CapabilityEncoder(), (3, 32, 32))):
            enc.eval().requires_grad_(False)
            x = torch.rand(b, *raw)
            new = _fastest(lambda: enc(x), args.repeats)
            out_new = enc(x)
            _swap_pools(enc, to_max_pool2d=True)
            ref = _fastest(lambda: enc(x), args.repeats)
            same = torch.equal(out_new, enc(x))
            _swap_pools(enc, to_max_pool2d=False)
            print(f"{type(enc).__name__} forward, batch {b}: MaxPool2x2 {new * 1e3:.2f} ms, max_pool2d "
                  f"{ref * 1e3:.2f} ms; ratio {new / ref:.2f}; same output: {same}")


if __name__ == "__main__":
    main()
