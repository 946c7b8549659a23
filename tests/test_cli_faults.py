"""Every command fails early and safely: one clear line, exit code 2, nothing written, inputs intact.

Covers bad output paths (checked before any work, before any training), ``--overwrite`` safety
(never an input, never a file or folder this package did not write), data that already holds
synthetic rows, mistyped options with "did you mean", and Ctrl-C messages that say what was kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from halo_balance import generate, sample, split, train
from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from tests.conftest import EICU_DEMO, MIMIC_DEMO, assert_one_clear_error, require, run_cli


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` with a hash of its bytes (folders: "dir")."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_training(monkeypatch):
    """Make any start of a training an immediate test failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the output path was checked")

    monkeypatch.setattr(train._Trainer, "__init__", refuse)


# ---------------------------------------------------------------------- output paths, before any work
def _commands(sim_prepared: Path, sim_model: Path) -> dict[str, tuple[Callable, list]]:
    from data_prep import eicu, mimic_iv, simulate
    from halo_balance import evaluate, export, hf

    return {
        "generate": (generate.main, ["--data", sim_prepared, "--groups", "gender", "--preset", "tiny", "--out"]),
        "generate --model": (generate.main, ["--data", sim_prepared, "--groups", "gender", "--model", sim_model,
                                             "--out"]),
        "demo": (generate.main, ["--demo", "--demo-patients", "300", "--out"]),
        "train": (train.main, ["--data", sim_prepared, "--preset", "tiny", "--out"]),
        "sample": (sample.main, ["--model", sim_model, "--count", "5", "--out"]),
        "evaluate": (evaluate.main, ["--real", sim_prepared, "--synthetic", sim_prepared, "--out"]),
        "split": (split.main, ["--data", sim_prepared, "--out"]),
        "export": (export.main, ["--data", sim_prepared, "--format", "mimic-iv", "--out"]),
        "hf": (hf.main, ["--model", sim_model, "--out"]),
        "simulate": (simulate.main, ["--patients", "50", "--out"]),
        "prepare mimic-iv": (mimic_iv.main, ["--root", MIMIC_DEMO, "--out"]),
        "prepare eicu": (eicu.main, ["--root", EICU_DEMO, "--lab-source", "apache", "--out"]),
    }


COMMANDS = ["generate", "generate --model", "demo", "train", "sample", "evaluate", "split", "export", "hf",
            "simulate", "prepare mimic-iv", "prepare eicu"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["proc", "below a file"])
def test_unwritable_output_fails_before_any_work(command, where, sim_prepared, sim_model, tmp_path, capsys,
                                                 no_training):
    if command.startswith("prepare"):
        require(MIMIC_DEMO if "mimic" in command else EICU_DEMO)
    main, argv = _commands(sim_prepared, sim_model)[command]
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file")
    out = Path("/proc/halo_balance_out/x") if where == "proc" else blocker / "out"
    before = snapshot(tmp_path, sim_prepared, sim_model)
    code, _, err = run_cli(main, [*argv, out], capsys)
    assert_one_clear_error(code, err, str(out), "cannot be created")
    assert ("not writable" in err) if where == "proc" else (f"{blocker} is a file" in err)
    assert snapshot(tmp_path, sim_prepared, sim_model) == before


# ---------------------------------------------------------------------- --overwrite safety
@pytest.mark.parametrize("command", ["generate", "generate --model", "train", "split", "evaluate", "sample"])
def test_output_equal_to_or_inside_the_input_is_refused(command, sim_prepared, sim_model, tmp_path, capsys,
                                                        no_training):
    main, argv = _commands(sim_prepared, sim_model)[command]
    source = sim_model if command == "sample" else sim_prepared
    before = snapshot(source)
    for out, says in ((source, "is also an input"), (source / "inner", "lies inside the input")):
        code, _, err = run_cli(main, [*argv, out, "--overwrite"], capsys)
        assert_one_clear_error(code, err, says)
        assert snapshot(source) == before


