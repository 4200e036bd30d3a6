"""Block Krylov eigenbasis of the Hessian: Arnoldi's accuracy in a few batched passes.

Arnoldi (``arnoldi.py``) spends one pass over the Hessian data per HVP, one vector at a time, so
its ``m`` passes run in sequence. Block Arnoldi (block Lanczos with full re-orthogonalisation; Golub
& Underwood 1977, and as a randomized block Krylov method Musco & Musco 2015) applies the Hessian
to a block of ``b`` orthonormal vectors per pass: ``m / b`` sequential passes build a Krylov space
of the same dimension, and each pass shares the forward and first backward of every Hessian batch
among its ``b`` products (see ``hvp.batch_hvp``); data-parallel fits sum each block product over
processes once. The projected matrix is block Hessenberg (symmetric up to round-off) and its Ritz
pairs are distilled as Arnoldi's are (``base.distill``), with residuals ``‖Hu - λu‖``.

A block that loses rank (the Krylov space became invariant in some directions, e.g. a Hessian of
rank below ``P``) keeps its nonzero directions and is filled with random orthonormal ones, so the
Krylov relation stays exact and the space keeps growing.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..._utils import comm
from ...config import Algorithm, Keep
from ..hvp_memory import budgeted, pass_bytes, vectors_per_backward
from ..spectrum import krylov_iteration
from .base import ConvergenceStop, RitzPairs, distill, log_residuals

logger = logging.get_logger(__name__)
HVP = Callable[[torch.Tensor], torch.Tensor]  # [P, b] -> [P, b]
_DEFLATION = 1e-10  # a direction whose norm after orthogonalisation is below this (relative) is dropped
_PROBE = 8  # vectors in the timed pass that sizes the block
_MAX_WIDTH = 64
ORTHOGONALISATION_BLOCKS = 4  # [P, b] blocks a block Krylov step holds after its pass: the product, w, Q·coeffs, the SVD's U


def fit_eigenpairs(hvp: HVP, num_params: int, rank: int, iterations: int, algorithm: Algorithm, generator: torch.Generator,
                   like: torch.Tensor, memory_budget: float, across_processes: bool = False, progress: bool = True,
                   tol: float = 0.0, keep: Keep = Keep.MAGNITUDE, activation_bytes: int | None = None,
                   block_size: int | None = None) -> tuple[RitzPairs, int]:
    """Top-``rank`` eigenpairs by |λ| (or λ: ``keep``) of the operator ``hvp`` at the accuracy of ``iterations`` Arnoldi
    steps, or fewer once they have converged to ``tol`` (``base.ConvergenceStop``): ``(pairs, products spent)``.

    ``like`` gives dtype and device. Block widths fit ``memory_budget`` (:func:`candidate_widths`); ``block_size`` fixes
    the width (:func:`fixed_width`). ``activation_bytes``: what a batched HVP's graph saves on the largest Hessian batch
    (`hf_influence.engine.hvp_memory`), for an ``hvp`` that takes ``per_backward`` (``None``: an operator without a
    graph, e.g. Fisher products; only its P-sized buffers are counted). With ``across_processes`` (every process calls
    with the same seed), the block plan, the stop and the pairs are process 0's, broadcast, so every process runs the
    same passes and returns the very same basis."""
    stop = ConvergenceStop(rank, tol, keep, across_processes)
    if algorithm is Algorithm.ARNOLDI:
        start = torch.randn(num_params, generator=generator, dtype=torch.float64).to(like)
        basis, hessenberg = krylov_iteration(hvp, start, iterations, progress, desc="Arnoldi", stop=stop)
        cap = iterations
    else:
        d, graph = like.element_size(), activation_bytes or 0
        if block_size is None:
            plan = plan_blocks(hvp, num_params, iterations, like, memory_budget, graph)
        else:
            width = fixed_width(block_size, num_params, iterations, d, memory_budget, graph)
            plan = BlockPlan(width, block_steps(iterations, width))
        if across_processes:  # timings differ between processes: follow process 0's plan
            plan = BlockPlan(*comm.broadcast(torch.tensor(plan, device=like.device)).tolist())
        left = memory_budget - krylov_bytes(plan.width, iterations, num_params, d)
        chunk = vectors_per_backward(plan.width, num_params, d, graph, left)
        logger.info(f"Block Krylov fit: blocks of {plan.width} vectors{'' if block_size is None else f' (block_size={block_size})'}, "
                    f"{chunk} per batched backward (within memory_budget_gb={memory_budget / 2**30:g}: a pass holds "
                    f"{pass_bytes(plan.width, num_params, d, graph, chunk) / 2**20:,.1f} MiB, the graph's activations "
                    f"{graph / 2**20:,.1f} MiB once and again per vector, beside {plan.width * (plan.steps + 1)} × {num_params:,} Krylov "
                    f"values), at most {plan.steps} passes over the Hessian data instead of {iterations}, {plan.width * plan.steps} products.")
        if activation_bytes is not None:
            hvp = budgeted(hvp, num_params, d, graph, left, "Block Krylov fit")
        start = torch.randn(num_params, plan.width, generator=generator, dtype=torch.float64).to(like)
        basis, hessenberg = block_krylov(hvp, start, plan.steps, generator, progress, desc="block Krylov", stop=stop)
        cap = plan.width * plan.steps
    products = int(hessenberg.shape[1])
    log_stop(algorithm.value, products, cap, stop, invariant=basis.shape[0] == products)
    pairs = distill(basis, hessenberg, rank, keep)
    log_residuals(pairs.eigenvalues, pairs.residuals, f"{algorithm.value} fit")
    if across_processes:
        pairs = RitzPairs(*(comm.broadcast(t.contiguous()) for t in pairs))
    return pairs, products


def log_stop(solver: str, products: int, cap: int, stop: ConvergenceStop, invariant: bool) -> None:
    """Say at INFO how many products a fit ran and why it stopped there."""
    if stop.stopped:
        why = (f"the {stop.rank} Ritz pairs kept converged (largest residual {stop.relative:.1e} × |λ_max| <= tol={stop.tol:g})")
    elif invariant:
        why = "the Krylov space became invariant (exact eigenpairs)"
    elif stop.tol > 0:
        why = f"the cap (iterations; largest residual at the last check {stop.relative:.1e} × |λ_max| > tol={stop.tol:g})"
    else:
        why = "the cap (iterations; tol=0)"
    logger.info(f"{solver} fit: {products} of at most {cap} products, stopped at {why}.")


class BlockPlan(NamedTuple):
    width: int  # vectors per pass (b)
    steps: int  # passes


def block_steps(iterations: int, width: int) -> int:
    """Passes of ``width`` vectors whose block Krylov space matches ``iterations`` Arnoldi steps.

    Measured on the tiny BERT's explicit Hessian (top 20 and 50 of 2.5k eigenvalues, 60 and 100
    Arnoldi steps): blocks of 2 to 32 reach Arnoldi's eigenvalues (to 1e-10) within
    ``iterations / √(2b)`` passes; wider blocks need fewer passes but more products. One vector: Arnoldi."""
    return iterations if width == 1 else math.ceil(iterations / math.sqrt(2 * width))


def krylov_bytes(width: int, iterations: int, num_params: int, itemsize: int) -> int:
    """The block Krylov vectors a fit of ``width`` holds for its whole run: ``(block_steps + 1) × width`` of P values."""
    return (block_steps(iterations, width) + 1) * width * num_params * itemsize


def step_bytes(width: int, num_params: int, itemsize: int, activation_bytes: int, per_backward: int | None = None) -> int:
    """Bytes a step of :func:`block_krylov` holds beside its Krylov vectors: its pass of batched HVPs
    (`hf_influence.engine.hvp_memory.pass_bytes`), then the orthogonalisation's ``[P, b]`` blocks, whichever is larger."""
    orthogonalisation = ORTHOGONALISATION_BLOCKS * width * num_params * itemsize
    return max(pass_bytes(width, num_params, itemsize, activation_bytes, per_backward), orthogonalisation)


