"""Training: learning, the marginal baseline, checkpoints and resume, DDP, the likelihood, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from halo_balance.cli import run
from halo_balance.config import ConditionLayout
from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError, IncompatibleModelError, OutputExistsError
from halo_balance.model import HaloModel
from halo_balance.train import (EncodedRecords, MarginalModel, TrainOptions, add_train_arguments, bucket_batches,
                                collate, dataset_log_likelihood, main, train_model, train_options_from_args)
from tests.conftest import REPO, make_learnable_dataset

TINY = dict(preset="tiny", device="cpu", batch_size=32)


@pytest.fixture(scope="module")
def small_cohort():
    return make_learnable_dataset(160, seed=3)


def test_tiny_model_learns_well_below_the_marginal_model(sim_prepared, tmp_path):
    data = PreparedDataset.load(sim_prepared)
    model = train_model(data, out_dir=tmp_path / "m", options=TrainOptions(
        **TINY, epochs=10, patience=10, lr=1e-2, seed=0), progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert info["loss_unit"] == "nats per visit" and info["n_train"] + info["n_val"] == data.n_patients
    assert len(info["validation_patient_ids"]) == info["n_val"] > 0
    assert set(info["validation_patient_ids"]) <= set(data.patients["patient_id"].to_list())
    # it starts at the marginal model (the exclusive lab bins take several percent off within the first epoch)
    assert info["history"][0]["train_loss"] > 0.85 * info["marginal_train_loss"]
    assert info["history"][-1]["train_loss"] < 0.8 * info["marginal_train_loss"]
    assert info["best_loss"] < info["marginal_val_loss"]  # and held-out patients are likelier too
    assert not model.training and isinstance(model, HaloModel)


def test_marginal_model_matches_a_direct_computation(tiny):
    enc = EncodedRecords.from_dataset(tiny, ConditionLayout.from_dataset(tiny), n_ctx=10)
    m = MarginalModel.fit(enc, tiny.vocab_size)
    visits = [v for p in range(tiny.n_patients) for v in tiny.records().patient(p)]
    p = m.code_frequency
    code_nll = -sum(np.log(np.where(np.isin(np.arange(5), v), p, 1 - p)).sum() for v in visits)
    # end bits: "end" after every last visit (4), "not end" before visits 2.. (2 of patient b)
    end_nll = -(4 * np.log(m.end_rate) + 2 * np.log1p(-m.end_rate))
    assert m.loss(enc) == pytest.approx((code_nll + end_nll) / len(visits))
    assert m.code_frequency[0] == pytest.approx((2 + 0.5) / (6 + 1))
    # per record: b (three visits) has two "not end" bits and its end; the others one visit and an end
    per_record = [-sum(np.log(np.where(np.isin(np.arange(5), v), p, 1 - p)).sum() for v in tiny.records().patient(i))
                  for i in range(4)]
    ends = np.log(m.end_rate) + np.array([0, 2, 0, 0]) * np.log1p(-m.end_rate)
    assert m.record_log_likelihood(enc) == pytest.approx(-np.array(per_record) + ends)
    # a record that reaches n_ctx - 1 visits ends by force: no end bit
    short = EncodedRecords.from_dataset(tiny, ConditionLayout.from_dataset(tiny), n_ctx=4)
    assert m.record_log_likelihood(short)[1] == pytest.approx(-per_record[1] + 2 * np.log1p(-m.end_rate))


def test_batches_are_bucketed_by_length(learnable):
    enc = EncodedRecords.from_dataset(learnable, ConditionLayout.from_dataset(learnable), n_ctx=16)
    batches = bucket_batches(enc.lengths, 64, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(learnable.n_patients))
    padded = sum(len(b) * enc.lengths[b].max() for b in batches)
    ordered = np.sort(enc.lengths)
    assert padded == sum(len(c) * c.max() for c in np.array_split(ordered, range(64, len(ordered), 64)))
    shuffled = np.random.default_rng(0).permutation(enc.lengths)
    assert padded < 0.7 * sum(len(c) * c.max() for c in np.array_split(shuffled, range(64, len(ordered), 64)))
    assert min(collate(enc, b).n_positions for b in batches) == 2  # one-visit batches use 2 positions


def test_long_records_keep_their_last_visits(learnable):
    enc = EncodedRecords.from_dataset(learnable, ConditionLayout.from_dataset(learnable), n_ctx=3)
    rec = learnable.records()
    assert enc.lengths.max() == 2 and enc.n_truncated == int((rec.visit_counts() > 2).sum()) > 0
    p = int(np.flatnonzero(rec.visit_counts() == 4)[0])
    kept = [enc.codes[enc.code_ptr[v]:enc.code_ptr[v + 1]].tolist() for v in enc.visit_ids(np.array([p]))]
    assert kept == rec.patient(p)[-2:]


def test_resume_continues_from_the_saved_epoch(small_cohort, tmp_path):
    opts = dict(**TINY, seed=1, patience=10)
    train_model(small_cohort, out_dir=tmp_path / "full", options=TrainOptions(**opts, epochs=4), progress=False)
    # a run stopped after two epochs, then resumed to four
    train_model(small_cohort, out_dir=tmp_path / "cut", options=TrainOptions(**opts, epochs=2), progress=False)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2
    resumed = train_model(small_cohort, out_dir=tmp_path / "cut", options=TrainOptions(**opts, epochs=4, resume=True),
                          progress=False)
    full = json.loads((tmp_path / "full" / "training.json").read_text())["history"]
    cut = json.loads((tmp_path / "cut" / "training.json").read_text())["history"]
    assert [h["epoch"] for h in cut] == [1, 2, 3, 4]
    # the same batches, dropout seeds, optimizer state and schedule: the same losses as one run
    for a, b in zip(full, cut):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    reference = HaloModel.from_pretrained(tmp_path / "full")
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_early_stopping_keeps_the_best_epoch(small_cohort, tmp_path):
    model = train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(
        **{**TINY, "batch_size": 8}, epochs=30, patience=1, lr=0.05, seed=0, max_gap=None, refit_biases=False,
        refit_conditions=False),
        progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    vals = [h["val_loss"] for h in info["history"]]
    assert info["early_stopped"] and len(vals) < 30
    assert info["best_loss"] == min(vals) and vals[info["best_epoch"] - 1] == min(vals)
    enc = small_cohort.select(json.loads((tmp_path / "m" / "checkpoint" / "state.json").read_text())["val_ids"])
    val_nll = -dataset_log_likelihood(model, enc, device="cpu").sum()
    assert val_nll / enc.n_visits == pytest.approx(min(vals), rel=1e-4)  # the saved weights are the best epoch's


def test_output_folder_rules(small_cohort, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        train_model(small_cohort, out_dir=out, options=TrainOptions(**TINY, epochs=1), progress=False)
    assert (out / "keep.txt").exists()
    with pytest.raises(HaloBalanceError, match="nothing to resume"):
        train_model(small_cohort, out_dir=tmp_path / "new", options=TrainOptions(**TINY, epochs=1, resume=True),
                    progress=False)
    with pytest.raises(HaloBalanceError, match="val_fraction"):
        TrainOptions(val_fraction=1.5).validate()


def test_dataset_log_likelihood_order_and_compatibility(small_cohort, tmp_path):
    model = train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(**TINY, epochs=1), progress=False)
    ll = dataset_log_likelihood(model, small_cohort, batch_size=7, device="cpu")
    assert ll.shape == (small_cohort.n_patients,) and np.all(ll < 0)
    reversed_ids = small_cohort.patients["patient_id"].reverse().to_list()
    flipped = type(small_cohort)(small_cohort.visits, small_cohort.patients.reverse(), small_cohort.vocab,
                                 small_cohort.meta)
    assert flipped.patients["patient_id"].to_list() == reversed_ids
    np.testing.assert_allclose(dataset_log_likelihood(model, flipped, device="cpu"), ll[::-1], rtol=1e-5)
    # the likelihood is of the record given its conditions: other conditions, other values
    other = type(small_cohort)(small_cohort.visits, small_cohort.patients.with_columns(label=1 - pl.col("label")),
                               small_cohort.vocab, small_cohort.meta)
    assert not np.allclose(dataset_log_likelihood(model, other, device="cpu"), ll)
    meta = {**small_cohort.meta, "groups": {"gender": ["F", "M"]}}
    with pytest.raises(IncompatibleModelError):
        dataset_log_likelihood(model, type(small_cohort)(small_cohort.visits, small_cohort.patients,
                                                          small_cohort.vocab, meta))


def test_cli_options_round_trip():
    parser = add_train_arguments(argparse.ArgumentParser())
    opts = train_options_from_args(parser.parse_args(["--preset", "tiny", "--epochs", "3", "--lr", "0.01",
                                                      "--device", "cpu", "--resume", "--n-ctx", "8"]))
    assert opts == TrainOptions(preset="tiny", epochs=3, lr=0.01, device="cpu", resume=True, n_ctx=8)
    assert train_options_from_args(parser.parse_args([])) == TrainOptions()


def test_cli_trains_and_reports_errors(small_cohort, tmp_path, capsys):
    small_cohort.save(tmp_path / "data")
    main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--preset", "tiny", "--epochs", "1",
          "--device", "cpu"])
    assert HaloModel.from_pretrained(tmp_path / "m").config.preset == "tiny"
    assert "marginal-frequency" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(main, ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--epochs", "1"])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err


def test_ddp_with_two_cpu_processes(small_cohort, tmp_path):
    small_cohort.save(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "halo_balance.train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m"),
           "--preset", "tiny", "--epochs", "2", "--device", "cpu", "--batch-size", "16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert info["world_size"] == 2 and len(info["history"]) == 2
    for folder in (tmp_path / "m", tmp_path / "m" / "checkpoint"):
        model = HaloModel.from_pretrained(folder)
        assert np.all(np.isfinite(dataset_log_likelihood(model, small_cohort, device="cpu")))
    assert Path(tmp_path / "m" / "checkpoint" / "optimizer.safetensors").is_file()


@pytest.mark.slow
def test_small_model_on_the_eicu_demo(eicu_prepared, tmp_path):
    """The issue's real-data check: the small preset on the eICU demo, on CPU (about a minute)."""
    data = PreparedDataset.load(eicu_prepared)
    model = train_model(data, out_dir=tmp_path / "m", options=TrainOptions(preset="small", device="cpu", seed=0),
                        progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert info["best_loss"] < 0.9 * info["marginal_val_loss"]
    from halo_balance.sample import sample_records

    synthetic = sample_records(model, model.layout.complete({}, 200, seed=0), device="cpu", progress=False)
    assert PreparedDataset.concat([data, synthetic]).validate().n_patients == data.n_patients + 200


def test_the_chosen_epoch_keeps_within_the_generalisation_gap(small_cohort, tmp_path, monkeypatch):
    """The best validation loss among the epochs whose gap is within the limit (scripted losses)."""
    import halo_balance.train as train_module

    val = iter([10.0, 9.0, 8.0, 7.5, 7.4, 7.6, 7.7])
    fit = iter([10.0, 9.0, 7.9, 6.8, 6.0, 5.5, 5.0])  # the model comes to know its patients better and better
    monkeypatch.setattr(train_module._Trainer, "_validate",
                        lambda self, fit_rows=None: next(val) if fit_rows is None else next(fit))
    monkeypatch.setattr(train_module._Trainer, "finish", lambda self: self.loop)
    monkeypatch.setattr(train_module.MarginalModel, "loss", lambda self, enc: 30.0)  # samples alike: no own gap
    loop = train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(
        **TINY, epochs=7, patience=3, seed=0, max_gap=0.1), progress=False)
    gaps = np.array([h["gap"] for h in loop.history])
    assert np.allclose(gaps, [0.0, 0.0, 0.1 / 8, 0.7 / 7.5, 1.4 / 7.4, 2.1 / 7.6, 2.7 / 7.7])
    # within 0.1 up to epoch 4 (val 7.5), not from epoch 5 (val 7.4, the lowest) on
    assert loop.best_epoch == 4 and loop.best_val == 7.5 and len(loop.history) == 7


