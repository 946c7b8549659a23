"""The Ray backend on a local cluster (a head and one worker node process, 1 CPU each): the k-fold
grid and sampling shards give exactly the local backend's outputs, also when the worker dies."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from benchmarks import kfold
from benchmarks.methods import FairPlaySettings
from halo_balance.distributed import local_cluster
from halo_balance.sample import sample_records, sample_shards
from tests.conftest import make_learnable_dataset
from tests.test_model import random_model

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

SETTINGS = dict(groups=["gender"], folds=2, methods=["original", "upsample", "fairplay"], models=["logreg", "rf"],
                seed=0, fairplay=FairPlaySettings(device="cpu", train_options={"preset": "tiny", "epochs": 8}),
                progress=False)
OUTPUTS = ("metrics.parquet", "predictions.parquet", "summary.parquet", "folds.parquet")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_learnable_dataset(400, seed=4).save(tmp_path_factory.mktemp("data") / "cohort")


@pytest.fixture(scope="module")
def local_run(data, tmp_path_factory) -> Path:
    return kfold.run_kfold(data=data, out=tmp_path_factory.mktemp("local") / "run", jobs=1, **SETTINGS)


def _assert_same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert pl.read_parquet(a / name).equals(pl.read_parquet(b / name)), name


def _units(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "units").rglob("*") if p.is_file())


def test_kfold_on_a_ray_cluster_matches_the_local_backend(data, local_run, tmp_path):
    with local_cluster(node_cpus=(1, 1)) as cluster:
        out = kfold.run_kfold(data=data, out=tmp_path / "ray", backend="ray", ray_address=cluster.address,
                              **SETTINGS)
    _assert_same_outputs(local_run, out)
    assert pl.read_parquet(out / "metrics.parquet").height > 100
    assert _units(out) == _units(local_run)
    run = kfold.read_json(out / kfold.RUN_FILE)
    assert run["invocations"][-1]["backend"] == "ray" and run["invocations"][-1]["units_computed"] == 12
    # resume does not care which backend ran the units: a local rerun has nothing left to do
    kfold.run_kfold(data=data, out=out, jobs=1, **SETTINGS)
    assert kfold.read_json(out / kfold.RUN_FILE)["invocations"][-1]["units_computed"] == 0


def test_a_worker_killed_mid_run_loses_nothing(data, local_run, tmp_path):
    """The worker node dies while both folds' generators train (one on each node): Ray runs its
    task again on the head, and the run ends with the local backend's outputs, each unit once."""
    out = tmp_path / "ray"
    seen: dict[str, object] = {}

    def kill_when_both_generators_train(cluster) -> None:
        gen = out / "generators"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            training = sorted(p.name for p in gen.glob("*.training")) if gen.is_dir() else []
            finished = [p for p in gen.iterdir() if not p.name.endswith(".training")] if gen.is_dir() else []
            if len(training) == 2 and not finished:
                seen["training"] = training
                cluster.remove_node(next(iter(cluster.worker_nodes)), allow_graceful=False)
                seen["killed"] = time.monotonic()
                return
            time.sleep(0.02)

    with local_cluster(node_cpus=(1, 1)) as cluster:
        killer = threading.Thread(target=kill_when_both_generators_train, args=(cluster,), daemon=True)
        killer.start()
        kfold.run_kfold(data=data, out=out, backend="ray", ray_address=cluster.address, **SETTINGS)
        killer.join(timeout=1)
        assert not cluster.worker_nodes  # the worker was killed ...
    assert "killed" in seen and len(seen["training"]) == 2  # ... while both generators were training
    _assert_same_outputs(local_run, out)
    assert _units(out) == _units(local_run)
    preds = pl.read_parquet(out / "predictions.parquet")
    assert not preds.select("fold", "method", "model", "patient_id", "visit_index").is_duplicated().any()
    assert len(list((out / "generators").iterdir())) == 2  # two finished generators, no leftover training


def test_sampling_shards_on_a_ray_cluster_draw_the_records_of_one_process():
    model = random_model(seed=2, n_ctx=6, code_bias=-2.5, end_bias=-0.3)
    cond = model.layout.complete({}, 900, seed=1)
    whole = sample_records(model, cond, batch_size=100, seed=3, device="cpu", progress=False)
    with local_cluster(node_cpus=(1, 1)) as cluster:
        sharded = sample_shards(model, cond, shards=4, backend="ray", ray_address=cluster.address, batch_size=100,
                                seed=3, device="cpu", progress=False)
    assert sharded.visits.equals(whole.visits) and sharded.patients.equals(whole.patients)
