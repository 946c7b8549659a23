"""Hugging Face ``transformers`` integration: Auto classes, ``save_pretrained``, a model card, ``push_to_hub``.

``pip install -e ".[hf]"``. After ``import halo_balance`` (the Auto classes are registered as soon as
``transformers`` is imported, see :func:`register`), a trained generator's folder loads with::

    from transformers import AutoModel
    model = AutoModel.from_pretrained(MODEL_DIR)     # HaloForRecords around the trained HaloModel

:class:`HaloForRecords` is a ``PreTrainedModel`` that *holds* a :class:`~halo_balance.model.HaloModel`
(``model.halo``) rather than re-implementing it: its forward pass is HaloModel's, so the logits are
HaloModel's. A model folder is the same whichever side writes it (``config.json`` with
``model_type`` ``halo_balance``, ``model.safetensors``, ``vocab.parquet``, ``conditions.json``,
``dataset_meta.json``): ``HaloModel.from_pretrained`` and ``AutoModel.from_pretrained`` read each
other's output. :meth:`HaloForRecords.save_pretrained` adds ``README.md``, a model card with the
Hub's YAML metadata header (:func:`model_card`): training data (source, counts, cells,
preprocessing), training figures, the fidelity and privacy figures of an evaluation report when
given, the differential-privacy epsilon when ``training.json`` records one (key ``dp``), intended
use and limits. ``python -m halo_balance.hf --model MODEL_DIR --out HF_DIR [--evaluation REPORT]
[--push-to-hub REPO_ID]`` does the same from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import run
from .config import MODEL_TYPE, ConditionLayout, HaloConfig
from .errors import HaloBalanceError
from .io import atomic_write_bytes, check_output_dir, read_json

CARD_FILE, TRAINING_FILE = "README.md", "training.json"
MAX_CARD_CELLS = 40


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise HaloBalanceError('the Hugging Face integration needs transformers: pip install -e ".[hf]"') from exc
    return transformers


def _classes() -> tuple[type, type]:
    """Build (once) the ``PretrainedConfig`` and ``PreTrainedModel`` subclasses."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    transformers = _transformers()
    import torch

    from .model import HaloModel

    class HaloHFConfig(transformers.PretrainedConfig):
        """``HaloConfig`` as a ``transformers`` config (same fields, ``model_type`` ``halo_balance``)."""

        model_type = MODEL_TYPE

        def __init__(self, vocab_size: int = 1, n_conditions: int = 2, n_ctx: int = 32, n_embd: int = 128,
                     n_layer: int = 4, n_head: int = 4, fine_hidden: int = 128, dropout: float = 0.1,
                     layer_norm_eps: float = 1e-5, preset: str | None = None, **kwargs: Any) -> None:
            self.vocab_size, self.n_conditions, self.n_ctx, self.n_embd = vocab_size, n_conditions, n_ctx, n_embd
            self.n_layer, self.n_head, self.fine_hidden, self.dropout = n_layer, n_head, fine_hidden, dropout
            self.layer_norm_eps, self.preset = layer_norm_eps, preset
            super().__init__(**kwargs)

        def halo_config(self) -> HaloConfig:
            """Every ``HaloConfig`` field this config holds (a trained model's ``config.json`` holds
            them all, the structural switches and term counts included)."""
            return HaloConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(HaloConfig)
                                 if hasattr(self, f.name)})

    class HaloForRecords(transformers.PreTrainedModel):
        """A trained :class:`HaloModel` behind the ``transformers`` API (see the module docstring)."""

        config_class = HaloHFConfig
        base_model_prefix = "halo"
        main_input_name = "batch"

        def __init__(self, config: HaloHFConfig, halo: HaloModel | None = None) -> None:
            super().__init__(config)
            if halo is None:  # an untrained model: a layout with the config's number of slots
                cfg = config.halo_config()
                layout = ConditionLayout(groups={"group": [f"c{i}" for i in range(cfg.n_conditions - 2)]}
                                         if cfg.n_conditions > 2 else {})
                halo = HaloModel(cfg, layout)
            self.halo = halo
            self.post_init()

        def _init_weights(self, module: torch.nn.Module) -> None:
            pass  # HaloModel initialises (or loads) its own weights

        def forward(self, batch: Any, return_dict: bool = True) -> HaloRecordsOutput:
            """Teacher-forced logits of a ``train.collate`` batch: HaloModel's own computation."""
            halo = self.halo
            h = halo.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions)
            h = h.reshape(-1, h.shape[-1])
            logits = halo.fine.logits(h[batch.target_hidden], batch.visit_codes, batch.code_ptr,
                                      halo.code_offsets(batch.cond, batch.target_record))
            out = halo(batch)
            return HaloRecordsOutput(loss=out.loss, logits=logits, end_logits=halo.end_logit(h[batch.end_hidden], batch.end_hidden % batch.n_positions),
                                     record_nll=out.record_nll)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                            **kwargs: Any) -> HaloForRecords:
            """Load a model folder (or a Hub repository, downloaded first) through ``HaloModel``."""
            path = Path(pretrained_model_name_or_path)
            if not path.is_dir():
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(str(pretrained_model_name_or_path),
                                              revision=kwargs.get("revision"), token=kwargs.get("token")))
            halo = HaloModel.from_pretrained(path, map_location=kwargs.get("device_map") or "cpu")
            config = HaloHFConfig(**{k: v for k, v in halo.config.to_dict().items() if k != "model_type"})
            model = cls(config, halo=halo)
            model.name_or_path = str(pretrained_model_name_or_path)
            return model.eval()

        def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, evaluation: str | os.PathLike
                            | dict | None = None, training: str | os.PathLike | dict | None = None,
                            **kwargs: Any) -> Path:
            """The model folder (``HaloModel.save_pretrained``) and its ``README.md`` model card."""
            directory = self.halo.save_pretrained(save_directory)
            card = model_card(self.halo, training=training, evaluation=evaluation)
            atomic_write_bytes(directory / CARD_FILE, card.encode())
            return directory

        def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                        commit_message: str = "Upload halo_balance generator", evaluation: Any = None,
                        training: Any = None, **kwargs: Any) -> Any:
            """Create (or reuse) ``repo_id`` on the Hub and upload the folder :meth:`save_pretrained`
            writes, model card included (needs a network and a token), without ``record_counts.parquet``:
            the training records' digests would let anyone test a guessed record for membership
            (``copies.py``); they stay with the data team."""
            from huggingface_hub import HfApi

            from .copies import RECORD_COUNTS_FILE

            api = HfApi(token=token if isinstance(token, str) else None)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            with tempfile.TemporaryDirectory() as tmp:
                self.save_pretrained(tmp, evaluation=evaluation, training=training)
                (Path(tmp) / RECORD_COUNTS_FILE).unlink(missing_ok=True)
                return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)

    for cls in (HaloHFConfig, HaloForRecords):
        cls.__qualname__ = cls.__name__
    _CLASSES = (HaloHFConfig, HaloForRecords)
    return _CLASSES


