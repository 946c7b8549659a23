"""The model: exact within-visit autoregression, conditioning, KV cache, likelihood, save/load."""

from __future__ import annotations


import numpy as np
import polars as pl
import pytest
import torch

from halo_balance.config import PRESETS, ConditionLayout, HaloConfig, exclusive_token_groups, parse_condition
from halo_balance.errors import HaloBalanceError, IncompatibleModelError
from halo_balance.model import HaloModel
from halo_balance.train import EncodedRecords, collate
from tests.conftest import make_learnable_dataset, make_tiny_dataset


def random_model(dataset=None, *, seed: int = 0, n_ctx: int = 6, code_bias: float = -2.0,
                 end_bias: float = -0.5, scale: float = 0.4, **sizes) -> HaloModel:
    """A tiny untrained model with sizeable weights (strong dependencies) and sparse visits."""
    dataset = dataset if dataset is not None else make_learnable_dataset(50)
    layout = ConditionLayout.from_dataset(dataset)
    cfg = HaloConfig.from_preset("tiny", vocab_size=dataset.vocab_size, n_conditions=layout.n_slots,
                                 n_ctx=n_ctx, **sizes)
    torch.manual_seed(seed)
    model = HaloModel.for_dataset(dataset, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "ln" not in name:
                p.normal_(0.0, scale)
        model.fine.out.bias.fill_(code_bias)
        model.end_head.bias.fill_(end_bias)
    return model.eval()


def _visits(codes_per_visit: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(c) for c in codes_per_visit]
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
    flat = torch.tensor([c for v in codes_per_visit for c in v], dtype=torch.long)
    return flat, ptr


# ---------------------------------------------------------------------- the fine module
def test_logit_depends_only_on_state_and_earlier_tokens():
    model = random_model()
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    h = torch.randn(1, model.config.n_embd)
    visit = sorted(rng.choice(V, size=8, replace=False).tolist())
    with torch.no_grad():
        base = model.fine.logits(h, *_visits([visit]))[0]
        changed_later = changed_earlier = 0
        for i in range(V):
            later = sorted(set(c for c in visit if c < i) | set(rng.choice(np.arange(i, V), size=min(5, V - i),
                                                                           replace=False).tolist()))
            other = model.fine.logits(h, *_visits([later]))[0]
            torch.testing.assert_close(other[i], base[i], rtol=0, atol=1e-5)  # tokens j >= i: float rounding only
            changed_later += int(not torch.equal(other[i + 1:], base[i + 1:]))
            if i > 0:  # ... while a token before i does
                j = int(rng.integers(0, i))
                flipped = sorted(set(visit) ^ {j})
                changed_earlier += int(abs(float(model.fine.logits(h, *_visits([flipped]))[0][i] - base[i])) > 1e-4)
    assert changed_earlier == V - 1
    assert changed_later > 0


def test_visit_probabilities_sum_to_one():
    """The factorisation is a distribution over all 2^V visits (V = 5), for several coarse states."""
    model = random_model(make_tiny_dataset(), code_bias=-0.5, scale=0.8)
    visits = [[i for i in range(5) if mask >> i & 1] for mask in range(32)]
    h = torch.randn(3, model.config.n_embd)
    with torch.no_grad():
        for row in range(3):
            nll = model.fine.visit_nll(h[row].expand(32, -1), *_visits(visits))
            assert float(torch.exp(-nll.double()).sum()) == pytest.approx(1.0, abs=1e-5)


def test_fine_parameters_grow_as_v_times_h():
    for V in (100, 2000):
        cfg = HaloConfig.from_preset("small", vocab_size=V, n_conditions=6)
        model = HaloModel(cfg, ConditionLayout(groups={"g": ["a", "b", "c", "d"]}))
        assert sum(p.numel() for p in model.fine.parameters()) == cfg.n_fine_parameters
    big = HaloConfig.from_preset("small", vocab_size=4000, n_conditions=6)
    assert big.n_fine_parameters - cfg.n_fine_parameters == 2 * 2000 * big.fine_hidden + 2000


# ---------------------------------------------------------------------- coarse model and conditioning
# the learnable data's blocks belong to different patients: no visit holds both 7 and 8 (15 and 16, 23 and 24)
STRUCTURES = [{"condition_every_visit": False, "empty_visit_event": False, "position_event_bias": False},
              {"condition_every_visit": True, "empty_visit_event": True, "position_event_bias": True,
               "exclusive_groups": [[7, 8], [15, 16], [23, 24]]}]


@pytest.mark.parametrize("structure", STRUCTURES, ids=["plain", "structured"])
def test_conditioning_visit_is_context_never_target(learnable, structure):
    enc = EncodedRecords.from_dataset(learnable, ConditionLayout.from_dataset(learnable), n_ctx=6)
    rows = np.arange(40)
    batch = collate(enc, rows)
    L, T = enc.lengths[rows], batch.n_positions
    assert T == L.max() + 1  # padded to this batch's longest record, not the context
    assert batch.n_visits == L.sum()  # one target per real visit, nothing for position 0
    t = batch.target_hidden.numpy() % T
    assert t.min() == 0 and np.all(t < L[batch.target_record.numpy()])  # h_t predicts visit t+1 <= L
    end_t = batch.end_hidden.numpy() % T
    assert end_t.min() == 1  # no end bit before the first visit
    assert batch.end_target.sum() == (L < 5).sum()  # "end" after the last visit unless forced at n_ctx-1

    model = random_model(learnable, **structure)
    with torch.no_grad():
        out = model(batch)
        # conditions change the record's likelihood (they are context) ...
        flipped = collate(enc, rows)
        flipped.cond[:, 0] = 1 - flipped.cond[:, 0]
        assert not torch.allclose(model(flipped).record_nll, out.record_nll)
    # ... but the loss is exactly the chain over real visits and end bits, computed incrementally
    manual = _chain_nll(model, learnable.records(), rows, enc)
    assert torch.isfinite(manual).all()
    torch.testing.assert_close(out.record_nll, manual, rtol=1e-5, atol=1e-4)


def _chain_nll(model, rec, rows, enc) -> torch.Tensor:
    """-log P(record | c) step by step with the KV cache: visits 1..L, end bits at h_1..h_L."""
    out = []
    with torch.no_grad():
        for p in rows:
            cache, cond = model.new_cache(1, device="cpu"), torch.from_numpy(enc.cond[[p]])
            h = model.step(model.condition_input(cond), cache, cond)
            visits, total = rec.patient(p), 0.0
            for t, visit in enumerate(visits):  # h is h_t, of position t
                if t > 0:
                    total += float(torch.nn.functional.softplus(model.end_logit(h, t)))  # -log P(not end)
                codes, ptr = _visits([visit])
                total += float(model.fine.visit_nll(h, codes, ptr, t))
                h = model.step(model.visit_input(codes, ptr[:-1]), cache, cond)
            if len(visits) < model.config.n_ctx - 1:
                total += float(torch.nn.functional.softplus(-model.end_logit(h, len(visits))))  # -log P(end)
            out.append(total)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("structure", STRUCTURES, ids=["plain", "structured"])
def test_kv_cache_matches_full_forward(learnable, structure):
    model = random_model(learnable, **structure)
    enc = EncodedRecords.from_dataset(learnable, model.layout, n_ctx=6)
    rows = np.flatnonzero(enc.lengths == 4)[:5]
    batch = collate(enc, rows)
    with torch.no_grad():
        full = model.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions)
        cache = model.new_cache(len(rows), device="cpu")
        steps = [model.step(model.condition_input(batch.cond), cache, batch.cond)]
        for t in range(batch.n_positions - 1):
            bags = [batch.visit_codes[batch.code_ptr[r * 4 + t]:batch.code_ptr[r * 4 + t + 1]] for r in range(len(rows))]
            codes, ptr = _visits([b.tolist() for b in bags])
            steps.append(model.step(model.visit_input(codes, ptr[:-1]), cache, batch.cond))
        torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
        # causal: the future does not change the past
        later = collate(enc, rows)
        later.visit_codes = later.visit_codes.clone()
        later.visit_codes[later.code_ptr[3]:later.code_ptr[4]] = (later.visit_codes[later.code_ptr[3]:later.code_ptr[4]] + 1) % 40
        again = model.hidden_states(later.cond, later.visit_codes, later.visit_offsets, later.n_positions)
        torch.testing.assert_close(again[0, :4], full[0, :4])
        assert not torch.allclose(again[0, 4], full[0, 4])