def candidate_widths(num_params: int, iterations: int, itemsize: int, memory_budget: float, activation_bytes: int = 0) -> list[int]:
    """The block widths :func:`plan_blocks` chooses among: 1, and the powers of two up to 64 whose step (a pass with every
    vector in one batched backward: :func:`step_bytes`) and block Krylov vectors (held for the whole fit) fit the budget
    together."""
    def held(width: int) -> int:
        return step_bytes(width, num_params, itemsize, activation_bytes) + krylov_bytes(width, iterations, num_params, itemsize)

    return [1] + [2**k for k in range(1, int(math.log2(_MAX_WIDTH)) + 1) if held(2**k) <= memory_budget]


def fixed_width(block_size: int, num_params: int, iterations: int, itemsize: int, memory_budget: float, activation_bytes: int = 0,
                log: bool = True) -> int:
    """The width of a fit asked for ``block_size``: itself when its Krylov vectors and a pass taking one vector per batched
    backward fit the budget (the pass then takes as many per backward as fit), else the widest that does, logged unless
    ``log=False`` (>= 1)."""
    def fits(width: int) -> bool:
        held = step_bytes(width, num_params, itemsize, activation_bytes, per_backward=1)
        return held + krylov_bytes(width, iterations, num_params, itemsize) <= memory_budget

    width = block_size
    while width > 1 and not fits(width):
        width -= 1
    if width < block_size and log:
        logger.info(f"Block Krylov fit: block_size={block_size} does not fit memory_budget_gb={memory_budget / 2**30:g} (its "
                    f"{(block_steps(iterations, block_size) + 1) * block_size} Krylov vectors of {num_params:,} values and a pass); "
                    f"blocks of {width} instead.")
    return width


def timing_widths(widths: list[int]) -> tuple[int, ...]:
    """The widths of the timed passes that choose among ``widths``: none when there is no choice, else 1 and the probe."""
    return () if widths[-1] == 1 else (1, min(_PROBE, widths[-1]))


