"""Tests of workbench.studies.sweep: the merging benchmark's cells on the local executor and on a local
Ray cluster started here (2 CPUs, no dashboard, no network), with a worker and a driver killed."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
import yaml

torch.set_num_threads(1)

from test_merging_benchmark import tiny_zoo  # noqa: E402,F401  (the tiny-zoo fixture)
from workbench.studies import merging_benchmark as E  # noqa: E402
from workbench.studies import sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["weight_average", "task_arithmetic", "ties", "dare_linear", "tsv", "iso_c"]
LAMBDAS = (0.5, 1.0)
COMPARED = [c for c in E.ROW_COLUMNS if c != "pred_file"]  # pred_file names each run's own cache folder


def _grid(zoo, **kw):
    return E.capability_merging(zoo, "full", METHODS, LAMBDAS, device="cpu", references=False, progress=False, **kw)


def _table(df: pd.DataFrame) -> pd.DataFrame:
    return df[COMPARED].reset_index(drop=True)


@pytest.fixture(scope="module")
def local_table(tiny_zoo, tmp_path_factory):  # noqa: F811
    df = _grid(tiny_zoo, cache=tmp_path_factory.mktemp("sweep_local"))
    assert df.attrs["cells"] == {"total": len(METHODS), "computed": len(METHODS), "stored": 0}
    assert (df["status"] == "ok").all()
    return _table(df)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module; its workers import this checkout's workbench."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # a loaded 2-core box can take over Ray's default 60 s to start a worker process: allow 10 min
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_register_timeout_seconds": 600})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ------------------------------------------------------------------------------------------ the store, no Ray
def test_cell_store_roundtrip_is_atomic_and_keeps_nan(tmp_path):
    store = sweep.CellStore(tmp_path / "cells")
    assert store.get("k") is None
    value = {"rows": [{"accuracy": math.nan, "n": 3, "selected": True, "lambda": 0.5}], "timings": []}
    store.put("k", value)
    back = store.get("k")
    assert math.isnan(back["rows"][0]["accuracy"]) and back["rows"][0]["n"] == 3 and back["rows"][0]["selected"]
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["k.json"]  # no temp file left behind
    with pytest.raises(TypeError):
        store.put("bad", {"x": object()})  # not JSON: an error, not a silent string
    assert not store.path("bad").exists()


def test_run_sweep_local_resumes_from_store(tmp_path):
    store = sweep.CellStore(tmp_path)
    calls = []

    def square(x):
        calls.append(x)
        return x * x

    first = sweep.run_sweep([1, 2, 3], square, keys=["a", "b", "c"], store=store, progress=False)
    assert first.results == [1, 4, 9] and first.counts == {"total": 3, "computed": 3, "stored": 0}
    store.path("b").unlink()
    again = sweep.run_sweep([1, 2, 3], square, keys=["a", "b", "c"], store=store, progress=False)
    assert again.results == [1, 4, 9] and again.fresh == [1] and calls == [1, 2, 3, 2]
    odd_only = sweep.run_sweep([5, 6], square, keys=["d", "e"], store=store, progress=False,
                               storable=lambda r: r % 2 == 1)
    assert odd_only.results == [25, 36] and store.get("d") == 25 and store.get("e") is None
    with pytest.raises(ValueError, match="executor"):
        sweep.run_sweep([1], square, executor="dask")


def test_second_local_run_reads_every_cell_from_the_store(tiny_zoo, tmp_path):  # noqa: F811
    first = _grid(tiny_zoo, cache=tmp_path)
    again = _grid(tiny_zoo, cache=tmp_path)
    assert again.attrs["cells"] == {"total": len(METHODS), "computed": 0, "stored": len(METHODS)}
    pd.testing.assert_frame_equal(_table(again), _table(first))


def test_failed_cell_is_not_stored_and_keep_merged_keeps_the_checkpoint(tiny_zoo, tmp_path):  # noqa: F811
    kw = dict(device="cpu", references=False, progress=False, cache=tmp_path / "cache",
              method_params={"ties": {"density": 2.0}})
    first = E.capability_merging(tiny_zoo, "full", ["ties", "weight_average"], (1.0,), **kw,
                                 keep_merged=tmp_path / "kept")
    assert (first.loc[first["method_id"] == "ties", "status"] == "failed").all()
    kept = list((tmp_path / "kept").glob("weight_average-*/merge-*/model*.safetensors"))
    assert len(kept) == 1  # the merged checkpoint of the ok cell, left where asked
    again = E.capability_merging(tiny_zoo, "full", ["ties", "weight_average"], (1.0,), **kw)
    assert again.attrs["cells"] == {"total": 2, "computed": 1, "stored": 1}  # the failed cell is tried again
    pd.testing.assert_frame_equal(_table(again), _table(first))


# ------------------------------------------------------------------------------------------ on Ray
def test_ray_executor_gives_the_local_table(tiny_zoo, ray_cluster, local_table, tmp_path):  # noqa: F811
    df = _grid(tiny_zoo, cache=tmp_path, executor="ray")
    assert df.attrs["cells"]["computed"] == len(METHODS)
    assert df.attrs["cache_misses"] > 0  # the workers' evaluations are counted
    pd.testing.assert_frame_equal(_table(df), local_table)


def _pid_recording(pid_dir: Path):
    """The real cell function, after noting ``<method>-<worker pid>`` in ``pid_dir`` (a closure:
    cloudpickle sends it to the workers by value)."""
    def cell_fn(cell):
        (pid_dir / f"{cell.entry.method}-{os.getpid()}").write_text("")
        time.sleep(0.5)  # the cell is surely under way when the test kills its worker
        return sweep.run_merge_cell(cell)
    return cell_fn


def test_killed_worker_is_retried_and_the_table_is_unchanged(tiny_zoo, ray_cluster, local_table,  # noqa: F811
                                                             tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    setting = E.capability_setting(tiny_zoo, "full")
    ev, _ = E._context(tiny_zoo, "cpu", tmp_path / "cache", None, False, "loglik", False)
    entries = E.default_entries(METHODS, "full")
    out: dict = {}

    def drive():
        out["rows"], _, out["counts"] = sweep.merge_grid(setting, entries, LAMBDAS, ev, rescale="interpolate",
                                                         keep_defaults=True, progress=False, desc="t",
                                                         executor="ray", cell_fn=_pid_recording(pid_dir))

    t = threading.Thread(target=drive)
    t.start()
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and t.is_alive():
        started = sorted(pid_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        if started:
            victim = started[0]
            os.kill(int(victim.name.rsplit("-", 1)[1]), signal.SIGKILL)
        time.sleep(0.05)
    t.join(timeout=300)
    assert victim is not None and not t.is_alive()
    method = victim.name.rsplit("-", 1)[0]
    attempts = [p for p in pid_dir.iterdir() if p.name.rsplit("-", 1)[0] == method]
    assert len(attempts) >= 2  # Ray ran the killed cell again, on another worker process
    assert out["counts"]["computed"] == len(METHODS)
    df = pd.DataFrame(out["rows"], columns=E.ROW_COLUMNS)
    pd.testing.assert_frame_equal(_table(df), local_table)


def test_killed_driver_rerun_computes_only_missing_cells(tiny_zoo, ray_cluster, local_table, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    spec = {"experiment": "capability_merging", "zoo": str(tiny_zoo.path), "out": str(out),
            "args": {"variant": "full", "methods": METHODS, "lambdas": list(LAMBDAS), "device": "cpu",
                     "references": False}}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(spec))
    cells = out / "cache" / "experiments" / "cells"
    driver = subprocess.Popen([sys.executable, "-m", "workbench", "sweep", str(f), "--executor", "ray", "--address",
                               ray_cluster, "--quiet"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None and not list(cells.glob("*.json")):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    err = driver.communicate()[1].decode()
    stored = len(list(cells.glob("*.json")))
    assert 1 <= stored < len(METHODS), f"the driver should die mid-sweep (stored {stored}); stderr: {err[-2000:]}"
    assert not list(cells.glob(".*.tmp"))  # nothing half-written
    df = sweep.run_file(f, executor="ray", address=ray_cluster, progress=False)
    assert df.attrs["cells"] == {"total": len(METHODS), "computed": len(METHODS) - stored, "stored": stored}
    pd.testing.assert_frame_equal(_table(df), local_table)
    written = pd.read_csv(out / "capability_full.csv")
    assert len(written) == len(df)


# ------------------------------------------------------------------------------------------ SWEEP.yaml errors
@pytest.mark.parametrize("text, match", [
    ("experiment: table9\nzoo: tiny\n", "experiment must be one of"),
    ("experiment: capability_merging\n", "'zoo'"),
    ("experiment: capability_merging\nzoo: tiny\nargs: {executor: ray}\n", "set by the command line"),
    ("experiment: capability_merging\nzoo: tiny\nlambda: [1]\n", "unknown key"),
    ("[1, 2]\n", "expected a mapping"),
])
def test_sweep_file_errors_name_the_file(tmp_path, text, match, capsys):
    from workbench.cli import main
    from workbench.errors import ConfigError

    f = tmp_path / "SWEEP.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        sweep.run_file(f)
    assert str(f) in str(err.value)
    assert main(["sweep", str(f)]) == 2
    assert str(f) in capsys.readouterr().err
