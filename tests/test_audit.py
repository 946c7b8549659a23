"""The audit report: CLI, self-contained HTML, the tidy table beside it, and bad input."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from benchmarks import audit
from benchmarks.speed.bench_audit import simulate_predictions
from halo_balance.cli import run as cli_run

GROUPS = {"age_group": {"pediatric": 0.04, "adult": 0.66, "elderly": 0.3}, "gender": {"Female": 0.45, "Male": 0.55}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    simulate_predictions(n_patients=250, methods={"original": 0.0, "upsample": 0.6, "threshold_optimizer": 0.3},
                         models=["logreg", "rf"], groups=GROUPS, group_shift={"age_group": {"elderly": -1.2}},
                         seed=8).filter(~((pl.col("method") == "threshold_optimizer") & (pl.col("model") == "rf"))
                                        ).write_parquet(d / "predictions.parquet")
    (d / "run.json").write_text(json.dumps({"groups": ["age_group", "gender"], "data": "simulated",
                                            "methods": ["original", "upsample", "threshold_optimizer"]}))
    return d


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.html"
    audit.main(["--run", str(run_dir), "--out", str(out), "--resamples", "60", "--permutations", "60",
                "--thresholds", "0.2,0.5,0.8", "--groups", "age_group", "--no-progress"])
    return out


def test_report_is_self_contained_html_with_every_part(report):
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing to fetch: every image is inline and there are no external references
    assert not re.search(r'(src|href)="(?!data:)', text)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    # per attribute: rate bars, gap chart, calibration, sweep rates, sweep gap
    assert len(images) == 5
    assert "Attribute: age_group" in text and "Attribute: gender" not in text  # --groups chose one
    for part in ("Changes against original", "Gaps to adult", "Calibration by group (logreg)",
                 "Threshold sweep (logreg)", "percentile intervals", "Benjamini-Hochberg"):
        assert part in text
    assert "threshold_optimizer: logreg" in text  # methods run with some models only are named
    # pediatric (about 10 patients, a couple of deaths) is flagged and kept out of the charts
    assert "left out of the charts: pediatric" in text and "pediatric † (n=" in text


def test_table_beside_the_report_matches_the_html(report):
    table = pl.read_parquet(report.with_suffix(".parquet"))
    assert set(table["table"]) == {"group_metrics", "fairness", "gaps", "comparisons", "threshold_sweep"}
    gaps = table.filter(pl.col("table") == "gaps")
    assert gaps["p_value"].drop_nulls().drop_nans().is_between(0, 1).all()
    row = table.filter((pl.col("table") == "comparisons") & (pl.col("model") == "mean") & (pl.col("metric") == "f1")
                       & (pl.col("method") == "upsample")).row(0, named=True)
    assert audit.fmt_ci(row["estimate"], row["ci_low"], row["ci_high"]) in report.read_text()
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"]
    sweep = table.filter(pl.col("table") == "threshold_sweep")
    assert sorted(sweep["threshold"].unique().to_list()) == [0.2, 0.5, 0.8]


def test_refuses_to_overwrite_and_reports_bad_input_in_one_line(run_dir, report, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_run(audit.main, ["--run", str(run_dir), "--out", str(report), "--resamples", "5", "--no-progress"])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    for extra, message in ((["--reference", "nothing"], "reference method 'nothing'"),
                           (["--focus-model", "svm"], "model 'svm' is not in the run")):
        with pytest.raises(SystemExit) as e:
            cli_run(audit.main, ["--run", str(run_dir), "--out", str(tmp_path / "x.html"), "--resamples", "5",
                                 "--no-progress", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "x.parquet").exists()
    with pytest.raises(SystemExit) as e:
        cli_run(audit.main, ["--run", str(tmp_path), "--out", str(tmp_path / "y.html")])
    assert e.value.code == 2 and "predictions.parquet not found" in capsys.readouterr().err


def test_groups_are_needed_without_run_json(run_dir, tmp_path):
    (tmp_path / "predictions.parquet").write_bytes((run_dir / "predictions.parquet").read_bytes())
    with pytest.raises(Exception, match="pass --groups"):
        audit.load_run(tmp_path)
    frame, meta = audit.load_run(tmp_path, groups=["gender"])
    assert meta == {} and frame.height > 0


def test_sweep_persistence_counts():
    sweep = pl.DataFrame({"method": "m", "model": "k", "attribute": "a", "group": "g",
                          "threshold": [0.2, 0.5, 0.8], "metric": "underdiagnosis_gap",
                          "estimate": [0.1, 0.2, float("nan")], "ci_low": [0.01, -0.05, float("nan")],
                          "ci_high": [0.2, 0.4, float("nan")]})
    row = audit.sweep_persistence(sweep).row(0, named=True)
    assert (row["n"], row["positive"], row["negative"], row["ci_above_0"], row["ci_below_0"]) == (2, 2, 0, 1, 0)


def test_formatting():
    assert audit.fmt_ci(0.41234, 0.35, 0.47) == "0.412 [0.350, 0.470]"
    assert audit.fmt_ci(float("nan"), 0.1, 0.2) == "n/a"
    assert audit.fmt_p(0.0004) == "&lt;0.001" and audit.fmt_p(0.0312) == "0.031"