def test_bias_refit_matches_expected_and_observed_code_counts(small_cohort, tmp_path):
    """Without shrinkage, the refit biases make every code's expected count over the training visits
    (teacher forced) equal its count, and the end bits' too."""
    from halo_balance.train import refit_output_biases

    model = train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(
        **TINY, epochs=2, seed=0, refit_biases=False, val_fraction=0.0), progress=False)
    enc = EncodedRecords.from_dataset(small_cohort, model.layout, model.config.n_ctx)
    rows = np.arange(len(enc))
    before = -dataset_log_likelihood(model, small_cohort, device="cpu").sum()
    refit_output_biases(model, enc, rows, batch_size=64, device=torch.device("cpu"), shrinkage=0.0, iterations=30)
    after = -dataset_log_likelihood(model, small_cohort, device="cpu").sum()
    assert after < before
    batch = collate(enc, rows)
    with torch.no_grad():
        h = model.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions).flatten(0, 1)
        visits = h[batch.target_hidden]
        nonempty = batch.code_ptr[1:] > batch.code_ptr[:-1]
        p = torch.sigmoid(model.fine.logits(visits, batch.visit_codes, batch.code_ptr)).double()
        # with the empty-visit event the codes are fitted given that the visit holds one
        first = torch.sigmoid(model.fine.out(model.fine.state(model.fine.proj(visits)))).double()
        correction = first / torch.expm1(model.fine.chain_hazard(visits).double())[:, None]
        counts = torch.bincount(batch.visit_codes, minlength=model.config.vocab_size).double()
        gradient = ((p + correction) * nonempty[:, None]).sum(0) - counts  # of the likelihood, per code bias
        T = batch.n_positions
        end = torch.sigmoid(model.end_logit(h[batch.end_hidden], batch.end_hidden % T).double())
        empty = torch.sigmoid(model.fine.empty_logit(visits, batch.target_hidden % T).double())
    seen = counts > 0
    assert torch.allclose(gradient[seen], torch.zeros_like(gradient[seen]), atol=1e-3)
    assert float(end.sum()) == pytest.approx(float(batch.end_target.sum()), rel=1e-4)
    assert float(empty.sum()) == pytest.approx(float((~nonempty).sum()), rel=1e-4, abs=1e-3)


