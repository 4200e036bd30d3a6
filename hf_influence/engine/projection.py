"""Project per-example gradients onto directions ``u_i``: ``[B, p̄]`` numbers per batch.

Two paths, same numbers: forward-mode JVPs along each direction (no per-example gradient is
ever held in memory; costs ~p̄ forward passes), or vmapped per-example gradients times the
directions (one backward per example plus a ``[B, P] x [P, p̄]`` product, ``B·P`` floats held).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.func import jvp, vmap

from ..data import Batch
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
    loss_fn: LossFunction, params: Params, batch: Batch, directions: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """``[B, p̄]``: per-example gradients ``[B, P]`` times ``directionsᵀ`` ``[P, p̄]``.

    Accumulated parameter by parameter, so the ``[B, P]`` matrix is never concatenated. Once module hooks
    have passed their first-batch check on this ``loss_fn`` (the rule in ``per_example_grad_tensors``),
    the projection is taken module by module in the hooked pass (:func:`~.hooks.hook_projections`).
    """
    plan = hook_plan(loss_fn, params) if loss_fn.hooks_ok else None
    if plan is not None:
        return hook_projections(loss_fn, batch, plan, directions)
    dtype = accumulation_dtype(params)
    grads = per_example_grad_tensors(loss_fn, params, batch, chunk_size=chunk_size)
    if loss_fn.hooks_ok and hook_plan(loss_fn, params) is not None:
        # this batch ran the hooks' first-use check: project it the way every later batch is projected, so that a
        # row's features do not depend on which batch came first (a resumed run equals a fresh one bit for bit)
        return hook_projections(loss_fn, batch, hook_plan(loss_fn, params), directions)
    pieces = loss_fn.selection.unflatten(directions.to(dtype))  # each [p̄, *shape]
    total = None
    for name, g in grads.items():
        part = g.reshape(g.shape[0], -1).to(dtype) @ pieces[name].reshape(pieces[name].shape[0], -1).T
        total = part if total is None else total + part
    return total


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