def plan_blocks(hvp: HVP, num_params: int, iterations: int, like: torch.Tensor, memory_budget: float,
                activation_bytes: int = 0) -> BlockPlan:
    """The block width (a power of two within the memory budget: :func:`candidate_widths`) that minimises
    ``steps × (c0 + c1·b)``, with the time per pass measured once with 1 and once with ``_PROBE`` vectors (c0: the
    forward and first backward of every Hessian batch, c1: each product)."""
    widths = candidate_widths(num_params, iterations, like.element_size(), memory_budget, activation_bytes)
    timed = timing_widths(widths)
    if not timed:
        return BlockPlan(1, iterations)
    seconds = []
    for width in timed:
        vectors = torch.ones(num_params, width, dtype=like.dtype, device=like.device)
        started = time.perf_counter()
        hvp(vectors)
        seconds.append(time.perf_counter() - started)
    per_vector = max(0.0, (seconds[1] - seconds[0]) / (timed[1] - 1))
    fixed = max(seconds[0] - per_vector, 0.0)
    cost = {w: block_steps(iterations, w) * (fixed + per_vector * w) for w in widths}
    width = min(widths, key=lambda w: (cost[w], w))
    logger.info(f"Block Krylov: a pass costs {fixed * 1e3:.1f} ms + {per_vector * 1e3:.1f} ms per vector; blocks of {width} "
                f"(at most {widths[-1]} fit memory_budget_gb) cut the estimated fit time {cost[1] / cost[width]:.1f}x.")
    return BlockPlan(width, block_steps(iterations, width))


def block_krylov(hvp: HVP, start: torch.Tensor, steps: int, generator: torch.Generator, progress: bool = True,
                 desc: str = "block Krylov", stop: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal block Krylov basis ``Q`` ``[(s+1)·b, P]`` and block Hessenberg matrix ``[(s+1)·b, s·b]``.

    ``start`` is ``[P, b]``; ``s <= steps`` passes of ``hvp`` on ``b`` vectors each, with full
    re-orthogonalisation (block classical Gram-Schmidt, twice). ``H Q[:s·b]ᵀ = Q[:(s+1)·b]ᵀ T`` holds
    to round-off; stops early when every direction of a new block deflates (an invariant space: then
    ``T`` is square and ``H Qᵀ = Qᵀ T``), or when ``stop`` (called with ``T`` ``[(k+1)·b, k·b]`` after pass ``k``, e.g. a
    ``base.ConvergenceStop`` reading the block residuals from its last block row) says so.
    ``generator`` fills deflated directions. ``Q`` is one ``[(steps+1)·b, P]`` buffer filled block by block, so the
    vectors are held once (no per-step copy).
    """
    width = start.shape[1]
    basis = torch.empty((steps + 1) * width, start.shape[0], dtype=start.dtype, device=start.device)
    basis[:width] = _orthonormal(start).T
    hessenberg = torch.zeros((steps + 1) * width, steps * width, dtype=start.dtype, device=start.device)
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        cols, filled = slice(step * width, (step + 1) * width), (step + 1) * width
        product = hvp(basis[step * width : filled].T)  # [P, b]
        stacked = basis[:filled].T  # [P, (step+1)·b], a view
        w = product
        for _ in range(2):
            coeffs = stacked.T @ w
            w = w - stacked @ coeffs
            hessenberg[:filled, cols] += coeffs
        scale = hessenberg[:filled, cols].norm().clamp_min(1e-30)
        following, tail, complete = _next_block(w, stacked, scale, generator)
        del product, w  # not held through the next pass (``step_bytes``)
        hessenberg[filled : filled + width, cols] = tail
        if complete:
            return basis[:filled], hessenberg[:filled, :filled]  # square: no residual left
        basis[filled : filled + width] = following.T
        del following
        if stop is not None and step + 1 < steps and stop(hessenberg[: filled + width, :filled]):
            return basis[: filled + width], hessenberg[: filled + width, :filled]
    return basis, hessenberg


def _next_block(w: torch.Tensor, stacked: torch.Tensor, scale: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``w = Q_next R`` with ``Q_next`` orthonormal and orthogonal to ``stacked``: ``(Q_next, R, invariant)``.

    Directions of ``w`` below ``_DEFLATION · scale`` are dropped (their rows of ``R`` are zero) and
    replaced by random orthonormal ones; ``invariant`` when all of them were."""
    left, singular, right_t = torch.linalg.svd(w, full_matrices=False)  # w = U S Vᵀ
    kept = singular > _DEFLATION * scale
    tail = singular[:, None] * right_t
    tail[~kept] = 0
    missing = int((~kept).sum())
    if missing == w.shape[1]:
        return w, tail, True
    if missing:
        fill = torch.randn(w.shape[0], missing, generator=generator, dtype=torch.float64).to(w)
        existing = torch.cat([stacked, left[:, kept]], dim=1)
        for _ in range(2):
            fill = fill - existing @ (existing.T @ fill)
        left = left.clone()
        left[:, ~kept] = _orthonormal(fill)
    return left, tail, False


def _orthonormal(block: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(block)[0]
