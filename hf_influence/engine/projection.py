"""Project per-example gradients onto directions ``u_i``: ``[B, p̄]`` numbers per batch.

Two paths, same numbers: forward-mode JVPs along each direction (no per-example gradient is
ever held in memory; costs ~p̄ forward passes), or per-example gradients times the directions: module
by module inside one hooked forward and backward where hooks apply (no ``[B, P]`` held), else vmapped
per-example gradients of at most ``chunk_size`` examples at a time (``chunk_size·P`` floats held).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn
from torch.func import jvp, vmap
from torch.nn import functional as F

from ..data import Batch, batch_size_of, slice_batch
from .grads import LossFunction, Params, accumulation_dtype, decide_hooks, per_example_grad_tensors
from .hooks import _accumulate, _hooked_pass, hook_plan

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
    the projection is taken module by module in the hooked pass (:func:`hook_projections`): no ``[B, P]`` is formed, the
    directions are read through views of themselves, and embedding tables through a transposed copy where it fits
    ``memory_budget_bytes`` (``None``: always). Otherwise per-example gradients of at most ``chunk_size`` examples at a
    time (vmap) are projected parameter by parameter (see :func:`project_in_slices`).
    """
    dtype = accumulation_dtype(params)

    def times_directions(grads: Params) -> torch.Tensor:
        pieces = loss_fn.selection.unflatten(directions.to(dtype))  # each [p̄, *shape]
        return sum(g.reshape(g.shape[0], -1).to(dtype) @ pieces[n].reshape(pieces[n].shape[0], -1).T for n, g in grads.items())

    return project_in_slices(loss_fn, params, batch, times_directions,
                             lambda plan: hook_projections(loss_fn, batch, plan, directions, memory_budget_bytes), chunk_size)


def project_in_slices(loss_fn: LossFunction, params: Params, batch: Batch, project_grads: Callable[[Params], torch.Tensor],
                      project_hooked: Callable[[dict], torch.Tensor], chunk_size: int | None) -> torch.Tensor:
    """``[B, p̄]`` by ``project_hooked(plan)`` once hooks passed their first-use check on ``loss_fn``, else by
    ``project_grads`` on per-example gradients of at most ``chunk_size`` examples at a time (so at most
    ``chunk_size × P`` gradient values are held). Where hooks apply and are not checked yet, their check runs first
    (:func:`~hf_influence.engine.grads.decide_hooks`, on a few rows); once it passes, the whole batch goes the hooks' way,
    as every later batch does, so a row's features do not depend on which batch came first."""
    decide_hooks(loss_fn, params, batch, chunk_size)
    plan = hook_plan(loss_fn, params) if loss_fn.hooks_ok else None
    if plan is not None:
        return project_hooked(plan)
    size = batch_size_of(batch)
    step = chunk_size or size
    return torch.cat([project_grads(per_example_grad_tensors(loss_fn, params, slice_batch(batch, start, start + step), chunk_size=chunk_size))
                      for start in range(0, size, step)])


def hook_projections(loss_fn: LossFunction, batch: Batch, plan: dict[nn.Module, dict[str, str]], directions: torch.Tensor,
                     memory_budget_bytes: float | None = None) -> torch.Tensor:
    """``[B, p̄]``: each example's gradient times ``directionsᵀ`` (``[p̄, P]``), from one forward and backward, projected
    module by module (see :class:`Projections`); embedding tables are copied transposed when all of them fit
    ``memory_budget_bytes`` (``None``: always). fp32 (fp64 for fp64 models)."""
    calls, out_grads, dtype = _hooked_pass(loss_fn, batch, plan)
    views, tables = _pieces(loss_fn, directions, dtype, _tables_to_copy(plan, directions.shape[0], dtype, memory_budget_bytes))
    sink = Projections(views, tables, batch_size_of(batch), directions.shape[0], dtype, directions.device)
    for (module, inputs, _), out_grad in zip(calls, out_grads):
        if out_grad is not None:
            _accumulate(module, plan[module], inputs, out_grad.to(dtype), sink)
    return sink.total


