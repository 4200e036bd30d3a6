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
- ``nn.LayerNorm`` over the last dimension: weight ``Σ_t g_t ⊙ x̂_t`` with ``x̂`` the normalised input, bias ``Σ_t g_t``;
- the RMS norms ``y = w ⊙ x / rms(x)`` of T5 (``T5LayerNorm``) and Llama (``LlamaRMSNorm``), weight only:
  ``Σ_t g_t ⊙ x̂_t``, with ``x̂`` the module's own output for a weight of ones (so its rounding is the model's).

A selection with any other parameter (T5's ``relative_attention_bias``, a bare ``nn.Parameter``), or a
parameter shared with a module of another type, gets no plan (:func:`hook_plan` returns ``None``), and a
module called on inputs whose leading dimension is not the batch raises :class:`UnsupportedForHooks`; in both
cases :func:`~hf_influence.engine.grads.per_example_grad_tensors` uses vmap for the whole selection. Masked
tokens need no care here: their loss terms are zero, so their output gradients are zero.

Precision (``engine/grads.accumulation_dtype``): activations and output gradients are captured in the model's dtype and
cast to fp32 (fp64 for fp64 models) before any product or sum over tokens, here, in ``norms.py`` and ``kronecker.py``;
so half-precision gradients are closer to float32's than vmap's, whose products and sums stay in the model's dtype.
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
RMS_NORMS = {("transformers.models.t5.modeling_t5", "T5LayerNorm"), ("transformers.models.llama.modeling_llama", "LlamaRMSNorm")}


def _is_rms_norm(module: nn.Module) -> bool:
    """T5's or Llama's RMS norm, by exact class (matched by module path and name, so neither model is imported here)."""
    return (type(module).__module__, type(module).__name__) in RMS_NORMS


class UnsupportedForHooks(RuntimeError):
    """A module was called in a way hooks cannot split by example (the caller falls back to vmap)."""


def hook_plan(loss_fn: LossFunction, params: Params) -> dict[nn.Module, dict[str, str]] | None:
    """``{module: {"weight"|"bias": selected name}}`` covering every selected parameter, or ``None``.

    ``None`` when a selected parameter is not the model's own tensor (``params`` point elsewhere), is held
    by a module of an unsupported type or by a T5-style ``relative_attention_bias`` (an embedding looked up at
    position buckets the batch shares, so its output has no batch dimension), or is held by none (used directly
    in some ``forward``). The caller then takes vmap for the whole selection.
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
    for path, module in model.named_modules():  # each module once, even where it is reachable under several names
        for role, parameter in module.named_parameters(recurse=False):
            name = owners.get(id(parameter))
            if name is None:
                continue
            if not _hookable(module, role) or path.endswith("relative_attention_bias"):
                return None
            plan.setdefault(module, {})[role] = name
            covered.add(name)
    return plan if covered == set(loss_fn.selection.names) else None


def _hookable(module: nn.Module, role: str) -> bool:
    if _is_rms_norm(module):
        return role == "weight"
    return type(module) in SUPPORTED and role in ("weight", "bias") and getattr(module, "max_norm", None) is None \
        and len(getattr(module, "normalized_shape", (0,))) == 1


class FlatGrads(dict):
    """Per-example gradients by name, each ``[B, *shape]``, all views of one ``flat`` ``[B, P]`` buffer in
    the selection's order (so flattening them copies nothing)."""

    def __init__(self, flat: torch.Tensor, views: Params):
        super().__init__(views)
        self.flat = flat
        self.written: set[str] = set()

    def put(self, name: str, value: torch.Tensor) -> None:
        """Add ``value`` (``[B, *shape]``) to ``name``'s gradients (the first write copies: the buffer starts empty)."""
        target = self[name]
        if name in self.written:
            target.add_(value.reshape(target.shape))
        else:
            target.copy_(value.reshape(target.shape))
            self.written.add(name)

    def lookup(self, name: str, ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None) -> None:
        """Embedding rows: scatter-add ``g`` ``[B, T, D]`` into the rows ``ids`` ``[B, T]``; ``padding_idx``'s row stays 0."""
        target = self.zeroed(name)
        target.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
        if padding_idx is not None:
            target[:, padding_idx] = 0

    def zeroed(self, name: str) -> torch.Tensor:
        """``name``'s gradients, set to zero on first use (for scatter-adds)."""
        if name not in self.written:
            self[name].zero_()
            self.written.add(name)
        return self[name]


def hook_grads(loss_fn: LossFunction, params: Params, batch: Batch, plan: dict[nn.Module, dict[str, str]]) -> FlatGrads:
    """Per-example gradients ``{name: [B, *shape]}`` of the selected parameters, from one forward and one backward,
    in fp32 (fp64 for fp64 models; the forward and backward run in the model's dtype).

    Runs the model itself (not ``functional_call``) under ``torch.enable_grad()``, with only the selected
    parameters requiring grad, in whatever train/eval mode the caller set (callers use ``eval_mode``).
    Raises :class:`UnsupportedForHooks` when a hooked module sees an input without the batch leading.
    """
    calls, out_grads, dtype = _hooked_pass(loss_fn, batch, plan)
    size = batch_size_of(batch)
    flat = torch.empty((size, loss_fn.selection.num_params), dtype=dtype, device=next(iter(params.values())).device)
    grads = FlatGrads(flat, loss_fn.selection.unflatten(flat))
    for (module, inputs, _), out_grad in zip(calls, out_grads):
        if out_grad is not None:
            _accumulate(module, plan[module], inputs, out_grad.to(dtype), grads)
    for name in loss_fn.selection.names:  # a parameter whose outputs did not reach the loss
        grads.zeroed(name)
    return grads


def _hooked_pass(loss_fn: LossFunction, batch: Batch, plan: dict[nn.Module, dict[str, str]]) -> tuple[list, list, torch.dtype]:
    """One forward and backward: per hooked call ``(module, input, output)``, its output gradient, and the accumulation dtype."""
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
    trimmed = [_drop_silent_tokens(inputs, g) if g is not None else (inputs, g) for (_, inputs, _), g in zip(calls, out_grads)]
    calls = [(module, inputs, output) for (module, _, output), (inputs, _) in zip(calls, trimmed)]
    return calls, [g for _, g in trimmed], torch.promote_types(leaves[0].dtype, torch.float32)  # products summed in fp32 at least


def _drop_silent_tokens(inputs: torch.Tensor, out_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs`` and ``out_grad`` (``[B, T, in]``, ``[B, T, out]``) without the token positions whose output gradient is
    zero in every example of the batch, which add nothing to any per-example product or sum over tokens. A classifier
    that reads one token leaves most of its last layer so (BERT's pooler reads [CLS]: there the query, attention output,
    feed-forward and layer norms keep 1 of 64 tokens on ``benchmarks/throughput.py``'s model). Candidates are the
    positions whose first feature is 0 everywhere, confirmed over the whole row; a call with ids for inputs (embeddings)
    or one token per example is left as is."""
    if out_grad.dim() < 3 or inputs.shape[:-1] != out_grad.shape[:-1]:
        return inputs, out_grad
    size = out_grad.shape[0]
    g = out_grad.reshape(size, -1, out_grad.shape[-1])  # [B, T, out]
    if not bool((g[:, :, 0] == 0).all(dim=0).any()):
        return inputs, out_grad
    silent = ((g.amax(dim=2) == 0) & (g.amin(dim=2) == 0)).all(dim=0)  # [T]; reductions along rows, no copy of g
    if not bool(silent.any()):
        return inputs, out_grad
    kept = (~silent).nonzero().squeeze(1)
    return inputs.reshape(size, -1, inputs.shape[-1]).index_select(1, kept), g.index_select(1, kept)


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


def _accumulate(module: nn.Module, roles: dict[str, str], inputs: torch.Tensor, out_grad: torch.Tensor, grads) -> None:
    size = out_grad.shape[0]
    g = out_grad.reshape(size, -1, out_grad.shape[-1])  # [B, T, out]
    if "bias" in roles:
        grads.put(roles["bias"], g.sum(dim=1))
    if "weight" not in roles:
        return
    name = roles["weight"]
    if isinstance(module, nn.Embedding):
        grads.lookup(name, inputs.reshape(size, -1), g, module.padding_idx)
        return
    if _is_rms_norm(module):
        with torch.no_grad():
            normed = torch.func.functional_call(module, {"weight": torch.ones_like(module.weight)}, (inputs,))
        grads.put(name, (g * normed.to(g.dtype).reshape_as(g)).sum(dim=1))
        return
    inputs = inputs.to(g.dtype)
    if isinstance(module, nn.LayerNorm):
        normed = F.layer_norm(inputs, module.normalized_shape, None, None, module.eps)
        grads.put(name, (g * normed.reshape_as(g)).sum(dim=1))
        return
    a = inputs.reshape(size, -1, inputs.shape[-1])  # [B, T, in]
    left, right = (a, g) if isinstance(module, Conv1D) else (g, a)  # Conv1D weight [in, out], nn.Linear [out, in]
    if hasattr(grads, "outer"):  # a sink that takes Σ_t left_t right_tᵀ in factored form (engine/kronecker.py)
        grads.outer(name, left, right)
    else:
        grads.put(name, torch.bmm(left.transpose(1, 2), right))


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
