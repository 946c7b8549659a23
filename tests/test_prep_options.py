"""The preparers' shared options and the binning helpers behind them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from data_prep.common import add_common_arguments, check_parameters, common_options, decile_edges
from halo_balance.errors import DatasetError, HaloBalanceError


@pytest.mark.parametrize("seed", range(5))
def test_decile_edges_from_counts_equal_the_expanded_sample(seed: int) -> None:
    """Edges from a (value, count) histogram are those of np.quantile on the expanded sample."""
    rng = np.random.default_rng(seed)
    values = np.unique(np.round(rng.normal(5, 2, 40), 1))
    counts = rng.integers(1, 30, len(values))
    for n_bins in (2, 4, 10, 25):
        expected = decile_edges(np.repeat(values, counts), n_bins)
        got = decile_edges(values, n_bins, counts=counts)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert len(got) == len(expected)
    assert decile_edges(np.array([3.0]), 10, counts=np.array([7])) == [3.0]
    assert decile_edges(np.array([]), 10, counts=np.array([], dtype=int)) == []


def test_bad_parameters_are_named() -> None:
    ok = {"n_lab_items": 50, "n_bins": 10, "max_visits": None}
    with pytest.raises(DatasetError, match=r"'time_bins': must be 0 .* or at least 2"):
        check_parameters(**ok, time_bins=1)
    with pytest.raises(HaloBalanceError, match=r"--lab-tokens: unknown 'evry' \(did you mean 'every'\?\)"):
        check_parameters(**ok, lab_tokens="evry")
    with pytest.raises(HaloBalanceError, match=r"--outcome: unknown 'readmission'.*choose from mortality"):
        check_parameters(**ok, outcome="readmission")
    check_parameters(**ok, time_bins=0, lab_tokens="every", outcome="long-stay")


def test_common_options_give_the_preparers_keywords() -> None:
    p = argparse.ArgumentParser()
    add_common_arguments(p, root_help="raw tables", visit="visits")
    a = p.parse_args(["--root", "r", "--out", "o", "--time-bins", "10", "--lab-tokens", "every",
                      "--outcome", "readmission-30d", "--quiet"])
    assert common_options(a) == {"n_lab_items": None, "n_bins": None, "lab_tokens": "every", "time_bins": 10,
                                 "outcome": "readmission-30d", "max_visits": None, "bins_from": None,
                                 "overwrite": False, "progress": False}
    defaults = common_options(p.parse_args(["--root", "r", "--out", "o"]))
    assert (defaults["n_bins"], defaults["lab_tokens"], defaults["time_bins"], defaults["outcome"],
            defaults["n_lab_items"], defaults["max_visits"]) == (
        None, None, None, None, None, None)  # None: 10, 0, mean, mortality, 50 and all, or the --bins-from folder's


def test_cli_rejects_one_time_bin(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "data_prep.eicu", "--root", str(tmp_path), "--out",
                        str(tmp_path / "out"), "--time-bins", "1", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "time_bins" in r.stderr
    assert not (tmp_path / "out").exists()


def test_meds_refuses_source_specific_outcomes(tmp_path: Path) -> None:
    from data_prep.meds import prepare_meds

    with pytest.raises(DatasetError, match=r"'outcome'.*death events or a MEDS label file.*--labels"):
        prepare_meds(tmp_path, tmp_path / "out", outcome="readmission-30d", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_n_bins_other_than_the_references(tmp_path: Path, capsys) -> None:
    """--n-bins with --bins-from: the reference's value is used; another one given explicitly is an error."""
    from conftest import fails_cleanly
    from data_prep.eicu import main, prepare_eicu
    from test_eicu import write_fixture

    root = write_fixture(tmp_path / "raw")
    prepare_eicu(root, tmp_path / "ref", n_lab_items=2, n_bins=2, progress=False)
    base = ["--root", root, "--out", tmp_path / "out", "--bins-from", tmp_path / "ref", "--quiet"]
    fails_cleanly(main, base + ["--n-bins", "10"], capsys, "--n-bins 10 differs from the --bins-from folder's 2",
                  "leave --n-bins out")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(main, base + ["--n-bins", "2"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "meta.json").is_file()


#: Non-default values of every option that defines a prepared dataset's representation, per preparer.
REPRESENTATION = {
    "mimic": {"n_lab_items": 5, "n_bins": 4, "lab_tokens": "every", "time_bins": 3, "outcome": "readmission-30d",
              "max_visits": 2},
    "eicu": {"lab_source": "apache", "patient_unit": "hospital-stay", "n_lab_items": 5, "n_bins": 4,
             "lab_tokens": "every", "time_bins": 3, "outcome": "long-stay", "max_visits": 2},
}
#: Another value of each, which --bins-from must refuse.
OTHER = {"n_lab_items": 6, "n_bins": 5, "lab_tokens": "mean", "time_bins": 0, "outcome": "mortality",
         "max_visits": 3, "lab_source": "lab", "patient_unit": "person"}


@pytest.mark.parametrize("source", ["mimic", "eicu"])
def test_bins_from_alone_prepares_like_the_reference(source: str, tmp_path: Path, capsys) -> None:
    """Every option that defines D's representation comes from D: the same raw tables prepared with
    --bins-from D and no other option give D back, and each option given with another value is refused,
    naming the option, D's value and the fix."""
    from conftest import EICU_DEMO, MIMIC_DEMO, fails_cleanly, require, visit_tokens
    from data_prep import eicu, mimic_iv
    from halo_balance import PreparedDataset

    module, root = (mimic_iv, MIMIC_DEMO) if source == "mimic" else (eicu, EICU_DEMO)
    prepare = module.prepare_mimic_iv if source == "mimic" else module.prepare_eicu
    options = REPRESENTATION[source]
    ref = prepare(require(root), tmp_path / "ref", progress=False, **options)
    base = ["--root", root, "--bins-from", tmp_path / "ref", "--quiet"]
    code, _, err = run_cli(module.main, base + ["--out", tmp_path / "again"], capsys)
    assert code == 0, err
    again = PreparedDataset.load(tmp_path / "again")

    def used(ds: PreparedDataset) -> dict:
        return {k: v for k, v in ds.meta["preprocessing"]["parameters"].items() if k != "bins_from"}
    assert used(again) == used(ref) and set(options) <= set(used(ref))
    assert {k: used(ref)[k] for k in options} == options
    assert again.meta["outcome"] == ref.meta["outcome"] and again.meta["groups"] == ref.meta["groups"]
    assert again.patients.equals(ref.patients) and visit_tokens(again) == visit_tokens(ref)
    for option in options:
        flag, value = "--" + option.replace("_", "-"), OTHER[option]
        fails_cleanly(module.main, base + ["--out", tmp_path / "again_x", flag, value], capsys,
                      f"{flag} {value} differs from the --bins-from folder's {options[option]}",
                      f"Fix: leave {flag} out to use the reference's")
    assert not (tmp_path / "again_x").exists()


def test_bins_from_refuses_a_visit_cap_the_reference_lacks(eicu_prepared: Path, tmp_path: Path, capsys) -> None:
    from conftest import EICU_DEMO, fails_cleanly
    from data_prep.eicu import main

    fails_cleanly(main, ["--root", EICU_DEMO, "--out", tmp_path / "out", "--bins-from", eicu_prepared,
                         "--max-visits", "3"], capsys, "--max-visits 3 differs from the --bins-from folder's none")
    assert not (tmp_path / "out").exists()
