"""What one batched Hessian-vector product, or one first-order backward, holds in memory beside the model (the rule behind a
pass's vector count, and the activations every cost estimate counts).

:func:`hvp.batch_hvp` on k vectors runs the loss forward and a first backward that keeps its graph, then one backward of
``g · v`` for all k vectors at once (vmap over the tangents). So it holds:

- **fixed**: the graph of the forward and the first backward, i.e. the activations they save for backward (``A`` bytes,
  proportional to the batch's tokens; the model's own parameters are not counted), and the first-order gradients
  (``P`` values);
- **per vector**: the batched backward walks that graph back once for all k tangents, so every gradient it computes on
  the way is ``k`` times the size of the tensor it belongs to: up to one more ``A`` per vector; and ``P``-sized copies
  (the vector, its tangent slices, the product, its flattened copy).

Measured with the allocator's own events (``torch.profiler`` memory records) on tiny BERT and GPT-2 models (2-3 layers,
8-32 rows, all parameters or the last layer), the bytes per vector were ``0.5-1.2 × A`` plus ``3-4 × P`` values, and
the fixed part ``A + P`` values within 6%. Counted here: fixed ``A + P·d``, per vector ``A + 4·P·d`` (``d`` bytes
per value), which was above every measurement. ``A`` itself is measured on a batch by :func:`saved_activation_bytes`.

A pass over the Hessian data (:func:`hvp.dataset_hvp`) adds ``PASS_COPIES`` ``[P, k]`` buffers (the running sum, a batch's
scaled product); :func:`pass_bytes` counts it all, and :func:`vectors_per_backward` takes fewer vectors per batched
backward (``per_backward``: the graph of each batch is kept and walked back once per chunk, same numbers) when a pass
of all k would exceed the budget. Every batched-HVP path sizes its blocks with these two functions, and so does its
cost estimate (`hf_influence.cost`): the block Krylov fit, the trace probes of the spectrum, the dense and Kronecker
random projections; the one-vector passes (Arnoldi, Lanczos) and LiSSA's minibatch HVPs are counted by the same rule.

A first-order forward and backward (per-example gradients by hooks or vmap, a hooked projection or norm, for scoring
or a streamed Fisher) keeps no graph of its backward: it holds the forward's saved activations (``A₁``, measured by
:func:`saved_activation_bytes` with ``create_graph=False``: one forward, no backward) and, on the way back, gradients
of about the same tensors (hooks keep every hooked module's output gradient until the per-example products are taken).
Measured on tiny BERTs (fp64 and fp32, 8 and 32 rows, all parameters and the last layer), the peak beside the ``[B, P]``
gradients was ``1.8-2.2 × A₁`` for hooks (gradients, projections, norms); counted: :func:`backward_bytes`, ``2 × A₁``.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.utils import logging

from ..data import Batch, batch_tokens
from .grads import LossFunction, Params
from .hvp import _only_selection_records

HVP = Callable[..., torch.Tensor]  # ([P, k], per_backward=None) -> [P, k]

logger = logging.get_logger(__name__)
PER_VECTOR_COPIES = 4  # P-sized values per vector inside batch_hvp: the vector, its tangent, the product, the flat copy
BACKWARD_COPIES = 2  # A₁'s a first-order forward and backward holds: the saved activations, the output gradients
PASS_COPIES = 2  # [P, k] buffers of a pass over the Hessian data beside batch_hvp's: the running sum, a batch's scaled product


def saved_activation_bytes(loss_fn: LossFunction, params: Params, batch: Batch, create_graph: bool = True) -> int:
    """Bytes of the activations the loss forward and the graph-keeping first backward of :func:`hvp.batch_hvp` save
    for backward on ``batch`` (distinct storages; the model's parameters left out): ``A`` in the module docstring.
    Costs one forward and one backward of ``batch``; nothing is kept. ``create_graph=False``: what the forward alone
    saves for a first-order backward (``A₁``; one forward, no backward)."""
    model_storages = {p.untyped_storage().data_ptr() for p in loss_fn.module.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in model_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()  # the tensor itself (an output's) would close a cycle through its grad_fn that gc cannot free

    leaves = {name: tensor.detach().requires_grad_(True) for name, tensor in params.items()}
    with torch.enable_grad(), _only_selection_records(loss_fn), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn.mean(leaves, batch)
        if create_graph:
            torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    return sum(saved.values())


def largest_batch(batches: list[Batch]) -> Batch:
    """The batch with the most tokens (rows × columns of its widest tensor), whose graph is the largest."""
    return max(batches, key=batch_tokens)


def backward_bytes(activation_bytes: int) -> int:
    """Bytes a first-order forward and backward of a batch holds beside the gradients it forms: the forward's saved
    activations (``activation_bytes``, ``A₁``) and the backward's gradients of about as many (module docstring)."""
    return BACKWARD_COPIES * activation_bytes


def fixed_bytes(num_params: int, itemsize: int, activation_bytes: int) -> int:
    """Bytes a batched HVP holds whatever its vector count: the graph's activations and the first-order gradients."""
    return activation_bytes + num_params * itemsize


def per_vector_bytes(num_params: int, itemsize: int, activation_bytes: int) -> int:
    """Bytes a batched HVP holds per vector: the batched backward's gradients and the vector's P-sized copies."""
    return activation_bytes + PER_VECTOR_COPIES * num_params * itemsize


def pass_bytes(vectors: int, num_params: int, itemsize: int, activation_bytes: int, per_backward: int | None = None) -> int:
    """Bytes one pass of :func:`hvp.dataset_hvp` on ``vectors`` vectors holds beside the model and its inputs: the graph
    once, at most ``per_backward`` vectors (default: all) in each batched backward, and the pass's ``[P, vectors]``
    buffers (one more when the product is assembled from chunks)."""
    chunk = vectors if per_backward is None else max(1, min(per_backward, vectors))
    copies = PASS_COPIES + (chunk < vectors)
    return (fixed_bytes(num_params, itemsize, activation_bytes) + chunk * per_vector_bytes(num_params, itemsize, activation_bytes)
            + copies * vectors * num_params * itemsize)


def vectors_per_backward(vectors: int, num_params: int, itemsize: int, activation_bytes: int, memory_budget: float) -> int:
    """The most vectors (<= ``vectors``) per batched backward whose pass (:func:`pass_bytes`) fits ``memory_budget``
    bytes; 1 when not even one does (the cost estimate refuses that call before it runs)."""
    if pass_bytes(vectors, num_params, itemsize, activation_bytes) <= memory_budget:
        return vectors
    spare = memory_budget - pass_bytes(vectors, num_params, itemsize, activation_bytes, per_backward=1)
    return int(max(1, min(vectors - 1, 1 + spare // per_vector_bytes(num_params, itemsize, activation_bytes))))


def budgeted(hvp: HVP, num_params: int, itemsize: int, activation_bytes: int, memory_budget: float, what: str) -> Callable:
    """``hvp`` (``(vectors, per_backward)`` → ``H V``) taking, on each call, as many vectors per batched backward as
    :func:`vectors_per_backward` allows within ``memory_budget`` bytes; each new chunking is logged at INFO once."""
    said: set[tuple[int, int]] = set()

    def run(vectors: torch.Tensor) -> torch.Tensor:
        count = vectors.shape[1]
        chunk = vectors_per_backward(count, num_params, itemsize, activation_bytes, memory_budget)
        if chunk < count and (count, chunk) not in said:
            said.add((count, chunk))
            logger.info(f"{what}: {count} vectors per pass, {chunk} per batched backward (a pass of all {count} would hold "
                        f"{pass_bytes(count, num_params, itemsize, activation_bytes) / 2**20:,.1f} MiB, over the "
                        f"{memory_budget / 2**20:,.1f} MiB left of memory_budget_gb; the graph's activations "
                        f"{activation_bytes / 2**20:,.1f} MiB once and again per vector).")
        return hvp(vectors, per_backward=chunk)

    return run
