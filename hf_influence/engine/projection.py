"""Project per-example gradients onto directions ``u_i``: ``[B, p̄]`` numbers per batch.

Two paths, same numbers: forward-mode JVPs along each direction (no per-example gradient is
ever held in memory; costs ~p̄ forward passes), or per-example gradients times the directions: module
by module inside one hooked forward and backward where hooks apply (no ``[B, P]`` held), else vmapped
per-example gradients of at most ``chunk_size`` examples at a time (``chunk_size·P`` floats held).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch.func import jvp, vmap

from ..data import Batch, batch_size_of, slice_batch
from .grads import LossFunction, Params, accumulation_dtype, per_example_grad_tensors
from .hooks import hook_plan, hook_projections

ProjectionMode = Literal["auto", "jvp", "grads"]


def project_by_jvp(loss_fn: LossFunction, params: Params, batch: Batch, directions: torch.Tensor) -> torch.Tensor:
    """``[B, p̄]``: ``u_i · ∇L(x_b)`` as the directional derivative of each example's loss."""
    dtype = next(iter(params.values())).dtype
    tangents = loss_fn.selection.unflatten(directions.to(dtype))  # each [p̄, *shape]
    derivs = vmap(lambda t: jvp(lambda p: loss_fn(p, batch), (params,), (t,))[1])(tangents)  # [p̄, B]
    return derivs.T.to(accumulation_dtype(params))


def project_by_grads(
    loss_fn: LossFunction, params: Params, batch: Batch, directions: torch.Tensor, chunk_size: int | None = None,
    memory_budget_bytes: float | None = None,
) -> torch.Tensor:
    """``[B, p̄]``: per-example gradients ``[B, P]`` times ``directionsᵀ`` ``[P, p̄]``.

    Once module hooks have passed their first-batch check on this ``loss_fn`` (the rule in ``per_example_grad_tensors``),
    the projection is taken module by module in the hooked pass (:func:`~.hooks.hook_projections`): no ``[B, P]`` is
    formed, and the directions are read through a cached transposed copy when that copy fits ``memory_budget_bytes``
    (``None``: always), else through views of them, so the basis is held once. Otherwise per-example gradients of at
    most ``chunk_size`` examples at a time (vmap) are projected parameter by parameter (see :func:`project_in_slices`).
    """
    dtype = accumulation_dtype(params)
    transposed = memory_budget_bytes is None or directions.numel() * dtype.itemsize <= memory_budget_bytes

    def times_directions(grads: Params) -> torch.Tensor:
        pieces = loss_fn.selection.unflatten(directions.to(dtype))  # each [p̄, *shape]
        return sum(g.reshape(g.shape[0], -1).to(dtype) @ pieces[n].reshape(pieces[n].shape[0], -1).T for n, g in grads.items())

    return project_in_slices(loss_fn, params, batch, times_directions,
                             lambda plan: hook_projections(loss_fn, batch, plan, directions, transposed), chunk_size)


def project_in_slices(loss_fn: LossFunction, params: Params, batch: Batch, project_grads: Callable[[Params], torch.Tensor],
                      project_hooked: Callable[[dict], torch.Tensor], chunk_size: int | None) -> torch.Tensor:
    """``[B, p̄]`` by ``project_hooked(plan)`` once hooks passed their first-use check on ``loss_fn``, else by
    ``project_grads`` on per-example gradients of at most ``chunk_size`` examples at a time (so at most
    ``chunk_size × P`` gradient values are held). The slice that runs the hooks' check sends the whole batch the
    hooks' way, as every later batch goes, so a row's features do not depend on which batch came first."""
    plan = hook_plan(loss_fn, params) if loss_fn.hooks_ok else None
    if plan is None:
        size, parts = batch_size_of(batch), []
        step = chunk_size or size
        for start in range(0, size, step):
            grads = per_example_grad_tensors(loss_fn, params, slice_batch(batch, start, start + step), chunk_size=chunk_size)
            plan = hook_plan(loss_fn, params) if loss_fn.hooks_ok else None
            if plan is not None:
                break
            parts.append(project_grads(grads))
        if plan is None:
            return torch.cat(parts)
    return project_hooked(plan)


def choose_projection(num_params: int, rank: int, batch_size: int, memory_budget_bytes: float) -> str:
    """Cheaper path: ``"grads"`` unless p̄ = 1 or one example's gradient (x3 working space) exceeds the budget.

    The gradient path costs about one forward+backward (~3 forwards) per batch; the JVP path
    about 2-3 forwards per direction, so it only wins for a single direction or when
    per-example gradients cannot fit in memory.
    """
    one_example = 3 * num_params * 4
    if rank <= 1 or one_example > memory_budget_bytes:
        return "jvp"
    return "grads"


def grads_chunk_size(num_params: int, batch_size: int, memory_budget_bytes: float) -> int:
    """Examples per vmap chunk so that their gradients (x3 working space) fit the budget."""
    return int(max(1, min(batch_size, memory_budget_bytes // (3 * num_params * 4))))
