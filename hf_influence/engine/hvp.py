"""Hessian-vector products of the mean loss (double backward), and the explicit Hessian."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..data import Batch, batch_size_of
from .grads import LossFunction, Params, accumulation_dtype, check_finite


def batch_hvp(loss_fn: LossFunction, params: Params, batch: Batch, vectors: torch.Tensor, where: str = "a minibatch") -> torch.Tensor:
    """``H_B V`` for the Hessian ``H_B`` of the batch's mean loss; ``vectors`` is ``[P, k]`` → ``[P, k]``.

    One forward and backward that keeps its graph, then one backward of ``g · v`` per column
    (reverse-over-reverse: on CPU 1.7× faster than ``jvp`` of ``grad`` for one vector, 2.1× for 20).
    Parameters outside the selection record no graph. fp32 or wider. ``where`` names the batch in
    the error raised on NaN/Inf.
    """
    dtype = next(iter(params.values())).dtype
    leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in params.items()}
    with torch.enable_grad(), _only_selection_records(loss_fn):
        loss = loss_fn.mean(leaves, batch)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        linked = [(g, name) for g, name in zip(grads, leaves) if g is not None and g.requires_grad]
        columns = []
        for column in range(vectors.shape[1]):
            tangent = loss_fn.selection.unflatten(vectors[:, column].to(dtype))
            parts = torch.autograd.grad([g for g, _ in linked], list(leaves.values()), [tangent[name] for _, name in linked],
                                        retain_graph=column + 1 < vectors.shape[1], allow_unused=True) if linked else [None] * len(leaves)
            columns.append(loss_fn.selection.flatten({n: torch.zeros_like(t) if p is None else p for (n, t), p in zip(leaves.items(), parts)}))
    result = torch.stack(columns, dim=1).to(accumulation_dtype(params))  # [P, k]
    return check_finite(result, "a Hessian-vector product", f"{where}, {batch_size_of(batch)} examples")


@contextlib.contextmanager
def _only_selection_records(loss_fn: LossFunction) -> Iterator[None]:
    """Unselected parameters stop requiring grad for the duration (restored after), so the forward
    keeps no activations for derivatives nobody asks for."""
    selected = set(loss_fn.selection.names)
    frozen = [p for n, p in loss_fn.module.model.named_parameters() if n not in selected and p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)


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