# ---------------------------------------------------------------------- persistence and compatibility
def test_save_load_round_trips_logits_exactly(learnable, tmp_path):
    model = random_model(learnable)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "conditions.json", "config.json", "dataset_meta.json", "model.safetensors", "vocab.parquet"]
    loaded = HaloModel.from_pretrained(tmp_path / "m")
    enc = EncodedRecords.from_dataset(learnable, model.layout, n_ctx=6)
    batch = collate(enc, np.arange(64))
    with torch.no_grad():
        assert torch.equal(model(batch).record_nll, loaded(batch).record_nll)
        h = torch.randn(4, model.config.n_embd)
        codes, ptr = _visits([[1, 5], [], [0, 39], [7]])
        assert torch.equal(model.fine.logits(h, codes, ptr), loaded.fine.logits(h, codes, ptr))
    assert loaded.config == model.config and loaded.layout.to_dict() == model.layout.to_dict()
    assert loaded.vocab.equals(learnable.vocab)


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(HaloBalanceError, match="is not a saved model .it lacks config.json"):
        HaloModel.from_pretrained(tmp_path)


def test_check_compatible_says_what_differs(learnable):
    model = random_model(learnable)
    model.check_compatible(learnable)
    renamed = learnable.vocab.with_columns(
        token=pl.when(pl.col("id") == 3).then(pl.lit("other")).otherwise(pl.col("token")))
    bad_vocab = type(learnable)(learnable.visits, learnable.patients, renamed, learnable.meta)
    with pytest.raises(IncompatibleModelError, match=r"only in the model, e.g. \['tok3'\].*only in the dataset, e.g. \['other'\]"):
        model.check_compatible(bad_vocab)
    meta = {**learnable.meta, "groups": {"gender": ["F", "M", "X"], "age_group": ["18-64", "65+"]}}
    with pytest.raises(IncompatibleModelError, match=r"categories of 'gender' differ: model \['F', 'M'\], dataset \['F', 'M', 'X'\]"):
        model.check_compatible(type(learnable)(learnable.visits, learnable.patients, learnable.vocab, meta))
    meta = {**learnable.meta, "groups": {"gender": ["F", "M"]}}
    with pytest.raises(IncompatibleModelError, match="group attributes differ"):
        model.check_compatible(type(learnable)(learnable.visits, learnable.patients, learnable.vocab, meta))