def test_pair_refit_matches_expected_and_observed_pair_counts(small_cohort, tmp_path):
    """Without shrinkage, the fitted pair terms make every pair's expected count (code i's
    probability over the training visits that hold j, teacher forced) equal the visits holding
    both, and the code biases still match every code's count; the likelihood improves."""
    from halo_balance.pairs import shared_pairs
    from halo_balance.train import refit_output_biases

    model = train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(
        **TINY, epochs=2, seed=0, val_fraction=0.0, pair_min_patients=25, cell_min_patients=0),
        progress=False)  # with pair terms only
    assert model.config.n_pairs > 0 and model.fine.pair_weight.abs().max() > 0.1
    enc = EncodedRecords.from_dataset(small_cohort, model.layout, model.config.n_ctx)
    rows = np.arange(len(enc))
    pairs, _ = shared_pairs(*enc.ragged(rows), vocab_size=model.config.vocab_size, min_patients=10)
    before = -dataset_log_likelihood(model, small_cohort, device="cpu").sum()
    refit_output_biases(model, enc, rows, batch_size=64, device=torch.device("cpu"), shrinkage=1e-9,
                        iterations=30, pair_iterations=300, pairs=pairs, pair_shrinkage=1e-9)
    after = -dataset_log_likelihood(model, small_cohort, device="cpu").sum()
    assert model.config.n_pairs == len(pairs) > 20 and after < before
    batch = collate(enc, rows)
    with torch.no_grad():
        h = model.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions).flatten(0, 1)
        visits = h[batch.target_hidden]
        p = torch.sigmoid(model.fine.logits(visits, batch.visit_codes, batch.code_ptr)).double()
        first = torch.sigmoid(model.fine.out(model.fine.state(model.fine.proj(visits)))).double()
        correction = first / torch.expm1(model.fine.chain_hazard(visits).double())[:, None]
    x = torch.zeros_like(p)
    x[torch.repeat_interleave(torch.arange(len(p)), batch.code_ptr.diff()), batch.visit_codes] = 1.0
    nonempty = x.sum(1, keepdim=True) > 0
    j, i = torch.from_numpy(pairs).T
    expected = (x[:, j] * p[:, i]).sum(0)
    observed = (x[:, j] * x[:, i]).sum(0)
    torch.testing.assert_close(expected, observed, rtol=0, atol=2e-2)
    gradient = ((p + correction) * nonempty).sum(0) - x.sum(0)
    seen = x.sum(0) > 0
    assert torch.allclose(gradient[seen], torch.zeros_like(gradient[seen]), atol=1e-2)


