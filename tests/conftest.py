"""Shared fixtures: a hand-made tiny dataset and the location of the real demo data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from halo_balance.data import PreparedDataset, empty_meta

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MIMIC_DEMO = SHARED_DATA / "mimic-iv-demo-2.2"
EICU_DEMO = SHARED_DATA / "eicu-demo-2.0"


def require(path: Path) -> Path:
    """Skip the calling test when the shared real data is absent (e.g. a clone elsewhere)."""
    if not path.exists():
        pytest.skip(f"real demo data not found at {path}; it lives in ../shared/data beside the repo")
    return path


@pytest.fixture
def mimic_demo() -> Path:
    return require(MIMIC_DEMO)


@pytest.fixture
def eicu_demo() -> Path:
    return require(EICU_DEMO)


def make_tiny_dataset() -> PreparedDataset:
    """Four patients, six visits, a five-token vocabulary, groups gender x age_group."""
    vocab = pl.DataFrame({
        "id": pl.Series(range(5), dtype=pl.Int32),
        "token": ["dx10:I50", "dx10:I10", "dx9:428", "lab:50912:3", "lab:50912:9"],
        "kind": ["diagnosis", "diagnosis", "diagnosis", "lab", "lab"],
        "description": ["Heart failure", "Hypertension", "Heart failure", "Creatinine d3", "Creatinine d9"],
    })
    meta = empty_meta(source="hand-made", groups={"gender": ["F", "M"], "age_group": ["18-64", "65+"]})
    return PreparedDataset.from_records(
        patient_ids=["a", "b", "c", "d"], labels=[0, 1, 0, 1],
        groups={"gender": ["F", "M", "M", "F"], "age_group": ["18-64", "65+", "65+", "18-64"]},
        visits=[[[0, 3]], [[1], [2, 4], [0]], [[4, 1]], [[3]]],
        vocab=vocab, meta=meta, synthetic=False)


@pytest.fixture
def tiny() -> PreparedDataset:
    return make_tiny_dataset().validate()