def test_preparation_output_inside_the_raw_tables_is_refused(tmp_path, capsys):
    from data_prep import mimic_iv, simulate

    assert run_cli(simulate.main, ["--patients", "30", "--out", tmp_path / "raw", "--quiet"], capsys)[0] == 0
    before = snapshot(tmp_path)
    code, _, err = run_cli(mimic_iv.main, ["--root", tmp_path / "raw", "--out", tmp_path / "raw" / "prepared"], capsys)
    assert_one_clear_error(code, err, "lies inside the input")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["generate", "generate --model", "train", "sample", "evaluate", "split",
                                     "export", "hf"])
def test_overwrite_never_deletes_a_file_or_a_folder_it_did_not_write(command, sim_prepared, sim_model, tmp_path,
                                                                     capsys, no_training):
    main, argv = _commands(sim_prepared, sim_model)[command]
    a_file = tmp_path / "results.csv"
    a_file.write_text("precious\n")
    a_folder = tmp_path / "mine"
    a_folder.mkdir()
    (a_folder / "notes.txt").write_text("precious\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli(main, [*argv, a_file, "--overwrite"], capsys)
    assert_one_clear_error(code, err, "is a file", "never replaced")
    code, _, err = run_cli(main, [*argv, a_folder, "--overwrite"], capsys)
    assert_one_clear_error(code, err, "was not written by halo_balance", "remove it yourself")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_previous_output(sim_prepared, tmp_path, capsys):
    out = tmp_path / "split"
    assert run_cli(split.main, ["--data", sim_prepared, "--out", out, "--seed", "0"], capsys)[0] == 0
    first = PreparedDataset.load(out / "holdout").patients["patient_id"].to_list()
    assert run_cli(split.main, ["--data", sim_prepared, "--out", out, "--seed", "1", "--overwrite"], capsys)[0] == 0
    assert PreparedDataset.load(out / "holdout").patients["patient_id"].to_list() != first


@pytest.fixture(scope="module")
def augmented(sim_prepared, sim_model, tmp_path_factory) -> Path:
    """A ``generate`` output (real + synthetic rows) of the simulated cohort."""
    out = tmp_path_factory.mktemp("augmented") / "aug"
    with pytest.raises(SystemExit) as info:
        run(generate.main, ["--data", str(sim_prepared), "--groups", "gender", "--model", str(sim_model),
                            "--out", str(out), "--ratio", "0.2", "--device", "cpu", "--quiet"])
    assert info.value.code == 0
    return out


@pytest.mark.parametrize("command,says", [
    (generate.main, "already holds"), (train.main, "--allow-synthetic"), (split.main, "synthetic patients"),
])
def test_data_holding_synthetic_rows_is_refused(command, says, augmented, sim_model, tmp_path, capsys, no_training):
    argv = {generate.main: ["--groups", "gender", "--model", sim_model], train.main: ["--preset", "tiny"],
            split.main: []}[command]
    before = snapshot(augmented)
    code, _, err = run_cli(command, ["--data", augmented, *argv, "--out", tmp_path / "out"], capsys)
    assert_one_clear_error(code, err, says, "synthetic")
    assert snapshot(augmented) == before and not (tmp_path / "out").exists()


def test_train_allow_synthetic_trains_on_every_row(augmented, tmp_path, capsys):
    code, _, err = run_cli(train.main, ["--data", augmented, "--out", tmp_path / "m", "--preset", "tiny",
                                        "--epochs", "1", "--device", "cpu", "--allow-synthetic", "--quiet"], capsys)
    assert code == 0, err
    assert err == ""  # --quiet
    n = PreparedDataset.load(augmented).n_patients
    from halo_balance.io import read_json

    summary = read_json(tmp_path / "m" / "training.json")
    assert summary["n_train"] + summary["n_val"] == n


# ---------------------------------------------------------------------- mistyped options
@pytest.mark.parametrize("command,argv,says", [
    ("generate", ["--groups", "gendr"], "group attribute: unknown 'gendr' (did you mean 'gender'?)"),
    ("sample", ["--condition", ""], "is empty"),
    ("sample", ["--condition", "gendr=F"], "did you mean 'gender'?"),
    ("sample", ["--condition", "label=1,race=Whte"], "did you mean 'White'?"),
    ("split", ["--stratify", "gendr"], "did you mean 'gender'?"),
    ("split", ["--holdout-fraction", "1.5"], "strictly between 0 and 1"),
])
def test_mistyped_options(command, argv, says, sim_prepared, sim_model, tmp_path, capsys, no_training):
    main = {"generate": generate.main, "sample": sample.main, "split": split.main}[command]
    base = {"generate": ["--data", sim_prepared, "--model", sim_model],
            "sample": ["--model", sim_model, "--count", "3"], "split": ["--data", sim_prepared]}[command]
    code, _, err = run_cli(main, [*base, *argv, "--out", tmp_path / "out"], capsys)
    assert_one_clear_error(code, err, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,says", [
    (["--copy-k", "0"], "--copy-k must be >= 1 (got 0)"),
    (["--copy-k", "0", "--allow-copies"], "--copy-k must be >= 1 (got 0)"),
    (["--max-rounds", "0"], "--max-rounds must be >= 1 (got 0)"),
    (["--max-rounds", "-1", "--allow-copies"], "--max-rounds must be >= 1 (got -1)"),
])
@pytest.mark.parametrize("command", ["generate", "sample"])
def test_copy_options_are_checked_alike_with_or_without_allow_copies(command, argv, says, sim_prepared, sim_model,
                                                                       tmp_path, capsys, no_training):
    main, base = {"generate": (generate.main, ["--data", sim_prepared, "--groups", "gender", "--preset", "tiny"]),
                  "sample": (sample.main, ["--model", sim_model, "--count", "3"])}[command]
    code, _, err = run_cli(main, [*base, *argv, "--out", tmp_path / "out"], capsys)
    assert_one_clear_error(code, err, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value,says", [("{epochs: 3}", "not valid JSON"), ('[{"epochs": 3}]', "got list"),
                                        ('"small"', "got str")])