def test_significant_misses_control_the_false_discovery_rate():
    """Among 100,000 scores of pure noise two standard errors pass about 4.6% and the false
    discovery rate keeps almost none; 300 real misses of 6 standard errors planted among them are
    all kept, strongest first, with noise making up about a tenth of those kept (the rate asked)."""
    from halo_balance.train import significant_misses

    z = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alone = significant_misses(z, min_score=2.0)
    assert 0.04 < len(alone) / len(z) < 0.05
    assert len(significant_misses(z, min_score=2.0, max_fdr=0.1)) <= 3
    z[:300] = torch.where(torch.arange(300) % 2 == 0, 6.0, -6.0).double() + 0.1 * z[:300]
    kept = significant_misses(z, min_score=2.0, max_fdr=0.1)
    assert set(range(300)) <= set(kept.tolist()) and 0.02 < 1 - 300 / len(kept) < 0.15
    assert torch.all(z[kept].abs().diff() <= 0) and len(significant_misses(z, min_score=2.0, max_fdr=0.1, cap=5)) == 5
    with pytest.raises(HaloBalanceError, match="pair_max_fdr"):
        TrainOptions(pair_max_fdr=0.0).validate()


def test_pair_terms_only_for_pairs_enough_patients_share(small_cohort, tmp_path):
    """The threshold decides which pairs get a term; 0 gives none, and so does DP training."""
    from halo_balance.pairs import shared_pairs

    enc = EncodedRecords.from_dataset(small_cohort, ConditionLayout.from_dataset(small_cohort), 6)
    _, counts = shared_pairs(*enc.ragged(np.arange(len(enc))), vocab_size=small_cohort.vocab_size, min_patients=1)
    sizes, candidates = {}, {}
    for n, z in ((0, 2.0), (30, 0.0), (30, 5.0), (30, 1e6)):
        model = train_model(small_cohort, out_dir=tmp_path / f"m{n}-{z}", options=TrainOptions(
            **TINY, epochs=1, seed=0, pair_min_patients=n, pair_min_score=z, pair_max_fdr=1.0), progress=False)
        info = json.loads((tmp_path / f"m{n}-{z}" / "training.json").read_text())
        sizes[n, z], candidates[n, z] = model.config.n_pairs, info["bias_refit"].get("pair_candidates", 0)
        assert HaloModel.from_pretrained(tmp_path / f"m{n}-{z}").config.n_pairs == sizes[n, z]
        assert info["bias_refit"].get("pairs", 0) == sizes[n, z]
    assert sizes[0, 2.0] == candidates[0, 2.0] == 0
    # candidates counted on the training patients only (the validation tenth left out): at most those of all
    assert 0 < candidates[30, 0.0] == candidates[30, 5.0] == candidates[30, 1e6] <= int((counts >= 30).sum())
    # every candidate at score 0; those the model misses by 5 standard errors; none beyond any score
    assert sizes[30, 0.0] == candidates[30, 0.0] > sizes[30, 5.0] > sizes[30, 1e6] == 0
    private = train_model(small_cohort, out_dir=tmp_path / "dp", options=TrainOptions(
        **TINY, epochs=1, seed=0, dp_epsilon=8.0), progress=False)
    assert private.config.n_pairs == 0 and private.fine.pair_index is None
    with pytest.raises(HaloBalanceError, match="pair_min_patients"):
        TrainOptions(pair_min_patients=-1).validate()


