"""The audit report: CLI, self-contained HTML, the tidy table beside it, and bad input."""

from __future__ import annotations

import json
import re

import polars as pl
import pytest

from benchmarks import audit
from benchmarks.speed.bench_audit import simulate_predictions
from halo_balance.cli import run as cli_run
from halo_balance.errors import HaloBalanceError
from tests.conftest import fails_cleanly

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
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    # per attribute: rate bars, gap chart, calibration, sweep rates, sweep gap; the strategy chart over
    # models and per model (logreg, rf)
    assert len(images) == 5 + 3
    assert "Attribute: age_group" in text and "Attribute: gender" not in text  # --groups chose one
    for part in ("Changes against original", "Gaps to adult", "Calibration by group (logreg)",
                 "Threshold sweep (logreg)", "percentile intervals", "Benjamini-Hochberg",
                 "Min-max gaps by mitigation strategy", "UDR max - min [CI]"):
        assert part in text
    assert "threshold_optimizer: logreg" in text  # methods run with some models only are named
    # pediatric (about 10 patients, a couple of deaths) is flagged and kept out of the charts
    assert "left out of the charts: pediatric" in text and "pediatric † (patients=" in text


def test_table_beside_the_report_matches_the_html(report):
    table = pl.read_parquet(report.with_suffix(".parquet"))
    assert set(table["table"]) == {"group_metrics", "fairness", "gaps", "comparisons", "threshold_sweep"}
    gaps = table.filter(pl.col("table") == "gaps")
    assert gaps["p_value"].drop_nulls().drop_nans().is_between(0, 1).all()
    row = table.filter((pl.col("table") == "comparisons") & (pl.col("model") == "mean") & (pl.col("metric") == "f1")
                       & (pl.col("method") == "upsample")).row(0, named=True)
    assert audit.fmt_ci(row["estimate"], row["ci_low"], row["ci_high"]) in report.read_text()
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"]
    # the strategy chart's table: each method's min-max UDR gap and its paired change against original
    for metric in ("equal_opportunity", "fpr_difference"):
        spread = table.filter((pl.col("table") == "fairness") & (pl.col("model") == "mean")
                              & (pl.col("method") == "upsample") & (pl.col("metric") == metric)).row(0, named=True)
        change = table.filter((pl.col("table") == "comparisons") & (pl.col("model") == "mean")
                              & (pl.col("method") == "upsample") & (pl.col("metric") == metric)).row(0, named=True)
        cell = f"{change['estimate']:+.3f} (p {audit.fmt_p(change['p_value'])}, q {audit.fmt_p(change['q_value'])})"
        assert audit.fmt_ci(spread["estimate"], spread["ci_low"], spread["ci_high"]) in report.read_text()
        assert cell in report.read_text()
    sweep = table.filter(pl.col("table") == "threshold_sweep")
    assert sorted(sweep["threshold"].unique().to_list()) == [0.2, 0.5, 0.8]


def _fails_cleanly(argv, capsys, *needles) -> str:
    return fails_cleanly(audit.main, argv, capsys, *needles)


def test_refuses_to_overwrite_and_reports_bad_input_in_one_line(run_dir, report, tmp_path, capsys):
    _fails_cleanly(["--run", str(run_dir), "--out", str(report), "--resamples", "5", "--no-progress"], capsys,
                   "already exists", "--overwrite")
    (tmp_path / "a_file").write_text("not a folder")
    for extra, needles in ((["--reference", "orignal"],
                            ["--reference", "unknown 'orignal' (did you mean 'original'?)"]),
                           (["--focus-model", "logrg"], ["--focus-model", "(did you mean 'logreg'?)"]),
                           (["--groups", "gendr"], ["--groups", "(did you mean 'gender'?)"]),
                           (["--bins", "0"], ["--bins must be at least 1"]),
                           (["--level", "95"], ["--level must lie in (0, 1)"]),
                           (["--thresholds", "0.5,5"], ["--thresholds must be values in [0, 1]"])):
        _fails_cleanly(["--run", str(run_dir), "--out", str(tmp_path / "x.html"), "--resamples", "5",
                        "--no-progress", *extra], capsys, *needles)
    for out, needle in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "x.html", "is a file, not a folder")):
        _fails_cleanly(["--run", str(run_dir), "--out", str(out), "--no-progress"], capsys, needle)
    _fails_cleanly(["--run", str(tmp_path), "--out", str(tmp_path / "y.html")], capsys, "predictions.parquet not found")
    _fails_cleanly(["--run", str(run_dir / "predictions.parquet"), "--out", str(tmp_path / "y.html")], capsys,
                   "is a file", "--predictions")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


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


def test_report_has_contents_foldable_long_tables_and_wrapping_settings(report):
    text = report.read_text()
    nav = text[text.index("<nav class='toc'>"):text.index("</nav>")]
    headings = re.findall(r'<h([23]) id="(s\d+)">', text)
    assert headings and all(f'href="#{anchor}"' in nav for _, anchor in headings)
    assert 'href="#' in nav and "Settings" in nav and "Attribute: age_group" in nav
    # every table longer than LONG_TABLE_ROWS sits in a <details> block; short ones are shown
    for match in re.finditer(r"<table.*?</table>", text, flags=re.S):
        rows = match.group(0).count("<tr>") - 1
        before = text[:match.start()]
        folded = before.rfind("<details>") > before.rfind("</details>")
        assert folded or rows <= audit.LONG_TABLE_ROWS
    assert "Table of" in text and "(click to show)" in text
    assert "white-space:pre-wrap" in text and "<pre>{" in text  # settings as wrapped, indented JSON


