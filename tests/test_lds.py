"""LDS (hf_influence/lds.py): against a hand computation, on ridge regression where exact influence is retrained
exactly, its checks and seeding, and the resumable subset-model helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import hf_influence as hfi
from hf_influence._utils.errors import DamagedArtifactError, InvalidInputError
from hf_influence.lds import SUBSET_MODEL_FILE, load_subset_outputs, run_subset_models

HAND_ATOL = 1e-12  # our Spearman vs scipy's, float64
RIDGE_LDS_FLOOR = 0.9  # exact influence on ridge regression with small subset effects (issue 20)


def test_lds_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 4, generator=g, dtype=torch.float64)
    subsets = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    outputs = torch.randn(6, 3, generator=g, dtype=torch.float64)
    result = hfi.lds(scores, subsets, outputs)
    expected = []
    for t in range(3):
        predicted = [-sum(float(scores[t, i]) for i in range(4) if subsets[m, i]) for m in range(6)]  # -Σ_{i∈S} scores[t, i]
        expected.append(spearmanr(predicted, outputs[:, t].numpy()).statistic)
    np.testing.assert_allclose(result.per_test.numpy(), expected, atol=HAND_ATOL)
    assert result.mean == pytest.approx(np.mean(expected), abs=HAND_ATOL)
    assert result.ci[0] <= result.mean <= result.ci[1]


def test_lds_sign_convention_and_ties():
    subsets = hfi.lds_subsets(10, num_models=8, seed=3)
    scores = torch.arange(1.0, 21.0).reshape(2, 10)  # every row helps: keeping more score lowers the loss
    kept = (subsets.double() @ scores.double().T)  # [M, 2]
    assert hfi.lds(scores, subsets, torch.exp(-kept)).mean == pytest.approx(1.0)  # loss falls as kept score rises
    assert hfi.lds(scores, subsets, kept).mean == pytest.approx(-1.0)
    constant = torch.cat([torch.exp(-kept[:, :1]), torch.ones(8, 1, dtype=torch.float64)], dim=1)
    result = hfi.lds(scores, subsets, constant)  # a test row whose loss never changes has no correlation
    assert torch.isnan(result.per_test[1]) and result.mean == pytest.approx(1.0)


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    return torch.linalg.solve(x.T @ x + l2 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)


def test_exact_influence_on_ridge_regression_scores_high_lds():
    g = torch.Generator().manual_seed(0)
    n, d, n_test, l2 = 300, 6, 20, 30.0
    x, x_test = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n_test, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y, y_test = x @ w_true + torch.randn(n, generator=g, dtype=torch.float64), x_test @ w_true + torch.randn(n_test, generator=g, dtype=torch.float64)
    w = _ridge_fit(x, y, l2)
    g_train, g_test = x * (x @ w - y)[:, None], x_test * (x_test @ w - y_test)[:, None]  # gradients of ½(xᵀw - y)²
    hessian = (x.T @ x + l2 * torch.eye(d, dtype=torch.float64)) / n  # mean loss; damping = l2 / n
    scores = g_test @ torch.linalg.solve(hessian, g_train.T)  # [n_test, n], positive = helps
    subsets = hfi.lds_subsets(n, num_models=60, fraction=0.9, seed=0)  # small subset effects: each drops 10%
    outputs = torch.stack([0.5 * (x_test @ _ridge_fit(x[s], y[s], l2) - y_test) ** 2 for s in subsets])  # exact retraining
    result = hfi.lds(scores, subsets, outputs)
    assert result.mean >= RIDGE_LDS_FLOOR
    shuffled = hfi.lds(scores[:, torch.randperm(n, generator=g)], subsets, outputs)  # scores not tied to their rows
    assert abs(shuffled.mean) < 0.3


def test_subsets_seeded_and_sized():
    subsets = hfi.lds_subsets(11, num_models=5, fraction=0.5, seed=7)
    assert subsets.dtype == torch.bool and subsets.shape == (5, 11)
    assert (subsets.sum(dim=1) == 6).all()  # round(5.5) = 6 rows each
    assert torch.equal(subsets, hfi.lds_subsets(11, num_models=5, fraction=0.5, seed=7))
    assert not torch.equal(subsets, hfi.lds_subsets(11, num_models=5, fraction=0.5, seed=8))


def test_bootstrap_ci_is_seeded():
    g = torch.Generator().manual_seed(0)
    subsets = hfi.lds_subsets(12, num_models=10)
    scores, outputs = torch.randn(30, 12, generator=g), torch.randn(10, 30, generator=g)
    first, again, other = hfi.lds(scores, subsets, outputs), hfi.lds(scores, subsets, outputs), hfi.lds(scores, subsets, outputs, seed=1)
    assert first.ci == again.ci and first.ci != other.ci
    narrow = hfi.lds(scores, subsets, outputs, confidence=0.5)
    assert first.ci[0] < narrow.ci[0] <= narrow.ci[1] < first.ci[1]


@pytest.mark.parametrize("scores, subsets, outputs, message", [
    (torch.zeros(2, 5), torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 2), "same N training rows"),
    (torch.zeros(2, 5), torch.ones(4, 5, dtype=torch.bool), torch.zeros(2, 4), r"must be \[M, n_test\] = \[4, 2\]"),
    (torch.zeros(2, 5), torch.ones(4, 5), torch.zeros(4, 2), "bool tensor"),
    (torch.zeros(2, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.bool), torch.zeros(4, 2), "floating-point"),
    (torch.zeros(5), torch.ones(4, 5, dtype=torch.bool), torch.zeros(4, 2), "2-D"),
    (torch.zeros(2, 5), torch.ones(4, 5, dtype=torch.bool), torch.full((4, 2), float("nan")), "NaN or Inf"),
    (torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 2), "at least 3 subset models"),
])
def test_lds_refuses_bad_inputs(scores, subsets, outputs, message):
    with pytest.raises(InvalidInputError, match=message):
        hfi.lds(scores, subsets, outputs)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_train": 1}, "num_train"), ({"num_train": 10, "num_models": 2}, "num_models"),
    ({"num_train": 10, "fraction": 1.0}, "fraction"), ({"num_train": 3, "fraction": 0.1}, "at least 1 row"),
])
def test_subsets_refuse_bad_settings(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        hfi.lds_subsets(**kwargs)


def _recording_train_fn(calls: list[int]):
    def train_fn(index: int, subset: torch.Tensor) -> torch.Tensor:
        calls.append(index)
        return subset.double()[:3] + index  # stands in for retraining: any deterministic per-subset result
    return train_fn


def test_subset_models_resume_split_and_recompute_damaged(tmp_path):
    subsets = hfi.lds_subsets(8, num_models=5, seed=0)
    calls: list[int] = []
    assert run_subset_models(_recording_train_fn(calls), subsets, tmp_path, rank=1, world_size=2) == [1, 3]
    with pytest.raises(InvalidInputError, match=r"\[0, 2, 4\]"):
        load_subset_outputs(subsets, tmp_path)
    assert run_subset_models(_recording_train_fn(calls), subsets, tmp_path) == [0, 2, 4]  # 1 and 3 kept
    expected = torch.stack([subsets[m].double()[:3] + m for m in range(5)])
    assert torch.equal(load_subset_outputs(subsets, tmp_path), expected)
    damaged = tmp_path / SUBSET_MODEL_FILE.format(index=2)
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 1
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DamagedArtifactError, match="subset model 2"):
        load_subset_outputs(subsets, tmp_path)
    calls.clear()
    assert run_subset_models(_recording_train_fn(calls), subsets, tmp_path) == [2] and calls == [2]
    assert torch.equal(load_subset_outputs(subsets, tmp_path), expected)
    with pytest.raises(InvalidInputError, match="another subset"):
        run_subset_models(_recording_train_fn(calls), hfi.lds_subsets(8, num_models=5, seed=1), tmp_path)