def test_cell_refit_matches_expected_and_observed_counts_in_each_cell(small_cohort, tmp_path):
    """The fitted cell terms are the penalised maximum: each term's code is as likely over the visits
    of its crossing's records (teacher forced, given that the visit holds a code) as it is there,
    up to the penalty's pull towards 0; the code biases (no shrinkage) still match every code's
    count over all visits; the likelihood improves. 40 steps reach it (a joint step per code)."""
    from halo_balance.train import refit_output_biases

    model = train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(
        **TINY, epochs=2, seed=0, val_fraction=0.0, cell_min_patients=20, pair_min_patients=0),
        progress=False)  # with cell terms, without pair terms
    assert model.config.n_cell_terms > 0 and model.fine.cell_weight.abs().max() > 0.1
    assert HaloModel.from_pretrained(tmp_path / "m").config.n_cell_terms == model.config.n_cell_terms
    enc = EncodedRecords.from_dataset(small_cohort, model.layout, model.config.n_ctx)
    rows = np.arange(len(enc))
    before = -dataset_log_likelihood(model, small_cohort, device="cpu").sum()
    info = refit_output_biases(model, enc, rows, batch_size=64, device=torch.device("cpu"), shrinkage=1e-9,
                               iterations=30, pair_iterations=40, cell_min_patients=10, cell_min_score=0.0,
                               cell_shrinkage=1.0)
    after = -dataset_log_likelihood(model, small_cohort, device="cpu").sum()
    assert model.config.n_cell_terms == info["cell_candidates"] > 20 and after < before
    batch = collate(enc, rows)
    with torch.no_grad():
        h = model.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions).flatten(0, 1)
        visits = h[batch.target_hidden]
        offset = model.code_offsets(batch.cond)[batch.target_record]
        p = torch.sigmoid(model.fine.logits(visits, batch.visit_codes, batch.code_ptr) + offset).double()
        first = torch.sigmoid(model.fine.first_logits(visits, offset)).double()
        correction = first / torch.expm1(model.fine.chain_hazard(visits, offset=offset).double())[:, None]
    x = torch.zeros_like(p)
    x[torch.repeat_interleave(torch.arange(len(p)), batch.code_ptr.diff()), batch.visit_codes] = 1.0
    gradient = (p + correction) * (x.sum(1, keepdim=True) > 0) - x
    crossing = model.crossings(batch.cond)[batch.target_record]
    s, i = model.fine.cell_index.T
    in_cell = (crossing[:, :, None] == s).any(1).double()  # (visits, terms)
    per_term = (in_cell * gradient[:, i]).sum(0) + 1.0 * model.fine.cell_weight.double()  # the penalty's part
    torch.testing.assert_close(per_term, torch.zeros_like(per_term), rtol=0, atol=1e-3)
    seen = x.sum(0) > 0
    assert torch.allclose(gradient.sum(0)[seen], torch.zeros(int(seen.sum()), dtype=torch.float64), atol=1e-3)
    assert model.fine.cell_weight.abs().max() > 0.3