@pytest.mark.parametrize("module", ["benchmarks.kfold", "benchmarks.fidelity", "benchmarks.privacy_utility",
                                    "benchmarks.speed.ray_grid"])
def test_malformed_train_options_give_the_same_error_in_every_command(module, value, says, tmp_path, capsys):
    import argparse
    import importlib

    from halo_balance.cli import json_object

    main = importlib.import_module(module).main
    argv = ["--data", tmp_path / "nowhere", "--out", tmp_path / "out"]
    if module in ("benchmarks.kfold", "benchmarks.speed.ray_grid"):
        argv += ["--groups", "gender"]
    code, _, err = run_cli(main, [*argv, "--train-options", value], capsys)
    with pytest.raises(argparse.ArgumentTypeError) as expected:
        json_object(value)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"python -m {module}: error: argument --train-options: {expected.value}"
    assert says in str(expected.value) and """e.g. '{"preset": "small", "epochs": 20}'""" in str(expected.value)
    assert list(tmp_path.iterdir()) == []


def test_training_options_suggest_the_closest_preset():
    from halo_balance.errors import HaloBalanceError
    from halo_balance.train import TrainOptions

    with pytest.raises(HaloBalanceError, match=r"unknown 'smal' \(did you mean 'small'\?\)"):
        TrainOptions(preset="smal").validate()


# ---------------------------------------------------------------------- Ctrl-C
def test_interrupt_message_says_what_was_kept(capsys):
    from halo_balance.cli import interrupt_note

    def plain(argv):
        raise KeyboardInterrupt

    def keeping(argv):
        with interrupt_note(lambda: "the checkpoint is kept"):
            raise KeyboardInterrupt

    assert run_cli(plain, [], capsys)[2] == "interrupted; no partial output was kept\n"
    code, _, err = run_cli(keeping, [], capsys)
    assert code == 130 and err == "interrupted; the checkpoint is kept\n"


