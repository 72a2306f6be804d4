"""The same floating-point results on every x86-64 CPU: torch's CPU kernels pinned to one instruction set.

torch picks its CPU kernels by what the processor offers - ATen's vectorised kernels (AVX2 or AVX-512), MKL's
BLAS and oneDNN likewise - and kernels of different vector widths add in different orders, so the last bits of
a sum differ from one CPU to the next. Training amplifies them. Measured 2026-12-07: the default zoo built from
a fresh clone on an AVX-512 box (AMD EPYC, Zen 4) was a different zoo from the one the committed results come
from (built on an AVX2 box, Zen 3): the image / audio projector models of seed 0 scored 50.5 / 55.5 on their own
tasks instead of 40.5 / 41.5, and 3 of notebook 05's 7 full-fine-tuning verdicts came out differently. With the
kernels pinned to AVX2, which every x86-64 CPU of the last decade has, the same Zen 4 box rebuilt those models
to the committed scores exactly.

:func:`pin_cpu_numerics` runs when :mod:`workbench` is imported (``setdefault``: a variable you set yourself
wins; ``WORKBENCH_NATIVE_CPU=1`` leaves torch's own choice). The variables are read when torch first computes
on the CPU, not when it is imported, so they take effect unless torch has already computed before
:mod:`workbench` was imported (then a warning says so). Zoo jobs run one thread each, so a zoo is the same
whatever the machine; a notebook's sums also depend on its kernel's thread count (one per kernel in
``make reproduce`` on two cores). Nothing here touches the GPU or the compiled merge and profile kernels
(numba, no fast-math: their float operations are in a fixed order on every CPU).
"""
from __future__ import annotations

import os
import platform
import sys
import warnings

#: environment variables that pin torch's CPU kernels to AVX2: ATen's dispatch, MKL's conditional numerical
#: reproducibility mode and its instruction set, oneDNN's instruction set (set together; the combination is
#: what was measured to reproduce)
PINNED_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
              "ONEDNN_MAX_CPU_ISA": "AVX2"}
#: set to 1 to leave torch's own choice of CPU kernels
OPT_OUT = "WORKBENCH_NATIVE_CPU"


def pin_cpu_numerics() -> dict[str, str]:
    """Set :data:`PINNED_CPU` in ``os.environ`` (where not set already) on an x86-64 machine, unless
    ``WORKBENCH_NATIVE_CPU=1``; returns the variables it set. Warns once when torch's CPU kernels were
    already chosen as AVX-512 (torch computed before :mod:`workbench` was imported)."""
    if os.environ.get(OPT_OUT) == "1" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    new = {k: v for k, v in PINNED_CPU.items() if k not in os.environ}
    os.environ.update(new)
    torch = sys.modules.get("torch")
    if torch is not None and new and os.environ["ATEN_CPU_CAPABILITY"] == "avx2":
        chosen = str(torch.backends.cpu.get_cpu_capability())
        if chosen.upper().startswith("AVX512"):
            from .errors import WorkbenchWarning

            warnings.warn(f"torch computed on the CPU before workbench was imported: its kernels are {chosen}, not "
                          "AVX2, so the miniature world's numbers may differ in the last bits from the committed "
                          "ones (import workbench first; see workbench.numerics)", WorkbenchWarning, stacklevel=3)
    return new


__all__ = ["PINNED_CPU", "OPT_OUT", "pin_cpu_numerics"]
