"""What a call will cost, before it runs, and the refusal of what cannot fit ``memory_budget_gb``.

``Influence.estimate_cost(action, *args, **kwargs)`` takes a public method's name and arguments and returns a
`CostEstimate` without running anything (but one forward and backward of the largest Hessian batch where HVPs run, as
they hold that batch's activations once and again per vector, and one forward of the longest rows where per-example
gradients are taken, see ``engine/hvp_memory.py``; once per batch shape, on data that passed the data check); every
such method logs its own estimate at INFO and raises `MemoryBudgetError` before any work when what it must hold at once
exceeds the budget (`cost_estimate.costed`; a call inside another was counted by the outer one). Sizes count the large tensors hf_influence holds, in the accumulation
dtype: bases, Krylov vectors, per-example gradients, the explicit Hessian, LiSSA iterates, scores, and the activations
of each pass (above); not the model or the data. Each rule behind a figure lives with the code that applies it and is called from here: block
widths (``ihvp/block.py``), passes of batched HVPs (``hvp_memory.py``), the Fisher SVD (``ihvp/fisher.py``), the projection path and
chunks (``projection.py``), Kronecker map rows (``subspace_hessian.py``), LiSSA presets, Krylov steps (``config.py``).
"""

from __future__ import annotations

from typing import Any

from ._utils.errors import InvalidInputError
from .config import Algorithm, BasisConfig, Curvature, Method, as_choice, implicit_iterations
from .cost_estimate import CostEstimate, MemoryPart
from .cost_parts import FEWER_ROWS, CostParts
from .data import dataset_of
from .engine.ihvp.fisher import held_bytes


def _rows(data: Any) -> int | None:
    try:
        return len(dataset_of(data))
    except TypeError:  # not sized: the method's data check says what is wrong
        return None


# One estimator per public method, with that method's signature (tests/test_cost.py holds them to it).

def fit_arnoldi(owner, hessian_data, rank=BasisConfig.rank, iterations=BasisConfig.iterations, seed=None,
                algorithm=BasisConfig.algorithm, tol=BasisConfig.tol, keep=BasisConfig.keep, data_parallel=False,
                block_size=BasisConfig.block_size, *, action="fit_arnoldi"):
    config = BasisConfig(rank, iterations, Curvature.HESSIAN.value, algorithm, tol, keep, block_size)
    cost = CostParts(owner, action)
    cost.fit(hessian_data, config.rank, config.iterations, Algorithm(config.algorithm), config.block_size)
    if config.tol > 0:
        cost.notes.append(f"the passes are a cap: the fit stops sooner once its {config.rank} eigenpairs converge (tol={config.tol:g})")
    return cost.done()


def fit_fisher(owner, hessian_data, rank=BasisConfig.rank, data_parallel=False, *, action="fit_fisher"):
    cost = CostParts(owner, action)
    cost.hessian(hessian_data, cost.B)  # [B, P] gradients per batch: batch_size rows
    cost.basis(rank)
    rows = cost.fields.get("hessian_rows")
    if rows is not None and held_bytes(rows, cost.P, cost.d) <= cost.budget:
        cost.fields["grads"] = "held for one SVD"
        cost.hold(f"per-example gradients [{rows}, P], their scaled copy and the SVD's right vectors", "held", 3 * rows,
                  "fewer Hessian rows (hessian_examples)")
    else:
        cost.gradients(cost.largest, "formed per Hessian batch, streamed into Fisher products")
        cost.backward_graph(hessian_data, hessian=True)
        cost.krylov(implicit_iterations(rank), Algorithm.BLOCK, "Fisher product", "a lower rank (the fit takes max(2 × rank, rank + 20) steps)")
    return cost.done()


