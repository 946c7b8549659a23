"""The balancing plan: counts per cell, ratio, minimum size, empty cells."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError
from halo_balance.plan import AMPLIFICATION_WARNING, amplification_warnings, plan_cells
from tests.conftest import make_tiny_dataset


@pytest.fixture
def skewed() -> PreparedDataset:
    # label x gender cells: (0,F)=30 (0,M)=60 (1,F)=3 (1,M)=7 ; age_group all "65+"
    base = make_tiny_dataset()
    labels = [0] * 30 + [0] * 60 + [1] * 3 + [1] * 7
    gender = ["F"] * 30 + ["M"] * 60 + ["F"] * 3 + ["M"] * 7
    n = len(labels)
    return PreparedDataset.from_records(
        patient_ids=[f"p{i}" for i in range(n)], labels=labels,
        groups={"gender": gender, "age_group": ["65+"] * n}, visits=[[[i % 5]] for i in range(n)],
        vocab=base.vocab, meta=base.meta, synthetic=False).validate()


def _rows(plan: pl.DataFrame) -> dict:
    keys = [c for c in plan.columns if c not in ("n_real", "to_generate", "target", "status", "amplification")]
    return {tuple(r[k] for k in keys): (r["n_real"], r["to_generate"], r["status"]) for r in plan.to_dicts()}


def test_one_attribute(skewed):
    rows = _rows(plan_cells(skewed, groups=["gender"], min_cell_size=5))
    assert rows == {(0, "F"): (30, 30, "top_up"), (0, "M"): (60, 0, "largest"),
                    (1, "F"): (3, 0, "skipped_below_min_size"), (1, "M"): (7, 53, "top_up")}


def test_ratio_rounds(skewed):
    rows = _rows(plan_cells(skewed, groups=["gender"], ratio=0.25, min_cell_size=0))
    assert rows[(0, "F")][1] == round(0.25 * 30) and rows[(1, "F")][1] == round(0.25 * 57) == 14
    assert all(v[1] == 0 for v in _rows(plan_cells(skewed, groups=["gender"], ratio=0.0)).values())


def test_ratio_above_one_overshoots_the_largest_cell(skewed):
    rows = _rows(plan_cells(skewed, groups=["gender"], ratio=2.0, min_cell_size=0))
    assert rows[(0, "F")][1] == 2 * (60 - 30) and rows[(0, "M")][1] == 0 and rows[(1, "M")][1] == 2 * 53


def test_outcome_only(skewed):
    rows = _rows(plan_cells(skewed, groups=[]))
    assert rows == {(0,): (90, 0, "largest"), (1,): (10, 80, "top_up")}


def test_intersectional_lists_empty_cells(skewed):
    plan = plan_cells(skewed, groups=["gender", "age_group"])
    rows = _rows(plan)
    assert rows[(0, "F", "18-64")] == (0, 0, "skipped_empty")
    assert plan.height == 8
    incl = _rows(plan_cells(skewed, groups=["gender", "age_group"], include_empty_cells=True))
    assert incl[(1, "M", "18-64")] == (0, 60, "empty_included")


def test_targets_equal_largest(skewed):
    plan = plan_cells(skewed, groups=["gender"], min_cell_size=0)
    assert plan["target"].to_list() == [60] * 4


@pytest.mark.parametrize("kwargs,msg", [
    ({"ratio": -0.1}, "ratio must be >= 0"),
    ({"groups": ["race"]}, "group attribute: unknown 'race'"), ({"groups": ["gender", "gender"]}, "repeat"),
])
def test_bad_arguments(skewed, kwargs, msg):
    kwargs = {"groups": ["gender"], **kwargs}
    with pytest.raises(HaloBalanceError, match=msg):
        plan_cells(skewed, **kwargs)


def test_ignores_synthetic_rows(skewed):
    syn = skewed.select([f"p{i}" for i in range(90, 93)])
    syn.patients = syn.patients.with_columns(patient_id="s" + pl.col("patient_id"), synthetic=pl.lit(True))
    syn.visits = syn.visits.with_columns(patient_id="s" + pl.col("patient_id"), synthetic=pl.lit(True))
    both = PreparedDataset.concat([skewed, syn]).validate()
    assert np.array_equal(plan_cells(both, groups=["gender"])["n_real"].to_numpy(),
                          plan_cells(skewed, groups=["gender"])["n_real"].to_numpy())


def test_amplification_is_synthetic_per_real_patient_and_flagged_above_the_threshold(skewed):
    plan = plan_cells(skewed, groups=["gender"], min_cell_size=0)
    amp = {(r["label"], r["gender"]): r["amplification"] for r in plan.to_dicts()}
    assert amp == {(0, "F"): 1.0, (0, "M"): 0.0, (1, "F"): 19.0, (1, "M"): 53 / 7}
    lines = amplification_warnings(plan, ["gender"])
    assert AMPLIFICATION_WARNING == 10 and len(lines) == 1
    assert lines[0].startswith("cell label=1,gender=F: 57 synthetic patients from 3 real (19.0x, above 10x)")
    assert amplification_warnings(plan_cells(skewed, groups=["gender"]), ["gender"]) == []  # (1,F) skipped
    empty = plan_cells(skewed, groups=["gender", "age_group"], include_empty_cells=True)
    assert empty.filter(pl.col("n_real") == 0)["amplification"].null_count() == 4


def test_explicit_targets(skewed):
    rows = _rows(plan_cells(skewed, groups=["gender"], targets={(0, "F"): 40, (1, "M"): 20}))
    assert rows == {(0, "F"): (30, 10, "top_up"), (0, "M"): (60, 0, "largest"),
                    (1, "F"): (3, 0, "skipped_below_min_size"), (1, "M"): (7, 13, "top_up")}
    half = _rows(plan_cells(skewed, groups=["gender"], targets={(1, "M"): 27}, ratio=0.5))
    assert half[(1, "M")] == (7, 10, "top_up")
    assert _rows(plan_cells(skewed, groups=["gender"], targets={(0, "F"): 30}))[(0, "F")] == (30, 0, "at_target")


@pytest.mark.parametrize("targets,msg", [
    ({(0, "F"): 10}, "below its 30 real patients"),
    ({(1, "F"): 50}, "fewer than min_cell_size=5"),
    ({(2, "F"): 50}, "unknown cell"),
])
def test_bad_targets(skewed, targets, msg):
    with pytest.raises(HaloBalanceError, match=msg):
        plan_cells(skewed, groups=["gender"], targets=targets)
