"""Arnoldi against exact influence on a tiny trained BERT; the basis on disk."""

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import IncompatibleBasisError
from hf_influence.engine.ihvp.base import distill
from hf_influence.engine.spectrum import krylov_iteration
from tests import utils

RANK, ITERATIONS = 50, 100  # the trained model's Hessian has ~100 non-negligible eigenvalues


@pytest.fixture(scope="module")
def basis(bert_oracle):
    return bert_oracle["inf"].fit_arnoldi(bert_oracle["train"], rank=RANK, iterations=ITERATIONS)


def test_eigenvalues_match_explicit_hessian(bert_oracle, basis):
    exact = torch.linalg.eigvalsh(bert_oracle["hessian"])
    top = exact[exact.abs().argsort(descending=True)[:10]]
    torch.testing.assert_close(basis.eigenvalues[:10], top, rtol=1e-6, atol=1e-9)
    gram = basis.eigenvectors @ basis.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(RANK, dtype=gram.dtype), atol=1e-8, rtol=0)


def test_arnoldi_correlates_with_exact(bert_oracle, basis):
    inf = bert_oracle["inf"]
    pairwise = inf.scores(bert_oracle["test"], bert_oracle["train"], method="arnoldi", basis=basis)
    self_inf = inf.self_influence(bert_oracle["train"], method="arnoldi", basis=basis)
    assert utils.pearson(pairwise, bert_oracle["pairwise"]) >= utils.PEARSON_FLOOR
    assert utils.pearson(self_inf, bert_oracle["self"]) >= utils.PEARSON_FLOOR


def test_basis_round_trips_bit_for_bit(basis, tmp_path):
    path = basis.save(tmp_path)
    assert path.name == "arnoldi_basis.safetensors" and not list(tmp_path.glob("*.tmp"))
    loaded = hfi.ArnoldiBasis.load(tmp_path)
    assert torch.equal(loaded.eigenvalues, basis.eigenvalues)
    assert torch.equal(loaded.eigenvectors, basis.eigenvectors)
    assert loaded.metadata() == basis.metadata()


def test_basis_refused_for_another_model_or_selection(trained_bert, basis):
    model, train, _ = trained_bert
    other = utils.tiny_bert().double()
    with pytest.raises(IncompatibleBasisError, match="model weights"):
        hfi.Influence(other, last_n_layers=1, progress=False).self_influence(train, basis=basis)
    with pytest.raises(IncompatibleBasisError, match="parameter selection"):
        hfi.Influence(model, params=["classifier"], progress=False).self_influence(train, basis=basis)


def test_arnoldi_recovers_a_known_spectrum():
    """On an explicit symmetric matrix with full iterations, the distilled pairs are its eigenpairs."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    values = torch.linspace(-1, 5, 30, dtype=torch.float64)
    matrix = q @ torch.diag(values) @ q.T
    krylov, hessenberg = krylov_iteration(lambda v: matrix @ v, torch.randn(30, generator=g, dtype=torch.float64), 30, progress=False)
    eigenvalues, eigenvectors, residuals = distill(krylov, hessenberg, rank=5)
    torch.testing.assert_close(eigenvalues, torch.tensor([5.0, 5 - 6 / 29, 5 - 12 / 29, 5 - 18 / 29, 5 - 24 / 29], dtype=torch.float64))
    torch.testing.assert_close(matrix @ eigenvectors.T, eigenvectors.T * eigenvalues, atol=1e-8, rtol=0)
    assert residuals.max() < 1e-8  # full iterations: the Krylov space is invariant


def test_rank_above_iterations_is_refused(bert_oracle):
    with pytest.raises(ValueError, match="rank must be <= iterations"):
        bert_oracle["inf"].fit_arnoldi(bert_oracle["train"], rank=30, iterations=20)