_CLASSES: tuple[type, type] | None = None


@dataclass
class HaloRecordsOutput:
    """:meth:`HaloForRecords.forward`: ``logits`` (real visits x V), ``end_logits``, ``loss`` (nats per
    visit) and ``record_nll`` (per record), as :class:`~halo_balance.model.HaloModel` computes them."""

    loss: Any
    logits: Any
    end_logits: Any
    record_nll: Any


def register() -> None:
    """Register the config and model with ``transformers``' ``AutoConfig`` / ``AutoModel`` (idempotent)."""
    transformers = _transformers()
    config_cls, model_cls = _classes()
    transformers.AutoConfig.register(MODEL_TYPE, config_cls, exist_ok=True)
    transformers.AutoModel.register(config_cls, model_cls, exist_ok=True)


def __getattr__(name: str) -> Any:
    if name in ("HaloHFConfig", "HaloForRecords"):
        return dict(zip(("HaloHFConfig", "HaloForRecords"), _classes()))[name]
    raise AttributeError(f"module 'halo_balance.hf' has no attribute {name!r}")


# ---------------------------------------------------------------------- model card
def model_card(model: Any, *, training: str | os.PathLike | dict | None = None,
               evaluation: str | os.PathLike | dict | None = None) -> str:
    """The ``README.md`` of a model folder: YAML metadata header, then data, figures, use and limits.

    ``training``: ``training.json`` (its content or path); ``evaluation``: a
    ``halo_balance.evaluate`` ``report.json``. Figures that are not given are said to be missing.
    """
    training = _json(training) or {}
    report = _json(evaluation)
    meta = model.dataset_meta or {}
    layout = model.layout
    counts = meta.get("counts", {})
    source = meta.get("source", {}) or {}
    pre = meta.get("preprocessing", {}) or {}
    labs = pre.get("labs", {}) or {}
    dp = training.get("dp")
    epsilon = dp.get("epsilon") if isinstance(dp, dict) else dp
    tags = ["halo-balance", "synthetic-data", "electronic-health-records", "fairness", "generative-model"]
    header = ["---", "library_name: halo-balance", "license: other", "tags:"] + [f"- {t}" for t in tags]
    if report:
        header += ["model-index:", "- name: halo_balance generator", "  results:", "  - task:",
                   "      type: synthetic-data-generation", "    metrics:"]
        for name, value in _headline(report).items():
            if value is not None:
                header += [f"    - type: {name}", f"      value: {value:.4g}"]
    header.append("---")
    n_cells = len(layout.cells)
    cfg = model.config
    lines = ["", "# halo_balance generator", "",
             f"A conditional HALO transformer (halo_balance {_version()}) that generates longitudinal patient "
             f"records given the outcome `{layout.outcome}` and the group memberships "
             f"{', '.join(f'`{a}`' for a in layout.attributes) or '(none)'}. Load it with "
             "`import halo_balance; transformers.AutoModel.from_pretrained(...)` or "
             "`halo_balance.HaloModel.from_pretrained(...)`; sample with `python -m halo_balance.sample`.", "",
             "## Training data", "",
             f"- source: {source.get('name', 'unknown')} {source.get('version', '')}".rstrip(),
             f"- patients: {counts.get('patients', 'unknown')}, visits: {counts.get('visits', 'unknown')}, "
             f"synthetic among them: {counts.get('synthetic_patients', 0)}",
             f"- vocabulary: {cfg.vocab_size} tokens; outcome `{meta.get('outcome', layout.outcome)}`",
             f"- preprocessing: `{pre.get('module', 'unknown')}` with {json.dumps(pre.get('parameters', {}))}; "
             f"labs from `{labs.get('source', 'none')}` ({labs.get('n_items', 0)} items, "
             f"{labs.get('n_bins', '-')} bins, {labs.get('aggregate', '-')} per visit)",
             f"- cells (outcome x groups) seen in training: {n_cells}", ""]
    if n_cells:
        attrs = layout.attributes
        lines += ["| label | " + " | ".join(attrs) + " | patients |",
                  "| --- | " + " | ".join("---" for _ in attrs) + " | --- |"]
        largest = sorted(layout.cells, key=lambda c: (-c["n"], c["label"]))
        lines += [f"| {c['label']} | " + " | ".join(str(c[a]) for a in attrs) + f" | {c['n']} |"
                  for c in largest[:MAX_CARD_CELLS]]
        if n_cells > MAX_CARD_CELLS:
            lines.append(f"\n({n_cells - MAX_CARD_CELLS} smaller cells not listed; all in `conditions.json`)")
        lines.append("")
    lines += ["## Model and training", "",
              f"- sizes: preset `{cfg.preset}`, {cfg.n_layer} layers x {cfg.n_embd} wide, {cfg.n_head} heads, "
              f"fine module width {cfg.fine_hidden}, context {cfg.n_ctx} visits; "
              f"{sum(p.numel() for p in model.parameters()):,} parameters"]
    if training:
        lines.append(f"- best validation loss {_fmt(training.get('best_loss'))} nats per visit (epoch "
                     f"{training.get('best_epoch')}); marginal-frequency model {_fmt(training.get('marginal_val_loss'))}")
    lines.append(f"- differential privacy: epsilon = {epsilon}" if epsilon is not None else
                 "- differential privacy: none (trained without a DP guarantee; `training.json` records no `dp`)")
    lines += ["", "## Evaluation", ""]
    if report:
        h = _headline(report)
        lines += [f"- fidelity: unigram R^2 per visit {_fmt(h['unigram_r2'])} (real reference: a held-out real "
                  f"sample in place of the synthetic one, {_fmt(h['unigram_r2_reference'])})",
                  f"- privacy: synthetic records identical to a training record {h['exact_copies']}; "
                  f"membership inference AUROC (distance) {_fmt(h['membership_auroc_distance'])}"
                  + (f", (likelihood) {_fmt(h['membership_auroc_likelihood'])}"
                     if h['membership_auroc_likelihood'] is not None else "") + " (0.5 = nothing learned)",
                  f"- report: created {report.get('created', '?')}; every figure in its `report.json`"]
    else:
        lines.append("Not evaluated: run `python -m halo_balance.evaluate` and pass its `report.json` to "
                     "`python -m halo_balance.hf --evaluation` to add the fidelity and privacy figures.")
    lines += ["", "## Intended use", "",
              "Rebalancing training data for clinical prediction research: topping up under-filled "
              "(outcome x group) cells with synthetic patients before a downstream model is fitted, and "
              "benchmarking that against other rebalancing methods (`python -m benchmarks.kfold`).", "",
              "## Limits", "",
              "- Synthetic records follow the training data's patterns, biases and coding practices; they are "
              "not clinical evidence and must not be used for individual care decisions.",
              "- Records are token sets per visit (diagnosis categories, binned lab values"
              + (", binned ages and gaps" if pre.get("time_bins") else "") + "); values and dates decoded "
              "from them (`python -m halo_balance.export`) are drawn, not observed.",
              "- Without differential privacy the model may memorise training patients; check the privacy "
              "figures before sharing it or its output, and share it only where the training data's "
              "licence allows.",
              "- Cells with few training patients are learned poorly; measure on your data before relying on "
              "the augmented data (`benchmarks/RESULTS.md`).", ""]
    return "\n".join(header + lines)