def test_cell_terms_only_for_codes_enough_of_a_cells_patients_hold(small_cohort, tmp_path):
    """The threshold decides which (crossing, code) pairs are candidates; 0 gives none, so does DP."""
    sizes, candidates = {}, {}
    for n, z in ((0, 2.0), (15, 0.0), (15, 1e6), (150, 0.0)):
        model = train_model(small_cohort, out_dir=tmp_path / f"m{n}-{z}", options=TrainOptions(
            **TINY, epochs=1, seed=0, cell_min_patients=n, cell_min_score=z), progress=False)
        info = json.loads((tmp_path / f"m{n}-{z}" / "training.json").read_text())
        sizes[n, z], candidates[n, z] = model.config.n_cell_terms, info["bias_refit"].get("cell_candidates", 0)
        assert info["bias_refit"].get("cell_terms", 0) == sizes[n, z]
        if sizes[n, z]:  # each term's code is held by at least n training patients of its crossing
            train_ids = set(small_cohort.patients["patient_id"].to_list()) - set(info["validation_patient_ids"])
            rec = small_cohort.records()
            cross = model.crossings(torch.from_numpy(model.layout.encode(small_cohort.patients))).numpy()
            ids = small_cohort.patients["patient_id"].to_list()
            for s, i in model.fine.cell_index.tolist()[:25]:
                holders = sum(ids[r] in train_ids and s in cross[r] and
                              i in rec.codes[rec.code_ptr[rec.visit_ptr[r]]:rec.code_ptr[rec.visit_ptr[r + 1]]]
                              for r in range(len(ids)))
                assert holders >= n, (s, i, holders)
    assert sizes[0, 2.0] == candidates[0, 2.0] == 0
    V = small_cohort.vocab_size  # at most V terms: the strongest
    assert sizes[15, 0.0] == min(candidates[15, 0.0], V) and candidates[15, 0.0] > V
    assert candidates[15, 1e6] == candidates[15, 0.0] > candidates[150, 0.0] == sizes[15, 1e6] == 0
    private = train_model(small_cohort, out_dir=tmp_path / "dp", options=TrainOptions(
        **TINY, epochs=1, seed=0, dp_epsilon=8.0, cell_min_patients=15), progress=False)
    assert private.config.n_cell_terms == 0 and private.fine.cell_index is None
    with pytest.raises(HaloBalanceError, match="cell_min_patients"):
        TrainOptions(cell_min_patients=-1).validate()


