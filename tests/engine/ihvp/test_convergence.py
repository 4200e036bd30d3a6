"""The convergence stop of eigenbasis fits (BasisConfig.tol) and the choice of the eigenpairs kept (BasisConfig.keep),
against explicit matrices and the tiny BERT's explicit fp64 Hessian."""

import logging
from unittest import mock

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import IncompatibleBasisError, InvalidInputError
from hf_influence.config import BasisConfig
from hf_influence.engine.ihvp.base import ConvergenceStop, distill
from hf_influence.engine.ihvp.block import BlockPlan, block_krylov
from hf_influence.engine.spectrum import krylov_iteration
from tests import utils

EIGENVALUE_RTOL = 1e-4  # early-stopped top eigenvalues vs the explicit Hessian's
SUBSPACE_SIN = 1e-2  # sine of the largest principal angle between top subspaces
CAP = 100
PLAN = BlockPlan(4, 25)  # block fits: 4 vectors per pass, at most 100 products (not from timings)


def decaying_matrix(size: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric matrix with a geometrically decaying spectrum of both signs (a Hessian-like shape), and its eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    magnitudes = 0.9 ** torch.arange(size, dtype=torch.float64)
    values = magnitudes * torch.where(torch.arange(size) % 5 == 3, -1.0, 1.0).double()  # every fifth eigenvalue negative
    return q @ torch.diag(values) @ q.T, values


def top(values: torch.Tensor, vectors: torch.Tensor, k: int, keep: str = "magnitude") -> tuple[torch.Tensor, torch.Tensor]:
    order = (values.abs() if keep == "magnitude" else values).argsort(descending=True)[:k]
    return values[order], vectors[:, order]


def sin_largest_angle(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """``ours`` and ``exact`` ``[P, k]`` with orthonormal columns."""
    return float(torch.linalg.matrix_norm(ours - exact @ (exact.T @ ours), ord=2))


@pytest.mark.parametrize("solver", ["arnoldi", "block"])
def test_the_stop_fires_when_every_kept_pair_has_converged_to_tol(solver):
    """The Ritz residuals the stop reads from the Krylov matrix are the true ‖Au - λu‖: at the stop every kept pair
    is within tol·|λ_max|, and fewer products than the cap were spent."""
    matrix, values = decaying_matrix()
    g = torch.Generator().manual_seed(1)
    stop = ConvergenceStop(rank=8, tol=1e-6)
    if solver == "arnoldi":
        basis, hessenberg = krylov_iteration(lambda v: matrix @ v, torch.randn(200, generator=g, dtype=torch.float64), CAP,
                                             progress=False, stop=stop)
    else:
        basis, hessenberg = block_krylov(lambda v: matrix @ v, torch.randn(200, 4, generator=g, dtype=torch.float64), CAP // 4, g,
                                         progress=False, stop=stop)
    m = hessenberg.shape[1]
    assert stop.stopped and 8 <= m < CAP and basis.shape[0] > m  # stopped by convergence, not by an invariant space
    eigenvalues, eigenvectors, residuals = distill(basis, hessenberg, rank=8)
    true = (matrix @ eigenvectors.T - eigenvectors.T * eigenvalues).norm(dim=0)
    torch.testing.assert_close(residuals, true, rtol=1e-6, atol=1e-12)
    assert float(true.max()) <= 1e-6 * float(values.abs().max())
    torch.testing.assert_close(eigenvalues, top(values, torch.eye(200, dtype=values.dtype), 8)[0], rtol=1e-9, atol=0)
    assert not ConvergenceStop(rank=8, tol=1e-12)(hessenberg)  # not converged to a 10^6 times smaller tol


@pytest.fixture(scope="module")
def exact_top(bert_oracle):
    return torch.linalg.eigh(bert_oracle["hessian"])


def fit(bert_oracle, solver: str, **settings) -> hfi.ArnoldiBasis:
    with mock.patch("hf_influence.engine.ihvp.block.plan_blocks", return_value=PLAN):
        return bert_oracle["inf"].fit_arnoldi(bert_oracle["train"], algorithm=solver, **settings)


@pytest.mark.parametrize("solver", ["arnoldi", "block"])
def test_an_early_stopped_fit_has_the_explicit_hessians_top_eigenpairs(bert_oracle, exact_top, solver, caplog):
    with caplog.at_level(logging.INFO, logger="hf_influence"):
        basis = fit(bert_oracle, solver, rank=10, iterations=CAP, tol=1e-3)
    assert basis.iterations < CAP // 2  # the cap was 100 products
    assert any(f"{basis.iterations} of at most {CAP} products, stopped at the 10 Ritz pairs kept converged" in r.getMessage()
               for r in caplog.records)
    values, vectors = top(*exact_top, 5)
    torch.testing.assert_close(basis.eigenvalues[:5], values, rtol=EIGENVALUE_RTOL, atol=0)
    assert sin_largest_angle(basis.eigenvectors[:5].T, vectors) < SUBSPACE_SIN
    hessian = bert_oracle["hessian"]
    true = (hessian @ basis.eigenvectors.T - basis.eigenvectors.T * basis.eigenvalues).norm(dim=0)
    assert float(true.max()) <= 1e-3 * float(exact_top[0].abs().max()) * 1.01  # every kept pair, as the stop promised
    inf = bert_oracle["inf"]
    pairwise = inf.scores(bert_oracle["test"], bert_oracle["train"], method="arnoldi", basis=basis)
    assert utils.pearson(pairwise, bert_oracle["pairwise"]) >= utils.PEARSON_FLOOR


@pytest.mark.parametrize("solver", ["arnoldi", "block"])
def test_stopping_early_is_running_fewer_iterations_and_tol_0_runs_them_all(bert_oracle, solver):
    """The stop ends the same Krylov run sooner: the basis equals the one whose cap is the products the stop ran;
    with tol=0 a fit runs every iteration (the behaviour before the stop existed)."""
    stopped = fit(bert_oracle, solver, rank=10, iterations=CAP, tol=1e-3)
    capped = fit(bert_oracle, solver, rank=10, iterations=stopped.iterations, tol=0.0) if solver == "arnoldi" else None
    if solver == "block":
        with mock.patch("hf_influence.engine.ihvp.block.plan_blocks", return_value=BlockPlan(4, stopped.iterations // 4)):
            capped = bert_oracle["inf"].fit_arnoldi(bert_oracle["train"], rank=10, iterations=CAP, algorithm=solver, tol=0.0)
    assert capped.iterations == stopped.iterations
    torch.testing.assert_close(capped.eigenvalues, stopped.eigenvalues, rtol=1e-12, atol=0)
    torch.testing.assert_close(capped.eigenvectors, stopped.eigenvectors, rtol=0, atol=1e-10)
    assert fit(bert_oracle, solver, rank=10, iterations=CAP, tol=0.0).iterations == CAP


@pytest.mark.parametrize("solver", ["arnoldi", "block"])
def test_keep_largest_returns_the_top_lambda_eigenpairs_of_a_hessian_with_negative_eigenvalues(bert_oracle, exact_top, solver):
    values, vectors = exact_top
    assert float(values[0]) < 0 and int((top(values, vectors, 10)[0] < 0).sum()) >= 1  # |λ| would keep a negative one
    basis = fit(bert_oracle, solver, rank=10, iterations=CAP, tol=0.0, keep="largest")
    expected, expected_vectors = top(values, vectors, 10, keep="largest")
    torch.testing.assert_close(basis.eigenvalues, expected, rtol=1e-8, atol=0)
    assert sin_largest_angle(basis.eigenvectors.T, expected_vectors) < 1e-6
    assert basis.keep == "largest" and (basis.eigenvalues > 0).all()


def test_distill_keeps_the_largest_lambda_or_the_largest_magnitude():
    matrix, values = decaying_matrix(30)
    g = torch.Generator().manual_seed(3)
    basis, hessenberg = krylov_iteration(lambda v: matrix @ v, torch.randn(30, generator=g, dtype=torch.float64), 30, progress=False)
    by_magnitude = distill(basis, hessenberg, rank=6)
    by_value = distill(basis, hessenberg, rank=6, keep="largest")
    eye = torch.eye(30, dtype=values.dtype)
    torch.testing.assert_close(by_magnitude.eigenvalues, top(values, eye, 6)[0])  # 1, 0.9, 0.81, -0.729, ...
    torch.testing.assert_close(by_value.eigenvalues, top(values, eye, 6, keep="largest")[0])
    assert (by_magnitude.eigenvalues < 0).any() and (by_value.eigenvalues > 0).all()


def test_keep_is_saved_and_a_basis_serves_only_its_own_choice(bert_oracle, tmp_path):
    inf = bert_oracle["inf"]
    largest = fit(bert_oracle, "arnoldi", rank=4, iterations=30, keep="largest")
    largest.save(tmp_path)
    loaded = hfi.ArnoldiBasis.load(tmp_path)
    assert loaded.keep == "largest" and loaded.metadata() == largest.metadata()
    assert inf.basis_mismatches(loaded, rank=4, curvature="hessian", keep="largest") == []
    assert inf.basis_mismatches(loaded, keep="magnitude") == [
        "keep: saved largest (eigenpairs of largest λ), requested magnitude"]
    with pytest.raises(IncompatibleBasisError, match="keep: saved largest"):
        inf.check_basis(loaded, keep="magnitude")
    fisher = inf.fit_fisher(bert_oracle["train"], rank=4)  # positive semi-definite: both choices keep the same pairs
    assert inf.basis_mismatches(fisher, keep="largest") == [] and inf.basis_mismatches(fisher, keep="magnitude") == []


@pytest.mark.parametrize("settings, message", [
    ({"tol": -1e-3}, "tol must be a number in"), ({"tol": 1.0}, "tol must be a number in"), ({"tol": True}, "tol must be a number in"),
    ({"tol": "1e-3"}, "tol must be a number in"), ({"keep": "abs"}, "keep must be one of"),
])
def test_bad_settings_are_refused_with_the_valid_values(settings, message):
    with pytest.raises(InvalidInputError, match=message):
        BasisConfig(**settings)
    assert BasisConfig(tol=0).tol == 0.0 and BasisConfig(keep="largest").keep == "largest"
