"""benchmarks.time_fidelity: time-token distributions of real and generated records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks.time_fidelity import compare, main, plot, time_distributions
from conftest import MIMIC_DEMO, require
from data_prep.mimic_iv import prepare_mimic_iv
from data_prep.time_tokens import time_token_table
from halo_balance import PreparedDataset
from halo_balance.errors import DatasetError


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("timed") / "prepared"
    prepare_mimic_iv(require(MIMIC_DEMO), out, n_lab_items=0, time_bins=4, progress=False)
    return out


def test_time_token_table_and_placement(timed: Path) -> None:
    ds = PreparedDataset.load(timed)
    t = time_token_table(ds)
    assert t.height == ds.n_visits and set(t["variable"]) == {"age", "gap"}
    d = time_distributions(ds)
    assert (d["age"]["slots"], d["age"]["slots_with_one_token"], d["gap"]["slots"]) == (100, 100, 175)
    assert d["gap"]["slots_with_one_token"] == 175 and d["age"]["tokens_on_wrong_visit"] == 0
    assert sorted(set(d["gap"]["bins"].tolist())) == [0, 1, 2, 3]
    # a record with two age tokens on its first visit and one on its second
    age_ids = ds.vocab.filter(pl.col("token").str.starts_with("time:age:"))["id"].to_list()
    bad = PreparedDataset.from_records(patient_ids=["x"], labels=[0], groups={g: [ds.meta["groups"][g][0]]
                                                                               for g in ds.meta["groups"]},
                                       visits=[[sorted(age_ids[:2]), [age_ids[0]]]], vocab=ds.vocab, meta=ds.meta,
                                       synthetic=True)
    b = time_distributions(bad)["age"]
    assert (b["slots_with_one_token"], b["slots_with_several"], b["tokens_on_wrong_visit"]) == (0, 1, 1)


def test_compare_is_zero_for_identical_records(timed: Path) -> None:
    ds = PreparedDataset.load(timed)
    r = compare(ds, ds, ds, {"age": 4, "gap": 4})
    assert r["age"]["w1_synthetic_vs_train"] == 0 == r["gap"]["w1_holdout_vs_train"]
    np.testing.assert_allclose(sum(r["gap"]["frequencies"]["train"]), 1.0)


def test_main_trains_samples_and_plots(timed: Path, tmp_path: Path) -> None:
    report = main(["--data", str(timed), "--out", str(tmp_path / "run"), "--preset", "tiny", "--epochs", "1",
                   "--device", "cpu", "--figure", str(tmp_path / "fig.png")])
    assert report["n_synthetic"] == report["n_train"] == 80
    assert json.loads((tmp_path / "run" / "time_fidelity.json").read_text())["gap"]["w1_synthetic_vs_train"] >= 0
    assert (tmp_path / "fig.png").stat().st_size > 5000
    with pytest.raises(DatasetError, match="no time tokens.*--time-bins"):
        untimed = tmp_path / "untimed"
        prepare_mimic_iv(MIMIC_DEMO, untimed, n_lab_items=0, progress=False)
        main(["--data", str(untimed), "--out", str(tmp_path / "x")])


def test_plot_replaces_the_figure_whole_or_not_at_all(timed: Path, tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    ds = PreparedDataset.load(timed)
    report = compare(ds, ds, ds, {"age": 4, "gap": 4})
    path = tmp_path / "figs" / "time.png"
    plot(report, path, "title")
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and sorted(p.name for p in path.parent.iterdir()) == ["time.png"]

    def fails_halfway(self, fname, **kwargs):
        fname.write(first[:100])
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fails_halfway)
    with pytest.raises(RuntimeError, match="disk full"):
        plot(report, path, "title")
    assert path.read_bytes() == first and sorted(p.name for p in path.parent.iterdir()) == ["time.png"]
