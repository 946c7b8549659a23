"""The privacy-utility table: one generator per privacy budget, every attack, fidelity, FairPlay's k-fold figures."""

from __future__ import annotations

import json

import polars as pl
import pytest

from benchmarks.privacy_utility import kfold_figures, main, render_table
from tests.conftest import make_learnable_dataset


def _kfold_run(path, *, f1: float, theil: float):
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"groups": ["gender"]}))
    rows = [("fairplay", "mean", None, None, "f1", f1, 0.01), ("fairplay", "mean", "gender", None, "theil", theil, 0.0),
            ("original", "mean", None, None, "f1", 0.1, 0.02), ("fairplay", "knn", None, None, "f1", 0.9, 0.0)]
    pl.DataFrame(rows, schema=["method", "model", "attribute", "group", "metric", "mean", "se"],
                 orient="row").write_parquet(path / "summary.parquet")
    return path


def test_table_from_runs(tmp_path):
    data = make_learnable_dataset(200, seed=2)
    data.save(tmp_path / "data")
    run = _kfold_run(tmp_path / "gender_eps8", f1=0.21, theil=0.03)
    rows = main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--epsilons", "8", "none",
                 "--train-options", json.dumps({"preset": "tiny", "epochs": 2, "batch_size": 32}),
                 "--dp-train-options", json.dumps({"warmup_steps": 2}), "--device", "cpu",
                 "--kfold", f"gender:8={run}"])
    assert [r["setting"] for r in rows] == ["eps8", "none"]
    dp, plain = rows
    assert 7.9 < dp["epsilon_spent"] <= 8.0 and plain["epsilon_spent"] is None
    assert dp["train_options"] == {"preset": "tiny", "epochs": 2, "batch_size": 32, "warmup_steps": 2,
                                   "dp_epsilon": 8.0}
    for r in rows:
        assert 0 <= r["auroc_distance"] <= 1 and 0 <= r["auroc_likelihood_per_event"] <= 1
        assert r["token_r2"] is not None and r["verdict"] in ("no measurable leak", "some leakage", "leaks")
    report = json.loads((tmp_path / "out" / "eps8" / "report.json").read_text())
    assert report["privacy"]["verdict"]["dp"]["epsilon"] == dp["epsilon_spent"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| eps8 |" in table and "0.210 ± 0.010" in table and "| none |" in table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["kfold"]["eps8"]["gender"]["theil"] == 0.03 and saved["n_train"] == 160
    # a rerun reuses the trained models
    weights = tmp_path / "out" / "none" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--epsilons", "none",
                  "--train-options", json.dumps({"preset": "tiny", "epochs": 2}), "--device", "cpu"])
    assert again[0]["token_r2"] == pytest.approx(plain["token_r2"]) and weights.stat().st_mtime_ns == stamp


def test_row_names_the_cell_attack_farthest_from_chance():
    from benchmarks.privacy_utility import table_row
    from halo_balance.privacy import privacy_verdict

    mia = {how: {"auroc": 0.52, "auroc_se": 0.02, "per_event": {"auroc": 0.55, "auroc_se": 0.02}}
           for how in ("distance", "likelihood")}
    mia["cells"] = [{"cell": f"label=1|race={r}", "groups": ["race"], "n_members": 100, "n_nonmembers": 100,
                     "attacks": {"likelihood per token": {"auroc": a, "auroc_se": 0.04}},
                     "code_frequency": {"likelihood per token": {"auroc": a - 0.01}}}
                    for r, a in (("A", 0.62), ("B", 0.30), ("C", 0.55))]
    priv = {"membership_inference": mia, "exact_copies": {"copies_of_rare_records": 0, "rare_k": 5},
            "attribute_inference": {"attributes": {"label": {"attacker": {"balanced_accuracy": 0.6},
                                                             "advantage": 0.0}}}}
    priv["verdict"] = privacy_verdict(priv)
    stats = {name: {"r2": 0.9, "reference_r2": 0.9} for name in ("unigram_per_visit", "pair_per_visit")}
    row = table_row({"privacy": priv, "fidelity": {"statistics": stats}}, setting="none", options={},
                    training={"history": [{}]}, copies={"rejected_copies": 0, "kept_copies": 0}, train_seconds=1.0)
    # 0.30 is farther from chance than 0.62: an attacker flips a score that ranks members low
    assert row["auroc_strongest_cell"] == 0.30 and "label=1|race=B" in row["strongest_cell"]
    assert row["strongest_cell_level"] == "leaks" and row["verdict"] == "leaks"
    assert row["auroc_strongest_cell_code_frequency"] == pytest.approx(0.29)
    assert "| 0.300 (0.290) |" in render_table([row], {})


def test_kfold_figures_and_bad_arguments(tmp_path, capsys):
    run = _kfold_run(tmp_path / "r", f1=0.2, theil=0.05)
    assert kfold_figures(run) == {"f1": 0.2, "f1_se": 0.01, "theil": 0.05}
    assert render_table([], {}).count("\n") == 2  # header and rule only
    from halo_balance.cli import run as cli_run

    with pytest.raises(SystemExit) as exc:
        cli_run(main, ["--data", "x", "--out", str(tmp_path / "o"), "--kfold", "gender=somewhere"])
    assert exc.value.code == 2 and "EXPERIMENT:SETTING=RUN_DIR" in capsys.readouterr().err