class Projections:
    """Sink of the hooked pass (:func:`~.hooks._accumulate`): each example's gradient times the directions, added module
    by module into ``[p̄, B]``, so no per-example gradient of the whole selection is held.

    ``views`` are the directions by parameter, ``{name: [p̄, *shape]}``, read in place: a module's per-example gradient
    ``[B, n]`` enters as ``u [p̄, n] @ valueᵀ``, the GEMM order that ran 1.04-1.08x faster than ``value @ uᵀ`` on the
    layers of ``benchmarks/throughput.py``'s model. An embedding table's per-example gradient is formed only for a table
    with no more rows than tokens (token types, by one-hot rows); ids the batch shares (positions, expanded by
    ``_batch_expander``: stride 0) gather the directions' rows once; other ids read ``Σ_{t,d} g_td u[:, id_t, d]`` by one
    ``embedding_bag`` over ``tables[name]`` (a ``[rows·D, p̄]`` copy: 0.9 ms per batch of 32 × 64 tokens on that model,
    4.0 ms by gathering ``[B·T, D, p̄]`` rows), else one direction at a time (3.2 ms, ``[B, T, D]`` held).
    """

    def __init__(self, views: Params, tables: Params, size: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.views, self.tables = views, tables
        self.total_t = torch.zeros((rank, size), dtype=dtype, device=device)  # [p̄, B]

    @property
    def total(self) -> torch.Tensor:
        """``[B, p̄]``."""
        return self.total_t.T.contiguous()

    def put(self, name: str, value: torch.Tensor) -> None:
        u = self.views[name]
        self.total_t.addmm_(u.reshape(u.shape[0], -1), value.reshape(value.shape[0], -1).T)

    def lookup(self, name: str, ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None) -> None:
        if padding_idx is not None:
            g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
        u, (size, steps, width) = self.views[name], g.shape  # u [p̄, rows, D], g [B, T, D]
        if u.shape[1] <= steps:
            self.put(name, torch.bmm(F.one_hot(ids, u.shape[1]).to(g.dtype).transpose(1, 2), g))
        elif ids.stride(0) == 0:
            self.total_t.addmm_(u[:, ids[0]].reshape(u.shape[0], -1), g.reshape(size, -1).T)
        elif name in self.tables:
            entries = (ids.unsqueeze(-1) * width + torch.arange(width, device=ids.device)).reshape(size, -1)  # [B, T·D]
            self.total_t += F.embedding_bag(entries, self.tables[name], per_sample_weights=g.reshape(size, -1), mode="sum").T
        else:
            for row, direction in zip(self.total_t, u):
                row += torch.linalg.vecdot(F.embedding(ids, direction).reshape(size, -1), g.reshape(size, -1))


def embedding_tables(plan: dict[nn.Module, dict[str, str]]) -> dict[str, int]:
    """``{name: numel}`` of the selected embedding weights in a hook plan (the tables :func:`hook_projections` may copy)."""
    return {roles["weight"]: module.weight.numel() for module, roles in plan.items() if isinstance(module, nn.Embedding) and "weight" in roles}


def _tables_to_copy(plan: dict[nn.Module, dict[str, str]], rank: int, dtype: torch.dtype, budget: float | None) -> tuple[str, ...]:
    """The selected embedding weights, when a ``[rows·D, p̄]`` copy of all of them fits ``budget`` (else none)."""
    tables = embedding_tables(plan)
    if budget is not None and sum(tables.values()) * rank * dtype.itemsize > budget:
        return ()
    return tuple(tables)


def _pieces(loss_fn: LossFunction, directions: torch.Tensor, dtype: torch.dtype, tables: tuple[str, ...]) -> tuple[Params, Params]:
    """``directions`` (``[p̄, P]``) in ``dtype`` as views by parameter, ``{name: [p̄, *shape]}`` (a copy only where
    ``dtype`` differs), and a contiguous ``[rows·D, p̄]`` copy of each embedding weight in ``tables``. Kept on ``loss_fn``
    (the last directions seen, their version, dtype and tables), so it lives as long as its `Influence`."""
    cache, key = loss_fn.projection_columns, (directions._version, dtype, tables)
    if cache[0] is not directions or cache[1] != key:
        flat = directions.to(dtype)
        pieces = torch.split(flat, loss_fn.selection.numels, dim=1)
        views = {name: piece.view(-1, *shape) for name, piece, shape in zip(loss_fn.selection.names, pieces, loss_fn.selection.shapes)}
        copies = {name: views[name].permute(1, 2, 0).contiguous().view(-1, flat.shape[0]) for name in tables}
        cache[:] = [directions, key, (views, copies)]
    return cache[2]


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
