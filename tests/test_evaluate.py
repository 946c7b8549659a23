"""The evaluation entry point: report structure, real references, set-aside rows, CLI and model wiring."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from benchmarks.speed.evaluate_speed import draw_cohort
from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.errors import DatasetError
from halo_balance.evaluate import evaluate, main, render_markdown
from halo_balance.fidelity import STATISTICS, code_statistics, compare_statistics
from tests.conftest import tiny_like


@pytest.fixture
def syn() -> PreparedDataset:
    return tiny_like([[[0, 3]], [[1], [2]], [[1, 4]]], labels=[0, 1, 0])


@pytest.fixture
def holdout() -> PreparedDataset:
    return tiny_like([[[3]], [[2, 3]]], prefix="h", synthetic=False)


def _without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("created", "elapsed_seconds")}


def test_report_without_holdout(tiny, syn):
    rep = evaluate(tiny, syn, seed=3)
    json.dumps(rep)  # plain JSON types only
    assert rep["format"] == "halo_balance.evaluate/2" and rep["parameters"]["seed"] == 3
    assert rep["data"]["halves"]["a"] + rep["data"]["halves"]["b"] == 4
    assert any("No held-out data" in n for n in rep["notes"])
    assert set(rep["fidelity"]["statistics"]) == set(STATISTICS)
    assert rep["privacy"]["membership_inference"]["distance"]["skipped"].startswith("needs held-out")
    assert rep["privacy"]["exact_copies"]["synthetic_copies"] == 2  # [0,3] is a, [1,4] is c
    assert _without_timing(evaluate(tiny, syn, seed=3)) == _without_timing(rep)
    assert "skipped" in render_markdown(rep)


def test_report_with_holdout_and_likelihood(tiny, syn, holdout):
    def log_likelihood(ds):  # members score higher
        return np.where(ds.patients["synthetic"].to_numpy() | ds.patients["patient_id"].str.starts_with("h")
                        .to_numpy(), -3.0, -1.0)

    rep = evaluate(tiny, syn, holdout=holdout, log_likelihood=log_likelihood)
    json.dumps(rep)
    ceiling = compare_statistics(code_statistics(tiny), code_statistics(holdout))
    for name in STATISTICS:
        assert rep["fidelity"]["statistics"][name]["reference_r2"] == ceiling[name]["r2"]
    mia = rep["privacy"]["membership_inference"]
    assert mia["likelihood"]["auroc"] == 1.0 and mia["likelihood"]["n_nonmembers"] == 2
    assert mia["distance"]["n_members"] == 4 and "halves" not in rep["data"]
    assert rep["privacy"]["exact_copies"]["holdout_equal_to_training"] == 1  # h0 [3] is d
    assert "reference" in rep["privacy"]["attribute_inference"]["attributes"]["gender"]
    md = render_markdown(rep)
    assert "Membership inference by likelihood**: AUROC 1.000" in md and "| unigram_per_visit |" in md


def test_real_reference_is_a_fresh_real_sample_of_the_synthetic_size(tiny, syn):
    big = tiny_like([[[3]], [[2, 3]], [[1]], [[0, 4]], [[2]], [[4]]], prefix="h", synthetic=False)
    rep = evaluate(tiny, syn, holdout=big, seed=1)
    assert rep["data"]["reference"] == {"patients": 3, "synthetic_patients": 3}
    assert any("with 3 held-out patients" in n and "as many as the synthetic" in n for n in rep["notes"])
    threes = [big.select(ids) for ids in itertools.combinations(big.patients["patient_id"].to_list(), 3)]
    r2 = {compare_statistics(code_statistics(tiny), code_statistics(r))["unigram_per_visit"]["r2"] for r in threes}
    assert rep["fidelity"]["statistics"]["unigram_per_visit"]["reference_r2"] in r2  # three of the six
    small = evaluate(tiny, syn, holdout=big.select(["h0", "h1"]))
    assert small["data"]["reference"]["patients"] == 2
    assert any("may beat its reference by sample size alone" in n for n in small["notes"])
    assert "| statistic | R^2 synthetic vs real | real reference |" in render_markdown(rep)


def test_augmented_input_uses_its_synthetic_rows_only(tiny, syn):
    augmented = PreparedDataset.concat([tiny, syn])
    rep = evaluate(tiny, augmented)
    assert rep["data"]["synthetic"]["patients"] == 3
    assert rep["data"]["synthetic"]["set_aside"] == {"reason": "rows flagged synthetic=False", "patients": 4}
    assert rep["fidelity"]["statistics"] == evaluate(tiny, syn)["fidelity"]["statistics"]
    assert evaluate(augmented, syn)["data"]["real"]["set_aside"]["patients"] == 3


def test_incompatible_inputs(tiny, syn):
    other = PreparedDataset(syn.visits, syn.patients, syn.vocab.with_columns(token=pl.col("token") + "x"), syn.meta)
    with pytest.raises(DatasetError, match="another vocabulary"):
        evaluate(tiny, other)
    with pytest.raises(DatasetError, match="both in the training data and the held-out data"):
        evaluate(tiny, syn, holdout=tiny.select(["a"]))


def test_a_faithful_generator_scores_near_the_real_reference_and_leaks_nothing():
    real, holdout = draw_cohort(400, vocab_size=120, seed=1), draw_cohort(200, vocab_size=120, seed=2, prefix="h")
    fresh = draw_cohort(400, vocab_size=120, seed=3, prefix="s", synthetic=True)
    rep = evaluate(real, fresh, holdout=holdout)
    uni = rep["fidelity"]["statistics"]["unigram_per_visit"]
    assert uni["r2"] > 0.9 and uni["reference_r2"] > 0.9
    assert rep["privacy"]["exact_copies"]["synthetic_copies"] == 0
    assert abs(rep["privacy"]["membership_inference"]["distance"]["auroc"] - 0.5) < 0.1
    # a generator that replays its training records: copies everywhere, members found
    replay = real.select(real.patients["patient_id"][:300])
    replay = PreparedDataset(replay.visits.with_columns(patient_id="s" + pl.col("patient_id"), synthetic=True),
                             replay.patients.with_columns(patient_id="s" + pl.col("patient_id"), synthetic=True),
                             replay.vocab, replay.meta)
    leak = evaluate(real, replay, holdout=holdout)["privacy"]
    assert leak["exact_copies"]["synthetic_copies"] == 300
    assert leak["membership_inference"]["distance"]["auroc"] > 0.8
    assert leak["nearest_neighbour"]["median_ratio"] == 0.0


def test_a_leak_confined_to_one_small_cell_is_found_and_named():
    import zlib

    real, holdout = draw_cohort(600, vocab_size=120, seed=1), draw_cohort(600, vocab_size=120, seed=2, prefix="h")
    fresh = draw_cohort(600, vocab_size=120, seed=3, prefix="s", synthetic=True)

    def likelihood(boost: float):
        """Noise fixed per patient, plus ``boost`` for the training patients of one small cell."""
        def log_likelihood(ds: PreparedDataset) -> np.ndarray:
            p = ds.patients
            noise = np.array([np.random.default_rng(zlib.crc32(i.encode())).normal() for i in p["patient_id"]])
            learnt = (p["label"] == 1) & (p["gender"] == "F") & ~p["patient_id"].str.starts_with("h")
            return noise - 30 + boost * learnt.to_numpy()
        return log_likelihood

    def cell_attacks(verdict: dict) -> list[dict]:
        return [a for a in verdict["attacks"] if a["cell"]]

    clean = evaluate(real, fresh, holdout=holdout, log_likelihood=likelihood(0.0))["privacy"]
    assert clean["verdict"]["level"] == "no measurable leak"
    assert clean["verdict"]["cell_attacks"]["cells"] == 8  # 2 of 10 cells hold fewer than 20 patients a side
    # at two standard errors, the bound over all records, chance alone would flag a cell here
    assert any(abs(a["value"] - 0.5) > max(2 * a["se"], 0.15) for a in cell_attacks(clean["verdict"]))

    leaky = evaluate(real, fresh, holdout=holdout, log_likelihood=likelihood(3.0))
    verdict = leaky["privacy"]["verdict"]
    assert all(a["level"] == "no measurable leak" for a in verdict["attacks"] if not a["cell"])
    assert verdict["level"] == "leaks" and verdict["worst"]["cell"] == "label=1|gender=F"
    assert verdict["worst"]["value"] > 0.9
    cells = {c["cell"]: c for c in leaky["privacy"]["membership_inference"]["cells"]}
    assert cells["label=1|gender=M"]["attacks"]["likelihood"]["auroc"] < 0.6  # the other death cell is untouched
    assert cells["label=1|age_group=<18"]["skipped"] == "fewer than 20 members or non-members"
    md = render_markdown(leaky)
    assert "| membership inference by likelihood among label=1\\|gender=F patients (32 members, 38 non-members) |" in md
    assert "| label=1\\|gender=F | 32 | 38 |" in md and "label=1|age_group=<18 (2 / 2)" in md


def test_cli_writes_both_files_and_refuses_to_overwrite(tmp_path, tiny, syn, capsys):
    tiny.save(tmp_path / "real")
    syn.save(tmp_path / "syn")
    out = tmp_path / "report"
    main(["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"), "--out", str(out),
          "--cells", "gender,age_group", "--sensitive-token", "dx9:428", "--min-cell-records", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["inputs"]["real"] == str(tmp_path / "real") and rep["parameters"]["cells"] == [["gender", "age_group"]]
    assert all(c["groups"] == ["gender", "age_group"] for c in rep["fidelity"]["cells"])
    assert "token:dx9:428" in rep["privacy"]["attribute_inference"]["attributes"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Synthetic data evaluation")
    # the report opens with the verdict, before the data and fidelity sections
    assert md.index("## Privacy verdict") < md.index("- **real**") < md.index("## Fidelity")
    assert f"**{rep['privacy']['verdict']['text']}**" in md and "Incomplete" in rep["privacy"]["verdict"]["text"]
    printed = capsys.readouterr().out
    assert "exact copies 2" in printed and f"privacy verdict: {rep['privacy']['verdict']['text']}" in printed
    argv = ["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"), "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        run(main, argv)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(main, argv + ["--overwrite"])
    assert exc.value.code == 0 and json.loads((out / "report.json").read_text())["parameters"]["cells"] is None


def test_module_entry_point_reports_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "halo_balance.evaluate", "--real", str(tmp_path / "nope"),
                           "--synthetic", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "prepared dataset folder not found" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_model_wiring(tmp_path, tiny, syn, holdout):
    import torch

    from halo_balance.config import ConditionLayout, HaloConfig
    from halo_balance.model import HaloModel
    from halo_balance.privacy import likelihood_membership_inference
    from halo_balance.train import dataset_log_likelihood

    torch.manual_seed(0)
    config = HaloConfig.from_preset("tiny", vocab_size=tiny.vocab_size,
                                    n_conditions=ConditionLayout.from_dataset(tiny).n_slots)
    model = HaloModel.for_dataset(tiny, config)
    model.save_pretrained(tmp_path / "model")
    for name, ds in (("real", tiny), ("syn", syn), ("holdout", holdout)):
        ds.save(tmp_path / name)
    rep = main(["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"), "--holdout",
                str(tmp_path / "holdout"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                "--device", "cpu"])
    got = rep["privacy"]["membership_inference"]["likelihood"]
    loaded = HaloModel.from_pretrained(tmp_path / "model")
    expected = likelihood_membership_inference(dataset_log_likelihood(loaded, tiny, device="cpu"),
                                               dataset_log_likelihood(loaded, holdout, device="cpu"))
    assert got["auroc"] == pytest.approx(expected["auroc"]) and got["n_members"] == 4
    assert rep["parameters"]["likelihood"] and "torch" in rep["versions"]
    attacks = {a["attack"] for a in rep["privacy"]["verdict"]["attacks"]}
    assert {"membership inference by likelihood", "membership inference by likelihood per token"} <= attacks
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| membership inference by likelihood per token |" in md
    assert "- **Membership inference by likelihood per token" in md
    assert rep["privacy"]["verdict"]["dp"] is None
    # a DP model's guarantee is part of the verdict
    model.privacy = {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}
    model.save_pretrained(tmp_path / "model")
    rep = main(["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"), "--holdout",
                str(tmp_path / "holdout"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                "--device", "cpu", "--overwrite"])
    assert "differentially private (epsilon 3.00" in rep["privacy"]["verdict"]["text"]
    # a trained model's folder names its early-stopping patients; they stop counting as members
    (tmp_path / "model" / "training.json").write_text(json.dumps({"validation_patient_ids": ["a"]}))
    rep = main(["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "syn"), "--holdout",
                str(tmp_path / "holdout"), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                "--device", "cpu", "--overwrite"])
    assert rep["privacy"]["membership_inference"]["likelihood"]["n_members"] == 3


def test_early_stopping_patients_are_not_counted_as_members(tiny, syn, holdout):
    def log_likelihood(ds):
        return -np.arange(ds.n_patients, dtype=float)

    full = evaluate(tiny, syn, holdout=holdout, log_likelihood=log_likelihood)
    ids = tiny.patients["patient_id"].to_list()
    rep = evaluate(tiny, syn, holdout=holdout, log_likelihood=log_likelihood, not_members=[ids[0], "not-a-patient"])
    for attack in ("distance", "likelihood"):
        assert full["privacy"]["membership_inference"][attack]["n_members"] == 4
        assert rep["privacy"]["membership_inference"][attack]["n_members"] == 3
    assert rep["data"]["not_members"] == 1 and any("early-stopping" in n for n in rep["notes"])
    # everything that is not a membership attack still sees every training patient
    assert rep["privacy"]["exact_copies"] == full["privacy"]["exact_copies"]
    assert rep["fidelity"] == full["fidelity"]
