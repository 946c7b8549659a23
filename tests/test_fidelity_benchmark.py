"""``python -m benchmarks.fidelity``: every statistic beside its size-matched ceiling, shapes and cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import fidelity as bench
from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.fidelity import STATISTICS, code_statistics, compare_statistics, record_shape, size_matched_r2


@pytest.fixture(scope="module")
def split(sim_prepared, tmp_path_factory):
    """The simulated cohort as 450 training and 150 reference patients (saved)."""
    data = PreparedDataset.load(sim_prepared)
    train_ids, ref_ids = data.train_test_split(0.25, seed=0)
    base = tmp_path_factory.mktemp("fidelity_split")
    data.select(train_ids).save(base / "train")
    data.select(ref_ids).save(base / "reference")
    return base / "train", base / "reference"


def test_exact_ceiling_from_n_reference_records(split, sim_model, tmp_path, capsys):
    train_dir, ref_dir = split
    out = tmp_path / "run"
    result = bench.main(["--data", str(train_dir), "--reference", str(ref_dir), "--model", str(sim_model),
                         "--out", str(out), "--count", "100", "--seed", "3", "--cells", "race"])
    train, reference = PreparedDataset.load(train_dir), PreparedDataset.load(ref_dir)
    synthetic = PreparedDataset.load(out / "synthetic")
    assert synthetic.n_patients == 100 and synthetic.patients["synthetic"].all()
    assert result["ceiling"] == {"matching": "exact", "sizes": [train.n_patients, 100], "source": "reference"}
    _, drawn, _ = bench.ceiling_source(train, reference, 100, seed=3)
    assert drawn.n_patients == 100 and set(drawn.patients["patient_id"]) <= set(reference.patients["patient_id"])
    want = compare_statistics(code_statistics(train), code_statistics(drawn))
    versus = compare_statistics(code_statistics(train), code_statistics(synthetic))
    held = compare_statistics(code_statistics(reference), code_statistics(synthetic))
    for name in STATISTICS:
        s = result["statistics"][name]
        assert s["ceiling"] == s["ceiling_raw"] == want[name]["r2"] and s["r2"] == versus[name]["r2"]
        assert s["vs_reference"] == held[name]["r2"]
    assert result["shape"]["synthetic"] == record_shape(synthetic) and result["shape"]["real_N"] == record_shape(drawn)
    assert {c["cell"].split("|")[1] for c in result["cells"]} <= {f"race={r}" for r in train.group_categories["race"]}
    assert not (out / "model").exists()  # the given model is used, not copied
    saved = json.loads((out / "fidelity.json").read_text())
    assert saved["statistics"] == json.loads(json.dumps(result["statistics"]))
    printed = capsys.readouterr().out
    assert all(name in printed for name in STATISTICS) and "empty visits" in printed and "distinct tokens" in printed


def test_scaled_ceiling_without_enough_reference_records(split, sim_model, tmp_path):
    train_dir, _ = split
    train = PreparedDataset.load(train_dir)
    result = bench.main(["--data", str(train_dir), "--model", str(sim_model), "--out", str(tmp_path / "halves"),
                         "--count", "300"])
    c = result["ceiling"]
    assert c["matching"] == "scaled" and c["source"] == "halves" and sum(c["sizes"]) == train.n_patients
    for name in STATISTICS:
        s = result["statistics"][name]
        assert s["ceiling"] == pytest.approx(size_matched_r2(s["ceiling_raw"], sizes=tuple(c["sizes"]),
                                                             target=(train.n_patients, 300)))
        assert "vs_reference" not in s
    resampled = result["shape"]["real_N"]
    assert result["shape"]["real_N_source"] == "training records resampled" and resampled["n_records"] == 300
    assert resampled["distinct_tokens"] <= result["shape"]["train"]["distinct_tokens"]
    cell = next(r for r in result["cells"] if r["unigram_per_visit_ceiling"] is not None)
    assert cell["unigram_per_visit_ceiling"] > cell["unigram_per_visit_ceiling_raw"]  # larger samples agree better


def test_trains_with_the_given_options_and_refuses_bad_ones(split, tmp_path, capsys):
    train_dir, ref_dir = split
    result = bench.main(["--data", str(train_dir), "--reference", str(ref_dir), "--out", str(tmp_path / "t"),
                         "--train-options", '{"preset": "tiny", "epochs": 1}'])
    info = json.loads((tmp_path / "t" / "model" / "training.json").read_text())
    assert info["options"]["epochs"] == 1 and result["n_synthetic"] == result["n_train"] == info["n_train"] + info["n_val"]
    assert result["timing"]["threads"] >= 1 and result["timing"]["train_cpu_seconds"] > 0
    assert not (tmp_path / "t" / "model" / "checkpoint").exists()
    with pytest.raises(SystemExit) as exc:
        run(bench.main, ["--data", str(train_dir), "--out", str(tmp_path / "bad"), "--train-options", "{preset"])
    assert exc.value.code == 2 and "argument --train-options: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_draws_report_the_mean_of_independent_samples(split, sim_model, tmp_path, capsys, monkeypatch):
    from halo_balance.model import HaloModel
    from halo_balance.sample import sample_records

    train_dir, ref_dir = split
    calls = []
    monkeypatch.setattr(bench, "code_statistics", lambda d, **kw: calls.append(d.n_patients) or code_statistics(d, **kw))
    result = bench.main(["--data", str(train_dir), "--reference", str(ref_dir), "--model", str(sim_model),
                         "--out", str(tmp_path / "d"), "--count", "120", "--seed", "3", "--draws", "2",
                         "--cells", "race", "--min-cell-records", "5"])
    assert result["seeds"][0] == 3 and len(set(result["seeds"])) == 2
    # the real side (training data, the drawn reference records, the reference) once; each draw once
    assert len(calls) == 3 + 2
    monkeypatch.undo()
    train, reference = PreparedDataset.load(train_dir), PreparedDataset.load(ref_dir)
    model = HaloModel.from_pretrained(sim_model)
    draws = [sample_records(model, model.layout.complete({}, 120, seed=s), seed=s, device="cpu", progress=False)
             for s in result["seeds"]]
    saved = PreparedDataset.load(tmp_path / "d" / "synthetic")  # the first draw
    assert saved.visits["codes"].to_list() == draws[0].visits["codes"].to_list()
    single = [bench.score(train, d, reference=reference, seed=3, cells=[["race"]], min_cell_records=5) for d in draws]
    for name in STATISTICS:
        s = result["statistics"][name]
        assert s["r2"] == pytest.approx(np.mean([r["statistics"][name]["r2"] for r in single]))
        assert s["ceiling"] == single[0]["statistics"][name]["ceiling"] == single[1]["statistics"][name]["ceiling"]
    compared = 0
    for row in result["cells"]:
        values = [next(c for c in r["cells"] if c["cell"] == row["cell"])["unigram_per_visit"] for r in single]
        if None in values:
            assert row["unigram_per_visit"] is None and row["unigram_per_visit_sd"] is None
            continue
        compared += 1
        assert row["unigram_per_visit"] == pytest.approx(np.mean(values))
        assert row["unigram_per_visit_sd"] == pytest.approx(np.std(values, ddof=1)) and row["unigram_per_visit_sd"] > 0
    assert compared >= 2 and "mean of 2 draws" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        run(bench.main, ["--data", str(train_dir), "--out", str(tmp_path / "bad"), "--draws", "0"])
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()
