"""Exact top eigenpairs of the empirical Fisher ``F = mean_z g_z g_zᵀ`` from one pass of per-example gradients.

``F = GᵀG / n`` for the ``[n, P]`` matrix ``G`` of per-example loss gradients, so the right singular
vectors of ``G / √n`` are ``F``'s eigenvectors and the squared singular values its eigenvalues: one
gradient pass and an SVD, no HVP passes. ``F`` is positive semi-definite, of rank at most ``n``.

Data-parallel (``across_processes=True``): each process computes the gradients of its share of the
batches (every ``world_size``-th), the rows are gathered and put back in batch order, so every process
decomposes the very ``G`` one process would; eigenvector signs are fixed (``base.fix_signs``), so
the basis does not depend on the process count.

When ``G`` does not fit in memory, :func:`fisher_product` applies ``F`` to a block of vectors in one
gradient pass without holding it (``F V = Σ_z g_z (g_zᵀ V) / n``), for a Krylov solver to use.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..._utils import comm
from ..._utils.memory import ResidentGuard
from ..._utils.errors import InvalidInputError
from ...data import Batch, batch_size_of
from .base import fix_signs

GradFn = Callable[[Batch], torch.Tensor]  # batch -> per-example gradients [B, P]


def fisher_eigenpairs(grad_fn: GradFn, batches: Sequence[Batch], rank: int, across_processes: bool = False,
                      progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of the empirical Fisher over ``batches``: eigenvalues ``[rank]`` (decreasing,
    >= 0) and orthonormal eigenvectors ``[rank, P]``. Every process must call when ``across_processes``."""
    rows = fisher_rows(grad_fn, batches, across_processes, progress)  # [n, P]
    _, singular, right = torch.linalg.svd(rows / rows.shape[0] ** 0.5, full_matrices=False)
    return singular[:rank] ** 2, fix_signs(right[:rank])


def held_bytes(count: int, num_params: int, itemsize: int) -> int:
    """Memory :func:`fisher_eigenpairs` holds at once: the ``[n, P]`` gradients, their scaled copy and the right
    singular vectors. The gradients are held when this fits the memory budget; otherwise :func:`fisher_product` streams."""
    return 3 * count * num_params * itemsize


def fisher_rows(grad_fn: GradFn, batches: Sequence[Batch], across_processes: bool = False, progress: bool = True) -> torch.Tensor:
    """Per-example gradients of every example in ``batches``, in batch order: ``[n, P]``."""
    if not across_processes or comm.world_size() == 1:
        return _gradients(grad_fn, batches, progress)
    comm.check_same_everywhere([batch_size_of(b) for b in batches], "Hessian data (examples per batch)")
    if len(batches) < comm.world_size():
        raise InvalidInputError(f"A data-parallel Fisher fit needs at least one Hessian batch per process: {len(batches)} batches for "
                                f"{comm.world_size()} processes. Pass more Hessian examples or a smaller batch_size.")
    mine = comm.local_share(range(len(batches)))
    local = _gradients(grad_fn, [batches[i] for i in mine], progress)
    gathered = comm.all_gather_rows(local)  # rank 0's batches, then rank 1's, ...
    return gathered[_batch_order(batches)]


def _gradients(grad_fn: GradFn, batches: Sequence[Batch], progress: bool) -> torch.Tensor:
    """``grad_fn`` of each batch, concatenated; freed per-batch buffers go back to the OS as the pass grows (see
    `hf_influence._utils.memory.ResidentGuard`), so resident memory tracks the rows kept, not the batches seen."""
    guard, rows = ResidentGuard(), []
    for batch in tqdm(batches, desc="Fisher gradients", disable=not progress):
        rows.append(grad_fn(batch))
        guard.check()
    return torch.cat(rows)


def _batch_order(batches: Sequence[Batch]) -> torch.Tensor:
    """Row index into the rank-ordered gather for each example in batch order."""
    sizes, world = [batch_size_of(b) for b in batches], comm.world_size()
    offsets, position = {}, 0
    for owner in range(world):
        for index in range(owner, len(batches), world):
            offsets[index] = position
            position += sizes[index]
    return torch.cat([torch.arange(offsets[i], offsets[i] + sizes[i]) for i in range(len(batches))])


def fisher_product(grad_fn: GradFn, batches: Sequence[Batch], vectors: torch.Tensor, across_processes: bool = False) -> torch.Tensor:
    """``F V`` ``[P, k]`` from one pass of per-example gradients over ``batches``, one batch's rows at a time.
    With ``across_processes`` each process takes its share of the batches and the products and example
    counts are summed over processes."""
    total, count = torch.zeros_like(vectors), 0
    for batch in comm.local_share(batches) if across_processes else batches:
        rows = grad_fn(batch).to(vectors.dtype)  # [B, P]
        total += rows.T @ (rows @ vectors)
        count += rows.shape[0]
    if across_processes:
        packed = comm.all_reduce_sum(torch.cat([total.flatten(), total.new_tensor([count])]))
        total, count = packed[:-1].view_as(total), round(packed[-1].item())
    return total / count
