"""Hessian-vector products of the mean loss (forward-over-reverse), and the explicit Hessian."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.func import grad, jvp, vmap
from tqdm.auto import tqdm

from ..data import Batch, batch_size_of
from .grads import LossFunction, Params, accumulation_dtype, check_finite


def batch_hvp(loss_fn: LossFunction, params: Params, batch: Batch, vectors: torch.Tensor, where: str = "a minibatch") -> torch.Tensor:
    """``H_B V`` for the Hessian ``H_B`` of the batch's mean loss; ``vectors`` is ``[P, k]`` → ``[P, k]``.

    Forward-over-reverse (``jvp`` of ``grad``), vectorised over the k columns, fp32 or wider. ``where``
    names the batch in the error raised on NaN/Inf.
    """
    dtype = next(iter(params.values())).dtype
    tangents = loss_fn.selection.unflatten(vectors.T.to(dtype))  # each [k, *shape]

    def one(tangent: Params) -> Params:
        return jvp(lambda p: grad(loss_fn.mean)(p, batch), (params,), (tangent,))[1]

    out = vmap(one)(tangents)
    result = loss_fn.selection.flatten(out, batch_dims=1).T.to(accumulation_dtype(params))  # [P, k]
    return check_finite(result, "a Hessian-vector product", f"{where}, {batch_size_of(batch)} examples")


def dataset_hvp(
    loss_fn: LossFunction, params: Params, batches: Iterable[Batch], vectors: torch.Tensor
) -> torch.Tensor:
    """``H V`` for the Hessian of the mean loss over all examples in ``batches``: ``[P, k]``."""
    total, count = None, 0
    for index, batch in enumerate(batches):
        size = batch_size_of(batch)
        part = batch_hvp(loss_fn, params, batch, vectors, where=f"Hessian data batch {index}") * size
        total = part if total is None else total + part
        count += size
    return total / count


def explicit_hessian(
    loss_fn: LossFunction, params: Params, batches: list[Batch], chunk_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """The ``[P, P]`` Hessian of the mean loss over ``batches``, column block by column block.

    Costs P HVPs per example: meant for parameter sets up to a few thousand.
    """
    num = loss_fn.selection.num_params
    dtype = accumulation_dtype(params)
    device = next(iter(params.values())).device
    columns = []
    for start in tqdm(range(0, num, chunk_size), desc="explicit Hessian", disable=not progress):
        eye = torch.zeros(num, min(chunk_size, num - start), dtype=dtype, device=device)
        eye[start : start + eye.shape[1]].fill_diagonal_(1.0)
        columns.append(dataset_hvp(loss_fn, params, batches, eye))
    hessian = torch.cat(columns, dim=1)
    return (hessian + hessian.T) / 2