# ---------------------------------------------------------------------- config and layout
def test_config_presets_and_round_trip():
    for name in PRESETS:
        cfg = HaloConfig.from_preset(name, vocab_size=100, n_conditions=7, n_ctx=10)
        assert cfg.n_ctx == 10 and cfg.preset == name
        assert HaloConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(HaloBalanceError, match="divisible by n_head"):
        HaloConfig(vocab_size=10, n_conditions=2, n_embd=10, n_head=3)
    with pytest.raises(HaloBalanceError, match="unknown keys"):
        HaloConfig.from_dict({**cfg.to_dict(), "extra": 1})
    with pytest.raises(HaloBalanceError, match="preset: unknown"):
        HaloConfig.from_preset("huge", vocab_size=10, n_conditions=2)


def test_layout_encodes_and_completes_conditions(learnable):
    layout = ConditionLayout.from_dataset(learnable)
    assert layout.slot_names() == ["label=0", "label=1", "gender=F", "gender=M", "age_group=18-64", "age_group=65+"]
    frame = pl.DataFrame({"label": [1, 0], "gender": ["M", "F"], "age_group": ["65+", "18-64"]})
    assert layout.encode(frame).tolist() == [[1, 3, 5], [0, 2, 4]]
    with pytest.raises(HaloBalanceError, match="'gender': value 'X'"):
        layout.encode(frame.with_columns(gender=pl.lit("X")))
    with pytest.raises(HaloBalanceError, match="lack column"):
        layout.encode(frame.drop("age_group"))
    assert ConditionLayout.from_dict(layout.to_dict()) == layout

    drawn = layout.complete({"label": 1}, 4000, seed=0)
    assert drawn["label"].unique().to_list() == [1]
    positives = learnable.patients.filter(pl.col("label") == 1)
    share_m = (positives["gender"] == "M").mean()
    assert (drawn["gender"] == "M").mean() == pytest.approx(share_m, abs=0.03)  # training frequencies
    full = layout.complete(parse_condition("label=0, gender=F, age_group=65+"), 3)
    assert full.rows() == [(0, "F", "65+")] * 3
    with pytest.raises(HaloBalanceError, match="condition attribute: unknown"):
        layout.complete({"race": "White"}, 1)
    with pytest.raises(HaloBalanceError, match="label must be 0 or 1"):
        parse_condition("label=2")
    empty = ConditionLayout(groups=layout.groups, cells=[c for c in layout.cells if c["label"] == 0])
    with pytest.raises(HaloBalanceError, match="no training patient has label=1"):
        empty.complete({"label": 1}, 1)