def _headline(report: dict) -> dict[str, Any]:
    fid, priv = report.get("fidelity", {}), report.get("privacy", {})
    uni = fid.get("statistics", {}).get("unigram_per_visit", {})
    mia = priv.get("membership_inference", {})
    return {"unigram_r2": uni.get("r2"), "unigram_r2_reference": uni.get("reference_r2"),
            "exact_copies": priv.get("exact_copies", {}).get("synthetic_copies"),
            "membership_auroc_distance": (mia.get("distance") or {}).get("auroc"),
            "membership_auroc_likelihood": (mia.get("likelihood") or {}).get("auroc")}


def _json(x: str | os.PathLike | dict | None) -> dict | None:
    if x is None or isinstance(x, dict):
        return x
    path = Path(x)
    if not path.is_file():
        raise HaloBalanceError(f"{path} not found")
    return read_json(path)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "n/a"


def _version() -> str:
    import halo_balance

    return halo_balance.__version__


# ---------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m halo_balance.hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="trained model folder (python -m halo_balance.train)")
    p.add_argument("--out", required=True, help="folder to write the Hugging Face model (with README.md) to")
    p.add_argument("--evaluation", default=None, metavar="REPORT", help="report.json of halo_balance.evaluate")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload to this Hub repository")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only one this package wrote)")
    a = p.parse_args(argv)
    check_output_dir(a.out, overwrite=a.overwrite, inputs=[a.model, a.evaluation], what="--out")
    register()
    _, model_cls = _classes()
    model = model_cls.from_pretrained(a.model)
    training = Path(a.model) / TRAINING_FILE
    training = training if training.is_file() else None
    if Path(a.out).exists():  # checked: a folder this package wrote, and --overwrite was given
        shutil.rmtree(a.out)
    out = model.save_pretrained(a.out, evaluation=a.evaluation, training=training)
    print(f"wrote {out} (model card: {out / CARD_FILE})")
    if a.push_to_hub:
        model.push_to_hub(a.push_to_hub, evaluation=a.evaluation, training=training)
        print(f"pushed to {a.push_to_hub}")


if __name__ == "__main__":
    run(main)