def _external() -> pl.DataFrame:
    """One model's predictions of 300 patients, as a user would export them (no harness columns)."""
    frame = simulate_predictions(n_patients=300, n_folds=1, models=["mine"], groups=GROUPS, seed=4,
                                 group_shift={"gender": {"Female": -1.0}})
    return frame.drop("fold", "method", "model", "prediction")


def test_audit_of_an_external_predictions_file(tmp_path, capsys):
    from sklearn.metrics import f1_score

    frame = _external().drop("visit_index")
    csv = tmp_path / "my_model.csv"
    frame.write_csv(csv)
    before = csv.read_bytes()
    out = tmp_path / "audit.html"
    with pytest.raises(SystemExit) as e:
        cli_run(audit.main, ["--predictions", str(csv), "--groups", "gender", "age_group", "--out", str(out),
                             "--threshold", "0.3", "--resamples", "40", "--permutations", "40", "--no-progress"])
    assert e.value.code == 0 and csv.read_bytes() == before
    text = out.read_text()
    assert f"Predictions <code>{csv}</code>" in text and "nothing to compare" in text
    for part in ("Attribute: gender", "Attribute: age_group", "Attribute: gender &amp; age_group",
                 "Calibration by group (model)", "Threshold sweep (model)"):
        assert part in text
    table = pl.read_parquet(out.with_suffix(".parquet"))
    # the defaults: one fold, method original, model "model", prediction = score > --threshold
    f1 = table.filter((pl.col("table") == "group_metrics") & (pl.col("attribute") == "(all)")
                      & (pl.col("metric") == "f1") & (pl.col("model") == "model")).row(0, named=True)
    assert f1["method"] == "original"
    assert f1["estimate"] == pytest.approx(f1_score(frame["y_true"], frame["score"] > 0.3))
    female = table.filter((pl.col("table") == "group_metrics") & (pl.col("group") == "Female")
                          & (pl.col("metric") == "tpr") & (pl.col("model") == "model")).row(0, named=True)
    died = frame.group_by("patient_id").agg(pl.col("gender").first(), pl.col("y_true").max())
    assert female["n_patients"] == died.filter(pl.col("gender") == "Female").height
    assert female["n_deaths"] == died.filter((pl.col("gender") == "Female") & (pl.col("y_true") == 1)).height
    # one fold: the audited patients' group sizes weigh the disparate impact, which is defined
    di = table.filter((pl.col("table") == "fairness") & (pl.col("attribute") == "gender")
                      & (pl.col("metric") == "di_weighted") & (pl.col("model") == "mean"))["estimate"].item()
    assert 0 < di < 1  # women's deaths are underdiagnosed: their F1 is lower

    # the same predictions as parquet, with every optional column given, give the same statistics
    full = frame.with_columns(visit_index=pl.int_range(pl.len()).over("patient_id"), fold=pl.lit(0),
                              method=pl.lit("original"), model=pl.lit("model"),
                              prediction=(pl.col("score") > 0.3).cast(pl.Int8))
    full.write_parquet(tmp_path / "full.parquet")
    with pytest.raises(HaloBalanceError, match="would overwrite the audited predictions"):
        audit.run_audit(tmp_path / "full.parquet", tmp_path / "full.html", groups=["gender"], overwrite=True)
    audit.run_audit(tmp_path / "full.parquet", tmp_path / "full_audit.html", groups=["gender", "age_group"],
                    n_resamples=40, n_permutations=40, progress=False)
    other = pl.read_parquet(tmp_path / "full_audit.parquet")
    key = ["table", "method", "model", "attribute", "group", "metric", "threshold"]
    joined = table.join(other, on=key, how="full", suffix="_2", nulls_equal=True)
    assert joined.height == table.height == other.height
    assert (joined["estimate"].fill_nan(-1) == joined["estimate_2"].fill_nan(-1)).all()


def test_bad_predictions_files_fail_early_with_one_line(tmp_path, capsys):
    frame = _external()
    frame.rename({"y_true": "ytrue"}).write_csv(tmp_path / "renamed.csv")
    pl.concat([frame, frame.head(1)]).write_parquet(tmp_path / "twice.parquet")
    frame.write_parquet(tmp_path / "ok.parquet")
    (tmp_path / "ok.json").write_text("{}")
    inputs = {p: p.read_bytes() for p in tmp_path.iterdir()}
    out = ["--out", str(tmp_path / "out" / "a.html"), "--no-progress"]
    for argv, needles in (
            (["--predictions", str(tmp_path / "renamed.csv"), "--groups", "gender"],
             ["renamed.csv", "missing column(s) 'y_true' (did you mean 'ytrue'?)"]),
            (["--predictions", str(tmp_path / "twice.parquet"), "--groups", "gender"], ["occurs more than once"]),
            (["--predictions", str(tmp_path / "ok.json"), "--groups", "gender"], ["unknown file type '.json'"]),
            (["--predictions", str(tmp_path), "--groups", "gender"], ["is a folder", "--run"]),
            (["--predictions", str(tmp_path / "none.csv"), "--groups", "gender"], ["none.csv not found"]),
            (["--predictions", str(tmp_path / "ok.parquet")], ["--groups is needed"]),
            (["--predictions", str(tmp_path / "ok.parquet"), "--groups", "sex"], ["missing column(s) 'sex'"]),
            (["--predictions", str(tmp_path / "ok.parquet"), "--groups", "gender", "--threshold", "2"],
             ["--threshold must lie in [0, 1]"])):
        _fails_cleanly([*argv, *out], capsys, *needles)
    assert not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == inputs