def test_blocked_logits_equal_a_direct_evaluation():
    """Every logit against its definition: the state after the visit's codes below it."""
    model = random_model(make_learnable_dataset(40, vocab_size=200), n_ctx=4, empty_visit_event=False)
    model.fine.max_blocks = 8  # blocks of 25 codes: visits span several blocks
    rng = np.random.default_rng(1)
    visits = [sorted(rng.choice(200, size=n, replace=False).tolist()) for n in (0, 1, 7, 40, 199, 200)]
    visits.append([24, 25, 49, 50, 199])  # codes on block edges
    h = torch.randn(len(visits), model.config.n_embd)
    fine = model.fine
    with torch.no_grad():
        got = fine.logits(h, *_visits(visits))
        nll = fine.visit_nll(h, *_visits(visits))
        for n, visit in enumerate(visits):
            x = torch.zeros(200)
            x[visit] = 1.0
            want_nll = torch.nn.functional.binary_cross_entropy_with_logits(got[n], x, reduction="sum")
            torch.testing.assert_close(nll[n], want_nll, rtol=1e-5, atol=1e-4)
        empty = fine.logits(h[:2], *_visits([[], []]))  # a batch without any code
        torch.testing.assert_close(empty, fine.out(fine.state(fine.proj(h[:2]))))
        for n, visit in enumerate(visits):
            chosen = torch.tensor(visit, dtype=torch.long)
            for i in range(200):
                s = fine.token_emb(chosen[chosen < i]).sum(0)
                want = fine.out(fine.state(fine.proj(h[n]) + s))[i]
                torch.testing.assert_close(got[n, i], want, rtol=1e-5, atol=1e-5)


