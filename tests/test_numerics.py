"""workbench.numerics: importing workbench pins torch's CPU kernels to AVX2 on x86-64 (the same zoo on every
CPU), unless the user set a variable or opted out; a late import says that it came too late."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from workbench.numerics import OPT_OUT, PINNED_CPU

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the pinned instruction set is x86-64's")


def _run(code: str, **env) -> dict:
    """``code`` in a fresh interpreter with none of the pinned variables set (plus ``env``); its last printed
    line, parsed as JSON."""
    base = {k: v for k, v in os.environ.items() if k not in PINNED_CPU and k != OPT_OUT}
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env={**base, **env}, capture_output=True,
                         text=True, timeout=300, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


SHOW = ("import json, os, torch; print(json.dumps({'cap': str(torch.backends.cpu.get_cpu_capability()), "
        "'env': {k: os.environ.get(k) for k in %r}}))" % sorted(PINNED_CPU))


def test_import_pins_avx2_and_respects_the_user():
    native = _run(SHOW, **{OPT_OUT: "1"})
    assert all(v is None for v in native["env"].values())  # opted out: nothing set
    pinned = _run("import workbench\n" + SHOW)
    assert pinned["env"] == PINNED_CPU
    assert pinned["cap"].upper() in ("AVX2", "DEFAULT")  # never AVX-512, whatever the CPU offers
    own = _run("import workbench\n" + SHOW, ATEN_CPU_CAPABILITY="default")
    assert own["env"]["ATEN_CPU_CAPABILITY"] == "default" and own["cap"].upper() == "DEFAULT"


def test_late_import_warns_only_when_torch_already_chose_avx512():
    native = _run(SHOW, **{OPT_OUT: "1"})["cap"].upper()
    late = _run("import torch; torch.ones(4).sum()\nimport workbench\n" + SHOW)
    assert late["cap"].upper() == native  # too late to change
    assert ("computed on the CPU before workbench was imported" in late["stderr"]) == native.startswith("AVX512")
