"""Hugging Face integration: Auto classes after ``import halo_balance``, logits, model card, push_to_hub offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def batch(sim_prepared: Path, sim_model: Path):
    from halo_balance import HaloModel, PreparedDataset
    from halo_balance.train import EncodedRecords, collate

    model = HaloModel.from_pretrained(sim_model)
    enc = EncodedRecords.from_dataset(PreparedDataset.load(sim_prepared), model.layout, model.config.n_ctx)
    return collate(enc, np.arange(32))


def test_import_halo_balance_registers_automodel_without_importing_transformers(sim_model: Path) -> None:
    code = ("import sys, halo_balance; assert 'transformers' not in sys.modules; "
            "from transformers import AutoConfig, AutoModel; "
            f"m = AutoModel.from_pretrained({str(sim_model)!r}); c = AutoConfig.from_pretrained({str(sim_model)!r}); "
            "print(type(m).__name__, type(c).__name__, c.model_type)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HaloForRecords", "HaloHFConfig", "halo_balance"]


def test_automodel_logits_equal_halomodel(sim_model: Path, batch) -> None:
    import halo_balance  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel

    from halo_balance import HaloModel

    auto = AutoModel.from_pretrained(sim_model)
    halo = HaloModel.from_pretrained(sim_model)
    with torch.no_grad():
        out = auto(batch)
        h = halo.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions)
        h = h.reshape(-1, h.shape[-1])
        logits = halo.fine.logits(h[batch.target_hidden], batch.visit_codes, batch.code_ptr)
        ref = halo(batch)
    assert out.logits.shape == (batch.n_visits, halo.config.vocab_size)
    if halo.config.n_cell_terms:  # each visit's logits carry its record's cell terms
        logits = logits + halo.code_offsets(batch.cond)[batch.target_record]
    # equal but for the order of the float additions (the wrapper adds the cell terms before the pair terms)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    assert torch.equal(out.record_nll, ref.record_nll) and float(out.loss) == float(ref.loss)


def test_the_config_alone_builds_the_trained_architecture(sim_model: Path, batch) -> None:
    """``AutoModel.from_config`` on a trained model's config builds the same modules and buffers
    (conditions at every state, empty-visit event, exclusive groups, cell terms), so its weights load."""
    import halo_balance  # noqa: F401
    from transformers import AutoConfig, AutoModel

    from halo_balance import HaloModel

    halo = HaloModel.from_pretrained(sim_model)
    halo.set_cell_terms(torch.tensor([[1, 0], [halo.config.n_conditions + 1, 3]]), torch.tensor([0.5, -1.0]))
    config = AutoConfig.for_model("halo_balance", **{k: v for k, v in halo.config.to_dict().items() if k != "model_type"})
    fresh = AutoModel.from_config(config)
    assert fresh.halo.config == halo.config
    fresh.halo.load_state_dict(halo.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.halo.eval()(batch).record_nll, halo.eval()(batch).record_nll)


def test_save_pretrained_writes_a_model_card_and_loads_back(sim_model: Path, batch, tmp_path: Path) -> None:
    import halo_balance  # noqa: F401
    from transformers import AutoModel

    from halo_balance import HaloModel

    auto = AutoModel.from_pretrained(sim_model)
    training = json.loads((sim_model / "training.json").read_text())
    training["dp"] = {"epsilon": 3.0, "delta": 1e-5}
    report = {"created": "2026-01-01", "fidelity": {"statistics": {"unigram_per_visit": {"r2": 0.91,
                                                                                         "reference_r2": 0.95}}},
              "privacy": {"exact_copies": {"synthetic_copies": 2},
                          "membership_inference": {"distance": {"auroc": 0.52}, "likelihood": {"auroc": 0.55}}}}
    out = auto.save_pretrained(tmp_path / "hf", training=training, evaluation=report)
    card = (out / "README.md").read_text()
    assert "unigram R^2 per visit 0.91 (real reference: a held-out real sample in place of the synthetic one, 0.95)" in card
    header = card.split("---")[1]
    assert "library_name: halo-balance" in header and "tags:" in header and "value: 0.91" in header
    meta = json.loads((sim_model / "dataset_meta.json").read_text())
    for text in (f"patients: {meta['counts']['patients']}", "epsilon = 3.0", "unigram R^2 per visit 0.91",
                 "identical to a training record 2", "AUROC (distance) 0.52", "## Intended use", "## Limits",
                 "data_prep.mimic_iv", "| label | race | insurance | gender | age_group | patients |"):
        assert text in card, text
    back = HaloModel.from_pretrained(out)  # the folder is still a plain model folder
    assert torch.equal(back.fine.out.weight, auto.halo.fine.out.weight)
    again = AutoModel.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(batch).logits, auto(batch).logits)
    plain = auto.save_pretrained(tmp_path / "plain")
    assert "Not evaluated" in (plain / "README.md").read_text()
    assert "differential privacy: none" in (plain / "README.md").read_text()


def test_push_to_hub_uploads_the_folder_with_its_card(sim_model: Path, tmp_path: Path, monkeypatch) -> None:
    """Offline: the Hub client is replaced by one that copies the uploaded folder to a local one."""
    import shutil

    import halo_balance  # noqa: F401
    from huggingface_hub import HfApi
    from transformers import AutoModel

    uploaded = tmp_path / "hub"

    class Repo:
        repo_id = "someone/halo-demo"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, repo_id, folder_path, **kw: shutil.copytree(folder_path, uploaded / repo_id))
    AutoModel.from_pretrained(sim_model).push_to_hub("someone/halo-demo")
    files = sorted(p.name for p in (uploaded / "someone/halo-demo").iterdir())
    assert files == ["README.md", "conditions.json", "config.json", "dataset_meta.json", "model.safetensors",
                     "vocab.parquet"]
    assert AutoModel.from_pretrained(uploaded / "someone/halo-demo").halo.config.vocab_size > 0


def test_cli_writes_the_hf_folder(sim_model: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "halo_balance.hf", "--model", str(sim_model), "--out",
                          str(tmp_path / "hf")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "best validation loss" in card  # training.json of the model folder was read
