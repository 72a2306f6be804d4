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


def test_profile_cli_sample_gives_the_estimate_and_records_it(tiny_llama, tiny_llama_experts, tmp_path, capsys):
    """``--sample M`` runs the sampled estimate (recorded in meta.json), close to the exact profile;
    ``--dare-p``, ``--seed`` and ``--threads`` reach the library."""
    import json

    experts = [f"e{i}={p}" for i, p in enumerate(tiny_llama_experts)]
    base = ["profile", str(tiny_llama)] + experts + ["--device", "cpu", "--dare-p", "0.3", "--seed", "5"]
    cli.main(base + ["--out", str(tmp_path / "exact"), "--threads", "2"])
    cli.main(base + ["--out", str(tmp_path / "est"), "--sample", "2000"])
    assert "sampled estimate (2000 entries per tensor)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "est" / "meta.json").read_text())
    assert meta["sample"] == 2000 and meta["dare_p"] == 0.3 and meta["seed"] == 5
    exact_meta = json.loads((tmp_path / "exact" / "meta.json").read_text())
    assert exact_meta["sample"] is None and exact_meta["threads"] == 2 and meta["threads"] is None
    a = pd.read_csv(tmp_path / "exact" / "pairs.csv").set_index(["tensor", "expert_a", "expert_b"])
    b = pd.read_csv(tmp_path / "est" / "pairs.csv").set_index(["tensor", "expert_a", "expert_b"])
    assert (a["cosine"] - b.loc[a.index, "cosine"]).abs().max() < 0.2
