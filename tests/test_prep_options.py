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
    assert common_options(a) == {"n_lab_items": 50, "n_bins": None, "lab_tokens": "every", "time_bins": 10,
                                 "outcome": "readmission-30d", "max_visits": None, "bins_from": None,
                                 "overwrite": False, "progress": False}
    defaults = common_options(p.parse_args(["--root", "r", "--out", "o"]))
    assert (defaults["n_bins"], defaults["lab_tokens"], defaults["time_bins"], defaults["outcome"]) == (
        None, None, None, "mortality")  # None: 10, 0 and mean, or the --bins-from folder's


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
