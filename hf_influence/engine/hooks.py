"""Per-example gradients from one batched forward and one backward, with module hooks.

For a module ``y = W a (+ b)`` the gradient of example b's loss is ``Σ_t g_bt a_btᵀ`` (and ``Σ_t g_bt``
for the bias), where ``a`` is the module's input and ``g = ∂(Σ_b L_b)/∂y`` its output gradient: one
forward and one backward of the SUM of the per-example losses give every example's gradient, since no
example's loss depends on another's activations (eval mode, no batch statistics). Supported modules
(exact types, not subclasses, whose ``forward`` may differ):

- ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D`` (weight ``[in, out]``), weight and bias;
- ``nn.Embedding`` (no ``max_norm``): ``g`` scatter-added into the rows of the input ids, the
  ``padding_idx`` row kept at zero as torch does; ids with a leading dimension of 1 (BERT's and GPT-2's
  position ids ``[1, T]``) are expanded to the batch before the lookup, so the output gradient stays per
  example;
- ``nn.LayerNorm`` over the last dimension: weight ``Σ_t g_t ⊙ x̂_t`` with ``x̂`` the normalised input, bias ``Σ_t g_t``.

A selection with any other parameter (T5's RMS norm, a bare ``nn.Parameter``), a parameter shared with
a module of another type, or a module called on inputs whose leading dimension is not the batch, is
reported unsupported; :func:`~hf_influence.engine.grads.per_example_grad_tensors` then uses vmap. Masked
tokens need no care here: their loss terms are zero, so their output gradients are zero.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..data import Batch, batch_size_of

if TYPE_CHECKING:
    from .grads import LossFunction, Params

SUPPORTED = (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm)


class UnsupportedForHooks(RuntimeError):
    """A module was called in a way hooks cannot split by example (the caller falls back to vmap)."""


def hook_plan(loss_fn: LossFunction, params: Params) -> dict[nn.Module, dict[str, str]] | None:
    """``{module: {"weight"|"bias": selected name}}`` covering every selected parameter, or ``None``.

    ``None`` when a selected parameter is not the model's own tensor (``params`` point elsewhere), is held
    by a module of an unsupported type, or is held by none (used directly in some ``forward``).
    """
    model = loss_fn.module.model
    named = dict(model.named_parameters())
    owners: dict[int, str] = {}
    for name in loss_fn.selection.names:
        tensor = params[name]
        if name not in named or tensor.data_ptr() != named[name].data_ptr() or tensor.shape != named[name].shape:
            return None
        owners[id(named[name])] = name
    plan: dict[nn.Module, dict[str, str]] = {}
    covered: set[str] = set()
    for module in model.modules():  # each module once, even where it is reachable under several names
        for role, parameter in module.named_parameters(recurse=False):
            name = owners.get(id(parameter))
            if name is None:
                continue
            if type(module) not in SUPPORTED or role not in ("weight", "bias") or getattr(module, "max_norm", None) is not None \
                    or len(getattr(module, "normalized_shape", (0,))) != 1:
                return None
            plan.setdefault(module, {})[role] = name
            covered.add(name)
    return plan if covered == set(loss_fn.selection.names) else None


def hook_grads(loss_fn: LossFunction, params: Params, batch: Batch, plan: dict[nn.Module, dict[str, str]]) -> Params:
    """Per-example gradients ``{name: [B, *shape]}`` of the selected parameters, from one forward and one backward,
    in fp32 (fp64 for fp64 models; the forward and backward run in the model's dtype).

    Runs the model itself (not ``functional_call``) under ``torch.enable_grad()``, with only the selected
    parameters requiring grad, in whatever train/eval mode the caller set (callers use ``eval_mode``).
    Raises :class:`UnsupportedForHooks` when a hooked module sees an input without the batch leading.
    """
    model, size = loss_fn.module.model, batch_size_of(batch)
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # per call: module, input, output
    named = dict(model.named_parameters())
    leaves = [named[name] for name in loss_fn.selection.names]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_requires_grad_only(model, leaves))
        for module in plan:
            if isinstance(module, nn.Embedding):
                stack.enter_context(_removing(module.register_forward_pre_hook(_batch_expander(size))))
            stack.enter_context(_removing(module.register_forward_hook(_recorder(calls, size))))
        with torch.enable_grad():
            losses = loss_fn.module(batch).reshape(-1)
            # Only the output gradients are asked for: autograd skips the (summed) parameter gradients.
            out_grads = torch.autograd.grad(losses.sum(), [output for _, _, output in calls], allow_unused=True) if calls else []
    dtype = torch.promote_types(leaves[0].dtype, torch.float32)  # products summed over tokens in fp32 at least
    grads: Params = {name: torch.zeros((size, *params[name].shape), dtype=dtype, device=params[name].device)
                     for name in loss_fn.selection.names}
    for (module, inputs, _), out_grad in zip(calls, out_grads):
        if out_grad is not None:
            _accumulate(module, plan[module], inputs, out_grad, grads)
    return grads


def _recorder(calls: list, size: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs = args[0]
        if not torch.is_tensor(output) or inputs.shape[0] != size or output.shape[0] != size:
            raise UnsupportedForHooks(f"{type(module).__name__} called on {tuple(inputs.shape)} for a batch of {size}")
        if output.requires_grad:
            calls.append((module, inputs.detach(), output))

    return hook


def _batch_expander(size: int):
    """Pre-hook: ids shared by the batch (leading dimension 1) are expanded to it, so the lookup is per example."""

    def hook(module: nn.Module, args: tuple):
        ids = args[0]
        if ids.dim() >= 2 and ids.shape[0] == 1 and size > 1:
            return (ids.expand(size, *ids.shape[1:]), *args[1:])
        return None

    return hook


def _accumulate(module: nn.Module, roles: dict[str, str], inputs: torch.Tensor, out_grad: torch.Tensor, grads: Params) -> None:
    size, dtype = out_grad.shape[0], next(iter(grads.values())).dtype
    g = out_grad.reshape(size, -1, out_grad.shape[-1]).to(dtype)  # [B, T, out]
    inputs = inputs if isinstance(module, nn.Embedding) else inputs.to(dtype)
    if "bias" in roles:
        grads[roles["bias"]] += g.sum(dim=1).to(grads[roles["bias"]].dtype)
    if "weight" not in roles:
        return
    target = grads[roles["weight"]]
    if isinstance(module, nn.Embedding):
        ids = inputs.reshape(size, -1)  # [B, T]
        target.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g.to(target.dtype))
        if module.padding_idx is not None:
            target[:, module.padding_idx] = 0
        return
    if isinstance(module, nn.LayerNorm):
        normed = F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
        target += (g * normed.reshape_as(g)).sum(dim=1).reshape_as(target).to(target.dtype)
        return
    a = inputs.reshape(size, -1, inputs.shape[-1])  # [B, T, in]
    if isinstance(module, Conv1D):  # weight [in, out]
        target += torch.bmm(a.transpose(1, 2), g).to(target.dtype)
    else:  # nn.Linear, weight [out, in]
        target += torch.bmm(g.transpose(1, 2), a).to(target.dtype)


@contextlib.contextmanager
def _removing(handle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _requires_grad_only(model: nn.Module, leaves: list[torch.Tensor]) -> Iterator[None]:
    """Only ``leaves`` require grad for the duration (the forward records nothing else); restored after."""
    chosen = {id(t) for t in leaves}
    before = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in before:
        parameter.requires_grad_(id(parameter) in chosen)
    try:
        yield
    finally:
        for parameter, flag in before:
            parameter.requires_grad_(flag)