def _generate_argv(sim_prepared: Path, out: Path, epochs: int) -> list:
    return ["--data", sim_prepared, "--groups", "gender", "--out", out, "--preset", "tiny", "--epochs", str(epochs),
            "--patience", "5", "--ratio", "0.2", "--device", "cpu", "--quiet"]


def test_generate_interrupted_during_training_resumes_from_its_checkpoint(sim_prepared, tmp_path, capsys,
                                                                         monkeypatch):
    from halo_balance.io import read_json

    out = tmp_path / "out"
    argv = _generate_argv(sim_prepared, out, epochs=3)
    original, trained = train._Trainer._train_epoch, []

    def epoch_then_ctrl_c(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        trained.append(epoch)
        return original(self, epoch)

    monkeypatch.setattr(train._Trainer, "_train_epoch", epoch_then_ctrl_c)
    code, _, err = run_cli(generate.main, argv, capsys)
    assert code == 130
    assert err.strip() == (f"interrupted; the checkpoint of epoch 1 is kept in {out / 'model' / 'checkpoint'}: "
                           "re-run the same command with --resume to continue from it")
    assert not (out / "meta.json").exists() and (out / "model" / "checkpoint" / "state.json").is_file()
    kept = snapshot(out)
    code, _, err = run_cli(generate.main, argv, capsys)  # not silently started over
    assert_one_clear_error(code, err, "already exists")
    assert snapshot(out) == kept

    monkeypatch.setattr(train._Trainer, "_train_epoch", lambda self, epoch: trained.append(epoch) or original(self, epoch))
    trained.clear()
    code, stdout, err = run_cli(generate.main, [*argv, "--resume"], capsys)
    assert code == 0, err
    assert trained == [2, 3]  # epoch 1 came from the checkpoint
    summary = read_json(out / "model" / "training.json")
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3] and summary["validation_patient_ids"]
    assert f"model: {out / 'model'}" in stdout
    assert PreparedDataset.load(out).meta["generation"]["model_path"] == "model"
    assert not (out / "model" / "checkpoint").exists()  # the run is complete
    code, _, err = run_cli(generate.main, [*argv, "--resume"], capsys)
    assert_one_clear_error(code, err, "nothing to resume", "finished run")


def test_generate_interrupted_while_balancing_keeps_the_trained_model(sim_prepared, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = _generate_argv(sim_prepared, out, epochs=1)
    original = generate.rebalance

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "rebalance", ctrl_c)
    code, _, err = run_cli(generate.main, argv, capsys)
    assert code == 130 and f"the trained generator is kept in {out / 'model'}" in err and "--resume" in err
    monkeypatch.setattr(generate, "rebalance", original)
    monkeypatch.setattr(train._Trainer, "__init__", lambda *a, **k: pytest.fail("trained again"))
    code, _, err = run_cli(generate.main, [*argv, "--resume"], capsys)
    assert code == 0, err
    assert PreparedDataset.load(out).patients["synthetic"].any()


def test_evaluate_model_of_a_generate_output_leaves_its_early_stopping_patients_out(sim_prepared, sim_generated,
                                                                                   tmp_path, capsys):
    from halo_balance import evaluate
    from halo_balance.io import read_json

    val = read_json(sim_generated / "model" / "training.json")["validation_patient_ids"]
    assert val
    code, _, err = run_cli(evaluate.main, ["--real", sim_prepared, "--synthetic", sim_generated, "--model",
                                           sim_generated, "--out", tmp_path / "ev", "--device", "cpu"], capsys)
    assert code == 0, err
    assert read_json(tmp_path / "ev" / "report.json")["data"]["not_members"] == len(val)


def test_console_command_lists_every_subcommand(capsys):
    from halo_balance import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    err = capsys.readouterr().err
    assert info.value.code == 0
    for command, module in cli.COMMANDS.items():
        assert f"{command}" in err and f"python -m {module}" in err
    assert "split" in cli.COMMANDS
