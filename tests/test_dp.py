"""Differentially private training: per-record gradients, clipping, noise calibration, the accountant."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from halo_balance.config import PLAIN_STRUCTURE, ConditionLayout, HaloConfig
from halo_balance.dp import (PrivacyPlan, PrivateSteps, calibrate_noise, epsilon_spent, private_statistics,
                             record_gradients, reference_record_gradients)
from halo_balance.errors import HaloBalanceError
from halo_balance.model import HaloModel
from halo_balance.train import (EncodedRecords, MarginalModel, TrainOptions, _Trainer, add_train_arguments, collate,
                                train_model, train_options_from_args)
from tests.conftest import make_learnable_dataset

DP = dict(preset="tiny", device="cpu", batch_size=16, dp_epsilon=8.0, seed=0)


@pytest.fixture(scope="module")
def cohort():
    return make_learnable_dataset(120, seed=5)


def _model_and_records(dataset, *, n_ctx: int = 6, dropout: float = 0.0):
    layout = ConditionLayout.from_dataset(dataset)
    cfg = HaloConfig.from_preset("tiny", vocab_size=dataset.vocab_size, n_conditions=layout.n_slots, n_ctx=n_ctx,
                                 dropout=dropout, **PLAIN_STRUCTURE)  # the model DP training builds
    torch.manual_seed(0)
    model = HaloModel.for_dataset(dataset, cfg)
    with torch.no_grad():  # sizeable weights, so that every parameter gets a real gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), EncodedRecords.from_dataset(dataset, layout, n_ctx)


def _plan(n_records: int, *, sigma: float, clip: float, batch: int) -> PrivacyPlan:
    return PrivacyPlan(target_epsilon=1.0, delta=1e-5, max_grad_norm=clip, accountant="rdp", n_records=n_records,
                       sample_rate=batch / n_records, steps_per_epoch=1, planned_steps=1, noise_multiplier=sigma,
                       statistics_noise_multiplier=sigma, history=[])


# ---------------------------------------------------------------------- per-record gradients
def test_per_record_gradients_match_a_per_patient_loop(cohort):
    model, enc = _model_and_records(cohort, n_ctx=4)  # n_ctx 4: some records truncated, some ends forced
    rows = np.arange(30)
    assert len(set(enc.lengths[rows])) > 1 and enc.lengths[rows].max() == 3
    out = record_gradients(model, collate(enc, rows))
    reference = reference_record_gradients(model, enc, rows)
    for name, p in model.named_parameters():
        assert p.grad_sample.shape == (len(rows), *p.shape), name
        scale = float(reference[name].abs().max())
        assert scale > 0, name  # every parameter is reached by some record
        torch.testing.assert_close(p.grad_sample, reference[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    # the per-record pass computes the same likelihood as the ordinary one
    with torch.no_grad():
        torch.testing.assert_close(out.record_nll.detach(), model(collate(enc, rows)).record_nll, rtol=1e-5, atol=1e-4)


def test_a_record_gradient_does_not_depend_on_its_batch(cohort):
    """The same record in another batch (other records, another padded length): the same gradient, up to
    float rounding (kernels block differently for other shapes)."""
    model, enc = _model_and_records(cohort)
    record_gradients(model, collate(enc, np.arange(12)))
    in_batch = {n: p.grad_sample[5].clone() for n, p in model.named_parameters()}
    record_gradients(model, collate(enc, np.array([5, 40, 41])))
    for name, p in model.named_parameters():
        scale = float(in_batch[name].abs().max())
        torch.testing.assert_close(p.grad_sample[0], in_batch[name], rtol=1e-5, atol=2e-6 * scale, msg=name)


# ---------------------------------------------------------------------- clipping and noise
def test_per_record_clipping_is_in_effect(cohort):
    """Without noise, one SGD step of size 1 moves the weights by exactly the mean clipped gradient:
    far less than the unclipped mean, which a step without clipping would take."""
    model, enc = _model_and_records(cohort)
    rows, clip, expected = np.arange(10), 0.05, 10
    reference = reference_record_gradients(model, enc, rows)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in reference.values()))
    assert float(norms.min()) > 20 * clip  # every record is clipped
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = PrivateSteps(model, torch.optim.SGD(model.parameters(), lr=1.0),
                         _plan(len(enc), sigma=0.0, clip=clip, batch=expected), device="cpu", noise_seed=0,
                         sampling_seed=0)
    steps.step(enc, rows)
    moved = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    total = torch.sqrt(sum(m.pow(2).sum() for m in moved.values()))
    assert float(total) <= clip * len(rows) / expected + 1e-6
    unclipped = torch.sqrt(sum(g.mean(0).pow(2).sum() for g in reference.values()))
    assert float(unclipped) > 10 * float(total)
    for name, m in moved.items():
        want = torch.einsum("b,b...->...", factor, reference[name]) / expected
        torch.testing.assert_close(m, want, rtol=1e-3, atol=1e-7, msg=name)
    assert steps.plan.history == [[0.0, expected / len(enc), 1]] and steps.plan.steps == 1


def test_noise_has_the_calibrated_scale(cohort):
    model, enc = _model_and_records(cohort)
    before = [p.detach().clone() for p in model.parameters()]
    sigma, clip, expected = 3.0, 0.5, 8
    steps = PrivateSteps(model, torch.optim.SGD(model.parameters(), lr=1.0),
                         _plan(len(enc), sigma=sigma, clip=clip, batch=expected), device="cpu", noise_seed=1)
    steps.step(enc, [])  # an empty Poisson sample: noise only
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    # Opacus' secure-mode noise: the same standard deviation sigma * clip, divided by the expected batch
    assert float(moved.std()) == pytest.approx(sigma * clip / expected, rel=0.05)
    assert abs(float(moved.mean())) < 0.05 * sigma * clip / expected


# ---------------------------------------------------------------------- the budget
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # Opacus' own search probes large epsilons
def test_noise_calibration_is_opacus_get_noise_multiplier():
    from opacus.accountants.utils import get_noise_multiplier

    q, steps = 0.05, 300
    for accountant in ("rdp",):
        ours = calibrate_noise(target_epsilon=3.0, delta=1e-5, accountant=accountant,
                               history=lambda s: [(s, q, steps)])
        theirs = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=steps,
                                      accountant=accountant)
        assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # Opacus' PRV computes log(1 - q) at q = 1
def test_epsilon_matches_opacus_accountants():
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(2.0, 1.0, 2), (1.1, 0.01, 500)]
    for acc, name in ((RDPAccountant(), "rdp"), (PRVAccountant(), "prv")):
        for sigma, q, n in history:  # the way Opacus' optimizer hook counts: one step at a time
            for _ in range(n):
                acc.step(noise_multiplier=sigma, sample_rate=q)
        assert epsilon_spent(history, delta=1e-5, accountant=name) == pytest.approx(acc.get_epsilon(delta=1e-5),
                                                                                    rel=1e-6)


def test_plan_spends_the_target_within_tolerance():
    plan = PrivacyPlan.calibrate(target_epsilon=4.0, delta=None, max_grad_norm=1.0, accountant="rdp",
                                 n_records=1000, batch_size=50, epochs=3)
    assert plan.delta == 1e-5 and plan.steps_per_epoch == 20 and plan.planned_steps == 60
    plan.history = [[plan.statistics_noise_multiplier, 1.0, 2], [plan.noise_multiplier, plan.sample_rate, 60]]
    assert 3.98 <= plan.spent() <= 4.0
    assert PrivacyPlan.calibrate(target_epsilon=4.0, delta=None, max_grad_norm=1.0, accountant="rdp",
                                 n_records=10**6, batch_size=5000, epochs=1).delta == pytest.approx(1e-7)


# ---------------------------------------------------------------------- private statistics
def test_private_statistics_without_noise_are_the_clipped_frequencies(cohort):
    layout = ConditionLayout.from_dataset(cohort)
    enc = EncodedRecords.from_dataset(cohort, layout, 16)
    stats = private_statistics(enc, layout, cohort.vocab_size, noise_multiplier=0.0,
                               generator=np.random.default_rng(0), clip=1e9)
    rec = cohort.records()
    per_record = np.zeros((len(rec), cohort.vocab_size))
    for p in range(len(rec)):
        for visit in rec.patient(p):
            per_record[p, visit] += 1 / len(rec.patient(p))
    np.testing.assert_allclose(stats.code_frequency, np.clip(per_record.mean(0), 0.5 / len(rec), 1))
    assert stats.end_rate == pytest.approx(np.mean(1 / rec.visit_counts()))
    exact = {(c["label"], c["gender"], c["age_group"]): c["n"] for c in layout.cells}
    assert {(c["label"], c["gender"], c["age_group"]): c["n"] for c in stats.cells} == exact
    noisy = private_statistics(enc, layout, cohort.vocab_size, noise_multiplier=2.0,
                               generator=np.random.default_rng(0))
    assert noisy.history == [(2.0, 1.0, 2)]
    assert all(c["n"] >= 4 for c in noisy.cells)  # below two noise standard deviations: dropped


# ---------------------------------------------------------------------- training
def test_dp_training_records_the_guarantee(cohort, tmp_path):
    model = train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(**DP, epochs=2), progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    dp = info["dp"]
    assert info["n_val"] == 0 and dp["unprotected_patients"] == 0 and dp["n_private_patients"] == cohort.n_patients
    assert dp["steps"] == dp["planned_steps"] == 2 * round(cohort.n_patients / 16)
    assert dp["epsilon"] <= 8.0 and dp["epsilon"] > 7.9 and dp["delta"] == 1e-5
    assert dp["accountant"] == "rdp" and dp["max_grad_norm"] == 1.0
    assert dp["history"][0] == [dp["statistics_noise_multiplier"], 1.0, 2]
    assert json.loads((tmp_path / "m" / "privacy.json").read_text()) == dp
    assert HaloModel.from_pretrained(tmp_path / "m").privacy == dp == model.privacy
    assert info["best_epoch"] == 2  # no model selection on the private patients: the last epoch is kept
    assert model.config.n_ctx == 16  # the preset's context, not fitted to the longest record
    # the plain model, nothing read off the records without noise: no exclusive groups, no refits
    assert all(getattr(model.config, name) is False for name in PLAIN_STRUCTURE) and not model.config.exclusive_groups
    assert "bias_refit" not in info and "condition_refit" not in info
    exact = {(c["label"], c["gender"], c["age_group"]): c["n"] for c in ConditionLayout.from_dataset(cohort).cells}
    assert {(c["label"], c["gender"], c["age_group"]): c["n"] for c in model.layout.cells} != exact


def test_dp_validation_patients_are_reported_unprotected(cohort, tmp_path):
    train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(**DP, epochs=1, val_fraction=0.2),
                progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    assert info["n_val"] == len(info["validation_patient_ids"]) == info["dp"]["unprotected_patients"] > 0
    assert all(h["fit_loss"] is None and h["gap"] is None for h in info["history"])  # no training-patient loss
    assert info["dp"]["n_private_patients"] == info["n_train"] == cohort.n_patients - info["n_val"]


def test_resume_continues_the_accountant(cohort, tmp_path, monkeypatch):
    opts = dict(**DP, epochs=3)
    run = _Trainer.run
    stopped = []

    def stop_after_two(self):  # a run killed during its third epoch
        self.options = TrainOptions(**{**vars(self.options), "epochs": 2})
        run(self)
        self.options = TrainOptions(**opts)
        stopped.append(True)
        raise KeyboardInterrupt

    monkeypatch.setattr(_Trainer, "run", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(**opts), progress=False)
    monkeypatch.setattr(_Trainer, "run", run)
    state = json.loads((tmp_path / "m" / "checkpoint" / "state.json").read_text())
    per_epoch = round(cohort.n_patients / 16)
    assert state["epoch"] == 2 and state["dp"]["steps"] == 2 * per_epoch
    train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(**opts, resume=True), progress=False)
    dp = json.loads((tmp_path / "m" / "training.json").read_text())["dp"]
    assert dp["steps"] == 3 * per_epoch and dp["history"][-1][2] == 3 * per_epoch  # continued, not restarted
    assert dp["noise_multiplier"] == state["dp"]["noise_multiplier"] and 7.9 < dp["epsilon"] <= 8.0
    with pytest.raises(HaloBalanceError, match="calibrated for other privacy settings.*planned_steps"):
        train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(**{**opts, "epochs": 5}, resume=True),
                    progress=False)
    with pytest.raises(HaloBalanceError, match="trained with differential privacy"):
        train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(preset="tiny", device="cpu", resume=True),
                    progress=False)


def test_dp_options_on_the_command_line():
    import argparse

    args = add_train_arguments(argparse.ArgumentParser()).parse_args(
        ["--dp-epsilon", "3", "--dp-delta", "1e-6", "--dp-max-grad-norm", "0.5", "--dp-accountant", "prv"])
    opts = train_options_from_args(args)
    assert (opts.dp_epsilon, opts.dp_delta, opts.dp_max_grad_norm, opts.dp_accountant) == (3.0, 1e-6, 0.5, "prv")
    assert opts.validation_fraction == 0.0 and TrainOptions().validation_fraction == 0.1
    for bad in (dict(dp_epsilon=0), dict(dp_delta=1.0), dict(dp_max_grad_norm=0), dict(dp_accountant="gdp")):
        with pytest.raises(HaloBalanceError, match="invalid training options"):
            TrainOptions(**bad).validate()


def test_marginal_baseline_is_still_reported_under_dp(cohort, tmp_path):
    train_model(cohort, out_dir=tmp_path / "m", options=TrainOptions(**DP, epochs=1), progress=False)
    info = json.loads((tmp_path / "m" / "training.json").read_text())
    layout = ConditionLayout.from_dataset(cohort)
    marginal = MarginalModel.fit(EncodedRecords.from_dataset(cohort, layout, 16), cohort.vocab_size)
    assert info["marginal_train_loss"] == pytest.approx(marginal.loss(EncodedRecords.from_dataset(cohort, layout, 16)))
