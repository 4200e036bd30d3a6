"""Block Krylov eigenbasis: the explicit matrix's eigenpairs, the tiny BERT's explicit Hessian, exact influence."""


import pytest
import torch

from hf_influence._utils.errors import InvalidInputError
from hf_influence.engine.ihvp.base import distill
from hf_influence.engine.ihvp import block
from hf_influence.engine.ihvp.block import BlockPlan, block_krylov, block_steps, candidate_widths, fixed_width, plan_blocks
from tests import utils

RANK, ITERATIONS = 50, 100  # as test_arnoldi: the trained model's Hessian has ~100 non-negligible eigenvalues
EIGENVALUE_RTOL = 1e-4  # top eigenvalues vs the explicit Hessian's
SUBSPACE_SIN = 1e-2  # sine of the largest principal angle between the top-10 subspaces


def known_matrix(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(values.numel(), values.numel(), generator=g, dtype=torch.float64))
    return q @ torch.diag(values) @ q.T


def test_block_krylov_recovers_a_known_spectrum():
    values = torch.linspace(-1, 5, 30, dtype=torch.float64)
    matrix = known_matrix(values)
    g = torch.Generator().manual_seed(1)
    basis, hessenberg = block_krylov(lambda v: matrix @ v, torch.randn(30, 3, generator=g, dtype=torch.float64), 10, g, progress=False)
    eigenvalues, eigenvectors, residuals = distill(basis, hessenberg, rank=5)
    torch.testing.assert_close(eigenvalues, values.flip(0)[:5])
    torch.testing.assert_close(matrix @ eigenvectors.T, eigenvectors.T * eigenvalues, atol=1e-8, rtol=0)
    torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-10, rtol=0)
    assert residuals.max() < 1e-8


def test_rank_deficient_blocks_are_refilled_and_the_relation_holds():
    """A rank-4 matrix: the second block deflates; random fills keep the basis orthonormal and H Q = Q T exact."""
    values = torch.cat([torch.tensor([4.0, 3.0, -2.0, 1.0], dtype=torch.float64), torch.zeros(26, dtype=torch.float64)])
    matrix = known_matrix(values)
    g = torch.Generator().manual_seed(2)
    basis, hessenberg = block_krylov(lambda v: matrix @ v, torch.randn(30, 5, generator=g, dtype=torch.float64), 3, g, progress=False)
    m = hessenberg.shape[1]
    torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0], dtype=basis.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(matrix @ basis[:m].T, basis.T @ hessenberg, atol=1e-10, rtol=0)
    eigenvalues, _, _ = distill(basis, hessenberg, rank=4)
    torch.testing.assert_close(eigenvalues, values[:4])


def test_block_width_follows_the_memory_budget_and_the_pass_costs(monkeypatch):
    # 100 fp64 values, 100 kB: a pass of b vectors holds 800 + b × 3,200 + 2 × b × 800 bytes, the fit (steps + 1) × b × 800
    assert candidate_widths(100, 60, 8, 100_000) == [1, 2, 4]
    assert candidate_widths(100, 60, 8, 100_000, activation_bytes=10_000) == [1, 2]  # the graph's 10 kB, again per vector
    assert candidate_widths(100, 60, 8, 1) == [1]
    assert fixed_width(8, 100, 60, 8, 2**30) == 8
    assert fixed_width(8, 100, 60, 8, 100_000) == 5  # capped: 5 fit with one vector per backward (Krylov 13 × 5 × 800)
    assert [block_steps(60, w) for w in (1, 2, 8, 32)] == [60, 30, 15, 8]
    like = torch.zeros((), dtype=torch.float64)

    clock = [0.0]  # a pass advances this clock by its cost, so the plan does not depend on the machine's load
    monkeypatch.setattr(block.time, "perf_counter", lambda: clock[0])

    def timed(fixed: float, per_vector: float):
        def hvp(v: torch.Tensor) -> torch.Tensor:
            clock[0] += fixed + per_vector * v.shape[1]
            return v

        return hvp

    overhead = plan_blocks(timed(0.02, 0.0), 100, 60, like, memory_budget=2**30)  # a pass costs the same whatever its width
    assert overhead == BlockPlan(64, block_steps(60, 64))
    # within 100 kB: blocks of 4 hold a pass (20 kB) + 23 × 4 Krylov vectors of 100 fp64 values (93.6 kB); of 8, 141.6 kB
    assert plan_blocks(timed(0.02, 0.0), 100, 60, like, memory_budget=100_000) == BlockPlan(4, block_steps(60, 4))
    # products dominate (a pass's own cost is small): pairs are the widest block that spends no more products than Arnoldi (60), in half the passes
    assert plan_blocks(timed(0.0005, 0.01), 100, 60, like, memory_budget=2**30) == BlockPlan(2, 30)


@pytest.fixture(scope="module")
def block_basis(bert_oracle):
    return bert_oracle["inf"].fit_arnoldi(bert_oracle["train"], rank=RANK, iterations=ITERATIONS, algorithm="block")


def top_eigenpairs(hessian: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(hessian)
    order = values.abs().argsort(descending=True)[:k]
    return values[order], vectors[:, order]


def test_block_eigenpairs_match_the_explicit_hessian(bert_oracle, block_basis):
    values, vectors = top_eigenpairs(bert_oracle["hessian"], 10)
    torch.testing.assert_close(block_basis.eigenvalues[:10], values, rtol=EIGENVALUE_RTOL, atol=1e-9)
    ours = block_basis.eigenvectors[:10].T  # [P, 10]
    sin_largest = torch.linalg.matrix_norm(ours - vectors @ (vectors.T @ ours), ord=2)
    assert sin_largest < SUBSPACE_SIN
    gram = block_basis.eigenvectors @ block_basis.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(RANK, dtype=gram.dtype), atol=1e-8, rtol=0)
    assert RANK < block_basis.iterations <= 2 * ITERATIONS  # products spent, at most the plan's whole blocks (tol stops sooner)


def test_block_scores_correlate_with_exact(bert_oracle, block_basis):
    inf = bert_oracle["inf"]
    pairwise = inf.scores(bert_oracle["test"], bert_oracle["train"], method="arnoldi", basis=block_basis)
    self_inf = inf.self_influence(bert_oracle["train"], method="arnoldi", basis=block_basis)
    assert utils.pearson(pairwise, bert_oracle["pairwise"]) >= utils.PEARSON_FLOOR
    assert utils.pearson(self_inf, bert_oracle["self"]) >= utils.PEARSON_FLOOR


def test_both_algorithms_through_fit_basis(bert_oracle, block_basis):
    inf = bert_oracle["inf"]
    arnoldi = inf.fit_basis(bert_oracle["train"], rank=10, iterations=40, algorithm="arnoldi")
    block = inf.fit_basis(bert_oracle["train"], rank=10, iterations=40, algorithm="block")
    values, _ = top_eigenpairs(bert_oracle["hessian"], 5)
    for basis in (arnoldi, block):
        torch.testing.assert_close(basis.eigenvalues[:5], values, rtol=EIGENVALUE_RTOL, atol=1e-9)
    with pytest.raises(InvalidInputError, match="algorithm must be one of"):
        inf.fit_basis(bert_oracle["train"], rank=10, iterations=40, algorithm="lanczos")