def test_pair_terms_add_to_the_logits_of_later_codes():
    """With pair terms, logit i gains a_ji for every chosen j < i of the visit, across blocks, next to
    exclusive groups; the visit NLL is the BCE of those logits; save/load keeps them."""
    groups = [[20, 29]]
    model = random_model(make_learnable_dataset(40, vocab_size=200), n_ctx=4, exclusive_groups=groups,
                         empty_visit_event=False)
    model.fine.max_blocks = 8  # blocks of 25 codes
    visits = [[], [3, 22, 40], [22, 31], [10, 25, 160], [24, 49, 50, 151], [0, 199], [5, 24, 26, 30]]
    h = torch.randn(len(visits), model.config.n_embd)
    with torch.no_grad():
        plain = model.fine.logits(h, *_visits(visits))
    pairs = torch.tensor([[3, 40], [22, 40], [3, 22], [10, 160], [25, 160], [24, 26], [24, 151], [49, 50],
                          [0, 199], [5, 24], [5, 26], [22, 100], [150, 151]])
    weight = torch.linspace(-2.0, 2.0, len(pairs))
    model.set_pairs(pairs[torch.randperm(len(pairs))], None)  # zeros first: nothing changes
    assert model.config.n_pairs == len(pairs)
    with torch.no_grad():
        torch.testing.assert_close(model.fine.logits(h, *_visits(visits)), plain)
    model.set_pairs(pairs, weight)
    with torch.no_grad():
        got = model.fine.logits(h, *_visits(visits))
        nll = model.fine.visit_nll(h, *_visits(visits))
    want = plain.clone()
    for n, visit in enumerate(visits):
        for (j, i), a in zip(pairs.tolist(), weight.tolist()):
            if j in visit and not torch.isneginf(want[n, i]):
                want[n, i] += a
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, plain)
    for n, visit in enumerate(visits):
        x = torch.zeros(200)
        x[visit] = 1.0
        open_ = ~torch.isneginf(got[n])
        if x[~open_].any():  # two codes of the run [20, 29]: impossible, pair terms or not
            assert torch.isinf(nll[n]) and n == 6
            continue
        expected = torch.nn.functional.binary_cross_entropy_with_logits(got[n, open_], x[open_], reduction="sum")
        torch.testing.assert_close(nll[n], expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(HaloBalanceError, match="pair terms"):
        model.set_pairs(torch.tensor([[40, 3]]))


def test_pair_terms_round_trip_and_models_without_them_load(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path / "plain")
    assert not any(k.startswith("fine.pair") for k in model.state_dict())
    assert HaloModel.from_pretrained(tmp_path / "plain").config.n_pairs == 0
    model.set_pairs(torch.tensor([[1, 4], [0, 2]]), torch.tensor([0.5, -1.0]))
    model.save_pretrained(tmp_path / "pairs")
    back = HaloModel.from_pretrained(tmp_path / "pairs")
    assert back.config.n_pairs == 2
    assert back.fine.pair_index.tolist() == [[0, 2], [1, 4]] and back.fine.pair_weight.tolist() == [-1.0, 0.5]


def test_cell_terms_shift_the_code_biases_of_their_cells_records(tmp_path):
    """A record's likelihood under cell terms is its likelihood with each of its crossings' terms
    added to the code biases (the empty-visit event included); other records are unchanged; the
    terms round-trip through save/load and a model without them keeps its state dict."""
    import copy

    data = make_learnable_dataset(60, seed=1)
    model = random_model(data, n_ctx=5, exclusive_groups=[[3, 6]])  # empty-visit event on
    assert not any(k.startswith("fine.cell") for k in model.state_dict())
    enc = EncodedRecords.from_dataset(data, model.layout, 5)
    batch = collate(enc, np.arange(len(enc)))
    crossings = model.crossings(batch.cond)
    n = model.config.n_conditions
    deaths_f = n + model.layout.slot_names().index("gender=F")
    terms, weight = torch.tensor([[deaths_f, 0], [deaths_f, 4], [deaths_f, 9], [n + 1, 9], [1, 2]]), \
        torch.tensor([1.5, -2.0, 0.7, -0.4, 0.9])
    celled = copy.deepcopy(model)
    celled.set_cell_terms(terms, weight)
    assert celled.config.n_cell_terms == 5
    with torch.no_grad():
        got = celled(batch).record_nll
        plain = model(batch).record_nll
        for kind in {tuple(c) for c in crossings.tolist()}:
            rows = [r for r, c in enumerate(crossings.tolist()) if tuple(c) == kind]
            shifted = copy.deepcopy(model)
            for (s, i), c in zip(terms.tolist(), weight.tolist()):
                if s in kind:
                    shifted.fine.out.bias[i] += c
            want = shifted(batch).record_nll[rows]
            torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-4)
            if not set(kind) & set(terms[:, 0].tolist()):
                torch.testing.assert_close(got[rows], plain[rows], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, plain)
    celled.save_pretrained(tmp_path / "cells")
    back = HaloModel.from_pretrained(tmp_path / "cells")
    assert back.config.n_cell_terms == 5 and back.fine.cell_index.tolist() == sorted(terms.tolist())
    with torch.no_grad():
        torch.testing.assert_close(back(batch).record_nll, got)
    with pytest.raises(HaloBalanceError, match="cell terms"):
        celled.set_cell_terms(torch.tensor([[2 * n, 0]]))