def test_default_training_reproduces_record_lengths(tmp_path):
    """Every record weighs the same and the end bias is refitted: the sampled lengths match the data's."""
    from halo_balance.sample import sample_records

    data = make_learnable_dataset(600, seed=4)
    model = train_model(data, out_dir=tmp_path / "m", options=TrainOptions(
        **TINY, epochs=8, lr=3e-3, seed=0), progress=False)
    real = data.records().visit_counts()
    synthetic = sample_records(model, model.layout.complete({}, 3000, seed=0), seed=0, device="cpu",
                               progress=False).records().visit_counts()
    assert abs((synthetic == 1).mean() - (real == 1).mean()) < 0.03
    assert abs(synthetic.mean() - real.mean()) < 0.1


def test_condition_refit_keeps_only_epochs_that_lower_the_validation_loss(tmp_path):
    data = make_learnable_dataset(300, seed=6)
    train_model(data, out_dir=tmp_path / "m", options=TrainOptions(**TINY, epochs=3, seed=0, refit_biases=False),
                progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    refit = info["condition_refit"]
    kept = [h["val_loss"] for h in refit["history"] if h["val_loss"] <= refit["val_loss"]]
    assert refit["val_loss"] <= info["best_loss"] and refit["history"]
    assert kept == sorted(kept, reverse=True)  # each kept epoch lowered the validation loss
    model = HaloModel.from_pretrained(tmp_path / "m")
    enc = data.select(info["validation_patient_ids"])
    assert -dataset_log_likelihood(model, enc, device="cpu").sum() / enc.n_visits == pytest.approx(refit["val_loss"],
                                                                                                   rel=1e-4)


def test_condition_embeddings_learn_at_their_own_rate(small_cohort, tmp_path):
    opts = dict(**TINY, epochs=2, patience=5, seed=0, max_gap=None, refit_biases=False, refit_conditions=False)
    moved = {}
    for scale in (1.0, 10.0):
        model = train_model(small_cohort, out_dir=tmp_path / f"m{scale:g}", progress=False,
                            options=TrainOptions(**opts, condition_lr_scale=scale))
        moved[scale] = model.cond_out.weight.abs().mean().item()  # starts at zero
    assert moved[10.0] > 4 * moved[1.0] > 0
    with pytest.raises(HaloBalanceError, match="condition_lr_scale must be > 0"):
        TrainOptions(condition_lr_scale=0).validate()


def test_resume_refuses_a_checkpoint_of_an_earlier_optimiser(small_cohort, tmp_path):
    opts = dict(**TINY, seed=1, patience=10)
    train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(**opts, epochs=1), progress=False)
    state_file = tmp_path / "m" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["optimizer"]["param_groups"] = [{k: v for k, v in g.items() if k != "lr_scale"}
                                          for g in state["optimizer"]["param_groups"]]
    state_file.write_text(json.dumps(state))
    with pytest.raises(HaloBalanceError, match="earlier version of halo_balance"):
        train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(**opts, epochs=2, resume=True),
                    progress=False)


def test_refit_speed_benchmark_times_the_three_refits(small_cohort, tmp_path, capsys):
    """``benchmarks.speed.refit_speed`` refits a trained model with the biases alone, with cell terms
    and with cell and pair terms, and prints each time, its terms and the ratios."""
    from benchmarks.speed import refit_speed

    train_model(small_cohort, out_dir=tmp_path / "m", options=TrainOptions(**TINY, epochs=1, seed=0), progress=False)
    small_cohort.save(tmp_path / "data")
    refit_speed.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--repeats", "1",
                      "--cell-min-patients", "10", "--pair-min-patients", "10", "--pair-max-fdr", "1"])
    lines = capsys.readouterr().out.splitlines()
    alone, cells, pairs = (next(line for line in lines if line.startswith(way)) for way in
                           ("biases alone", "+ cell terms", "+ cell and pair terms"))
    assert "0 cell terms, 0 pair terms" in alone
    assert int(cells.split("CPU s,")[1].split()[0]) > 0 and " 0 pair terms" in cells
    assert int(pairs.split("cell terms,")[1].split()[0]) > 0
    assert lines[-1].startswith("fastest of 1:") and lines[-1].count("x)") == 3
