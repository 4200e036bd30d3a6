"""Scores: self-influence equals diag(pairwise); TracIn is G Gᵀ; exact matches the oracle; determinism."""

import pytest
import torch

import hf_influence as hfi
from hf_influence.engine.scoring import random_subspace
from tests import utils


@pytest.fixture(scope="module")
def small_basis(bert_oracle):
    return bert_oracle["inf"].fit_arnoldi(bert_oracle["train"], rank=20, iterations=40)


@pytest.mark.parametrize("method", ["tracin", "arnoldi", "randproj"])
def test_self_influence_is_diagonal_of_pairwise(bert_oracle, small_basis, method):
    inf, train = bert_oracle["inf"], bert_oracle["train"]
    subset = train.select(range(10))
    pairwise = inf.scores(subset, subset, method=method, basis=small_basis, hessian_data=train)
    self_inf = inf.self_influence(subset, method=method, basis=small_basis, hessian_data=train)
    torch.testing.assert_close(self_inf, torch.diagonal(pairwise), rtol=1e-9, atol=1e-12)


def test_exact_method_matches_oracle(bert_oracle):
    inf = bert_oracle["inf"]
    ours = inf.scores(bert_oracle["test"], bert_oracle["train"], method=hfi.Method.EXACT)
    torch.testing.assert_close(ours, bert_oracle["pairwise"], rtol=1e-7, atol=1e-12)


def test_tracin_is_gradient_dot_product(bert_oracle):
    ours = bert_oracle["inf"].scores(bert_oracle["test"], bert_oracle["train"], method="tracin")
    torch.testing.assert_close(ours, bert_oracle["g_test"] @ bert_oracle["g_train"].T, rtol=1e-9, atol=1e-12)


def test_randproj_equals_subspace_formula_and_is_seeded(bert_oracle):
    """Scores = (G Q)(Qᵀ H Q + λI)^-1 (G Q)ᵀ with Q the seeded random subspace and H the explicit Hessian."""
    inf = bert_oracle["inf"]
    test, train = bert_oracle["test"], bert_oracle["train"]
    first = inf.scores(test, train, method="randproj", rank=30)
    q = random_subspace(inf.selection.num_params, 30, torch.Generator().manual_seed(inf.seed), torch.float64).T  # [P, 30]
    inner = torch.linalg.inv(q.T @ bert_oracle["hessian"] @ q + utils.BERT_DAMPING * torch.eye(30, dtype=torch.float64))
    expected = (bert_oracle["g_test"] @ q) @ inner @ (bert_oracle["g_train"] @ q).T
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-10)
    assert torch.equal(first, inf.scores(test, train, method="randproj", rank=30))
    reseeded = hfi.Influence(inf.model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, seed=1, progress=False)
    assert not torch.allclose(first, reseeded.scores(test, train, method="randproj", rank=30))


def test_batch_size_does_not_change_scores(bert_oracle, small_basis):
    inf = bert_oracle["inf"]
    one = hfi.Influence(inf.model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=1, progress=False)
    subset = bert_oracle["train"].select(range(12))
    torch.testing.assert_close(
        one.self_influence(subset, basis=small_basis), inf.self_influence(subset, basis=small_basis), rtol=1e-9, atol=1e-12
    )


def test_dataloader_input_equals_dataset_input(bert_oracle):
    from torch.utils.data import DataLoader

    from hf_influence.data import PaddingCollator

    inf, test, train = bert_oracle["inf"], bert_oracle["test"], bert_oracle["train"]
    loader = DataLoader(train, batch_size=5, collate_fn=PaddingCollator())
    torch.testing.assert_close(inf.scores(test, loader, method="tracin"), inf.scores(test, train, method="tracin"), rtol=1e-9, atol=1e-12)