def test_exclusive_groups_rule_codes_out_in_the_likelihood():
    """After a code of an exclusive run, the run's later codes have probability 0; the rest is unchanged."""
    groups = [[20, 29], [150, 199]]  # the second run ends at the vocabulary's end
    free = random_model(make_learnable_dataset(40, vocab_size=200), n_ctx=4, empty_visit_event=False)
    model = random_model(make_learnable_dataset(40, vocab_size=200), n_ctx=4, exclusive_groups=groups,
                         empty_visit_event=False)
    model.fine.max_blocks = 8  # blocks of 25 codes: a run spans two blocks
    visits = [[], [3, 22, 40], [22, 31], [21, 24], [10, 25, 160], [160, 199], [199], [24, 26, 49, 50, 151]]
    h = torch.randn(len(visits), model.config.n_embd)
    with torch.no_grad():
        got, want = model.fine.logits(h, *_visits(visits)), free.fine.logits(h, *_visits(visits))
        nll = model.fine.visit_nll(h, *_visits(visits))
    closed = torch.zeros(len(visits), 200, dtype=torch.bool)
    for n, visit in enumerate(visits):
        for c in visit:
            for a, b in groups:
                if a <= c <= b:
                    closed[n, c + 1:b + 1] = True
    assert torch.isneginf(got[closed]).all() and torch.equal(got[~closed], want[~closed])
    for n, visit in enumerate(visits):
        x = torch.zeros(200)
        x[visit] = 1.0
        if x[closed[n]].any():  # two codes of one run: impossible
            assert torch.isinf(nll[n]) and n in (3, 5, 7)
        else:
            open_ = ~closed[n]
            expected = torch.nn.functional.binary_cross_entropy_with_logits(got[n, open_], x[open_], reduction="sum")
            torch.testing.assert_close(nll[n], expected, rtol=1e-5, atol=1e-4)


def test_exclusive_token_groups_from_the_vocabulary_and_the_visits():
    tokens = ["dx9:428", "lab:1:1", "lab:1:2", "lab:1:3", "lab:2:1", "lab:2:2", "lab:3:1", "dx9:401",
              "time:gap:0", "time:gap:1", "lab:x:y", "lab:x:z", "lab:4:1", "lab:4:2"]
    kinds = ["diagnosis", *["lab"] * 6, "diagnosis", "time", "time", "lab", "lab", "lab", "lab"]
    vocab = pl.DataFrame({"id": pl.Series(range(len(tokens)), dtype=pl.Int32), "token": tokens, "kind": kinds,
                          "description": [""] * len(tokens)})
    groups, dropped = exclusive_token_groups(vocab)
    assert groups == [[1, 3], [4, 5], [8, 9], [12, 13]] and dropped == []  # a lone bin or a non-numeric one: none
    visits = [[0, 1, 4, 8], [2, 5, 9, 12], [12, 13], [3, 7]]  # lab:4 twice in one visit
    codes = np.array([c for v in visits for c in v])
    ptr = np.concatenate([[0], np.cumsum([len(v) for v in visits])])
    groups, dropped = exclusive_token_groups(vocab, codes, ptr)
    assert groups == [[1, 3], [4, 5], [8, 9]] and dropped == ["lab:4"]
    cfg = HaloConfig(vocab_size=len(tokens), n_conditions=4, exclusive_groups=groups)
    assert HaloConfig.from_dict(cfg.to_dict()).exclusive_groups == groups
    with pytest.raises(HaloBalanceError, match="exclusive_groups"):
        HaloConfig(vocab_size=len(tokens), n_conditions=4, exclusive_groups=[[4, 5], [1, 3]])