def fit_basis(owner, hessian_data, rank=BasisConfig.rank, iterations=BasisConfig.iterations, curvature=BasisConfig.curvature,
              algorithm=BasisConfig.algorithm, tol=BasisConfig.tol, keep=BasisConfig.keep, data_parallel=False,
              block_size=BasisConfig.block_size):
    config = BasisConfig(rank, iterations, curvature, algorithm, tol, keep, block_size)
    if config.curvature == Curvature.FISHER:
        return fit_fisher(owner, hessian_data, config.rank, action="fit_basis")
    return fit_arnoldi(owner, hessian_data, config.rank, config.iterations, algorithm=config.algorithm, tol=config.tol, keep=config.keep,
                       block_size=config.block_size, action="fit_basis")


def spectrum(owner, hessian_data, method="lanczos", iterations=30, trace_estimator="hutch++", trace_matvecs=30, data_parallel=False):
    cost = CostParts(owner, "spectrum")
    cost.hessian(hessian_data)
    cost.spectrum(method, iterations, trace_estimator, trace_matvecs)
    return cost.done()


def exact_hessian(owner, hessian_data):
    cost = CostParts(owner, "exact_hessian")
    cost.hessian(hessian_data)
    cost.exact(decomposed=False)
    return cost.done()


def s_test(owner, test_data, hessian_data, lissa="auto", *, action="s_test"):
    cost, rows = CostParts(owner, action), _rows(test_data)
    cost.hessian(hessian_data)
    cost.gradients(cost.B, "formed")
    cost.backward_graph(test_data)
    cost.hold(f"test gradients [{rows}, P]", "held", rows or 0, FEWER_ROWS)
    cost.lissa(hessian_data, lissa, rows, 1)
    return cost.done()


def solve_s_test(owner, test_data, hessian_data, lissa="auto"):
    return s_test(owner, test_data, hessian_data, lissa, action="solve_s_test")


def gradients(owner, data, test_side=False):
    cost, rows = CostParts(owner, "gradients"), _rows(data)
    cost.gradients(cost.B, "formed")
    cost.backward_graph(data)
    cost.hold(f"all gradients [{rows}, P]", "held", rows or 0, FEWER_ROWS)
    return cost.done()


def scores(owner, test_data, train_data, method=Method.ARNOLDI, basis=None, hessian_data=None, lissa="auto",
           rank=BasisConfig.rank, knn=None, index=None):
    method = as_choice(Method, method, "method")
    cost, tests, trains = CostParts(owner, "scores"), _rows(test_data), _rows(train_data)
    cost.method_parts(method, train_data, hessian_data, basis, lissa, rank, tests, 1, test=test_data)
    if method in (Method.TRACIN, Method.EXACT, Method.LISSA):
        copies = 1 if method is Method.TRACIN else 2  # the test gradients, and their preconditioned copy
        cost.hold(f"test gradients [{copies} × {tests}, P]", "held", copies * (tests or 0), FEWER_ROWS)
    columns = trains if knn is None else knn
    cost.parts.append(MemoryPart(f"scores [{tests}, {columns}]", "scores", (tests or 0) * (columns or 0) * cost.d, FEWER_ROWS))
    return cost.done()


def self_influence(owner, train_data, method=Method.ARNOLDI, basis=None, hessian_data=None, lissa="auto", rank=BasisConfig.rank):
    method = as_choice(Method, method, "method")
    cost, solves = CostParts(owner, "self_influence"), len(owner._loader(train_data)) if _rows(train_data) else None  # LiSSA: one per batch
    cost.method_parts(method, train_data, hessian_data, basis, lissa, rank, cost.B, solves, norms=True)
    return cost.done()


ESTIMATORS = {f.__name__: f for f in (fit_arnoldi, fit_basis, fit_fisher, spectrum, exact_hessian, s_test, solve_s_test,
                                      gradients, scores, self_influence)}


def estimate(owner: Any, action: str, *args: Any, **kwargs: Any) -> CostEstimate:
    """The `CostEstimate` of ``owner.<action>(*args, **kwargs)``; nothing runs."""
    if action not in ESTIMATORS:
        raise InvalidInputError(f"estimate_cost: action must be one of {sorted(ESTIMATORS)}, got {action!r}.")
    return ESTIMATORS[action](owner, *args, **kwargs)
