"""`python -m workbench profile`: the interference profile from the shell, on tiny random Llamas."""
from __future__ import annotations

import pandas as pd
import pytest

from workbench import cli


def test_profile_cli_writes_tables_and_figures(tiny_llama, tiny_llama_experts, tmp_path):
    out = tmp_path / "prof"
    args = ["profile", str(tiny_llama)] + [f"e{i}={p}" for i, p in enumerate(tiny_llama_experts)]
    assert cli.main(args + ["--out", str(out), "--device", "cpu", "--figures"]) in (0, None)
    pairs = pd.read_csv(out / "pairs.csv")
    # three experts -> three unordered pairs, every one profiled
    got = {tuple(sorted(p)) for p in pairs[["expert_a", "expert_b"]].itertuples(index=False)}
    assert got == {("e0", "e1"), ("e0", "e2"), ("e1", "e2")}
    assert pairs["cosine"].between(-1.0, 1.0).all()
    pngs = list((out / "figures").glob("profile_*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_profile_cli_rejects_bad_expert_argument(tiny_llama, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["profile", str(tiny_llama), "no-equals-sign", "--out", str(tmp_path / "x")])
