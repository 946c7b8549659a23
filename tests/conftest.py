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


def run_cli(main, argv: list, capsys) -> tuple[int, str, str]:
    """Run a command line's ``main`` as the console does; return its exit code, stdout and stderr."""
    from halo_balance.cli import run

    with pytest.raises(SystemExit) as info:
        run(main, [str(a) for a in argv])
    io = capsys.readouterr()
    return info.value.code, io.out, io.err


def assert_one_clear_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, no traceback, one ``error:`` line (warnings aside) holding every needle."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def fails_cleanly(main, argv: list[str], capsys, *needles: str) -> str:
    """Run ``main`` as the console does: it must exit 2 with one line on stderr, and nothing else, that
    holds every needle (the problem and the fix), never a traceback. Returns that line."""
    code, _, err = run_cli(main, argv, capsys)
    assert_one_clear_error(code, err, *needles)
    assert len(err.strip().splitlines()) == 1, err
    return err


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


def make_learnable_dataset(n_patients: int = 600, *, vocab_size: int = 40, seed: int = 0) -> PreparedDataset:
    """Synthetic records with structure a generator can learn (for model tests).

    Each (label, gender) cell owns a block of 8 tokens; a visit draws ~3 of its block, a token's
    successor often follows it within the visit, tokens of the previous visit tend to recur, and
    positive patients' final visit usually holds the last token. 1-5 visits per patient.
    """
    import numpy as np

    assert vocab_size >= 40, "four blocks of 8 tokens, 4 age tokens and the outcome token"
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_patients) < 0.25).astype(int)
    gender = rng.choice(["F", "M"], size=n_patients, p=[0.4, 0.6])
    age = rng.choice(["18-64", "65+"], size=n_patients)
    records = []
    for p in range(n_patients):
        block = 8 * (2 * labels[p] + (gender[p] == "M"))
        n_vis = int(min(1 + rng.geometric(0.5) - 1, 5))
        visits, prev = [], set()
        for t in range(n_vis):
            v = {block + int(j) for j in np.flatnonzero(rng.random(8) < 0.35)}
            v |= {c + 1 for c in v if c % 8 != 7 and rng.random() < 0.7}
            v |= {c for c in prev if rng.random() < 0.5}
            if age[p] == "65+" and rng.random() < 0.6:
                v.add(32 + int(rng.integers(0, 4)))
            if labels[p] and t == n_vis - 1 and rng.random() < 0.8:
                v.add(vocab_size - 1)
            v = v or {block}
            visits.append(sorted(v))
            prev = v
        records.append(visits)
    vocab = pl.DataFrame({"id": pl.Series(range(vocab_size), dtype=pl.Int32),
                          "token": [f"tok{i}" for i in range(vocab_size)],
                          "kind": ["diagnosis"] * vocab_size, "description": [""] * vocab_size})
    meta = empty_meta(source="learnable-synthetic", groups={"gender": ["F", "M"], "age_group": ["18-64", "65+"]})
    return PreparedDataset.from_records(
        patient_ids=[f"p{i}" for i in range(n_patients)], labels=labels,
        groups={"gender": gender.tolist(), "age_group": age.tolist()}, visits=records,
        vocab=vocab, meta=meta, synthetic=False).validate()


@pytest.fixture(scope="session")
def learnable() -> PreparedDataset:
    return make_learnable_dataset()


@pytest.fixture(scope="session")
def eicu_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eICU demo prepared with ``--lab-source apache`` (the demo has no ``lab`` table)."""
    from data_prep.eicu import prepare_eicu

    out = tmp_path_factory.mktemp("eicu_prepared") / "prepared"
    prepare_eicu(require(EICU_DEMO), out, lab_source="apache", progress=False)
    return out


@pytest.fixture(scope="session")
def sim_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated 600-patient cohort (seed 0) prepared by the MIMIC-IV preprocessor."""
    from data_prep.mimic_iv import prepare_mimic_iv
    from data_prep.simulate import simulate

    base = tmp_path_factory.mktemp("sim_prepared")
    simulate(base / "raw", patients=600, seed=0, progress=False)
    prepare_mimic_iv(base / "raw", base / "prepared", progress=False)
    return base / "prepared"


def tiny_like(visits, *, prefix: str = "s", labels=None, gender=None, synthetic: bool = True) -> PreparedDataset:
    """Hand-written records on the tiny vocabulary (ids ``{prefix}0..``; age_group 65+, default gender F)."""
    base = make_tiny_dataset()
    n = len(visits)
    return PreparedDataset.from_records(
        patient_ids=[f"{prefix}{i}" for i in range(n)], labels=labels or [0] * n,
        groups={"gender": gender or ["F"] * n, "age_group": ["65+"] * n}, visits=visits,
        vocab=base.vocab, meta=base.meta, synthetic=synthetic).validate()


def visit_tokens(ds: PreparedDataset) -> dict[tuple[str, int], set[str]]:
    """``{(patient_id, visit_index): {token, ...}}`` for every visit (empty visits included)."""
    t = (ds.visits.select("patient_id", "visit_index", "codes").explode("codes").drop_nulls()
         .join(ds.vocab.select(codes="id", token="token"), on="codes")
         .group_by("patient_id", "visit_index").agg("token"))
    got = {(p, i): set(tok) for p, i, tok in t.iter_rows()}
    return {(p, i): got.get((p, i), set()) for p, i in ds.visits.select("patient_id", "visit_index").iter_rows()}


@pytest.fixture(scope="session")
def sim_model(sim_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``tiny`` generator trained briefly (3 epochs, seed 0) on ``sim_prepared``; its folder."""
    from halo_balance.train import TrainOptions, train_model

    out = tmp_path_factory.mktemp("sim_model") / "model"
    train_model(PreparedDataset.load(sim_prepared), out_dir=out,
                options=TrainOptions(preset="tiny", epochs=3, seed=0, device="cpu"), progress=False)
    return out


@pytest.fixture(scope="session")
def sim_generated(sim_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``python -m halo_balance.generate`` output that trained its own ``tiny`` generator (2 epochs)."""
    from halo_balance import generate
    from halo_balance.cli import run

    out = tmp_path_factory.mktemp("sim_generated") / "out"
    with pytest.raises(SystemExit) as info:
        run(generate.main, ["--data", str(sim_prepared), "--groups", "gender", "--out", str(out), "--preset", "tiny",
                            "--epochs", "2", "--ratio", "0.2", "--device", "cpu", "--quiet"])
    assert info.value.code == 0
    return out
