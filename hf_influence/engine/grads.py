"""Per-example losses and gradients over a parameter selection, with ``torch.func``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.utils import logging

from ..data import Batch, additive_mask, batch_size_of, slice_batch
from ..params import ParamSelection
from .._utils.errors import InvalidInputError, NonFiniteError
from .hooks import FlatGrads, UnsupportedForHooks, hook_grads, hook_plan

logger = logging.get_logger(__name__)
Params = dict[str, torch.Tensor]


class _TaskModule(nn.Module):
    """Wraps model + task so that ``functional_call`` can swap the selected parameters."""

    def __init__(self, model: nn.Module, task: Any, measurement: bool):
        super().__init__()
        self.model, self.task = model, task
        self.fn = getattr(task, "per_example_measurement", None) if measurement else None
        self.fn = self.fn or task.per_example_loss

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.fn(self.model, batch)


class LossFunction:
    """Per-example loss ``(params, batch) -> Tensor[B]`` as a pure function of the selected params.

    Args:
        model (`nn.Module`): the model; parameters outside ``selection`` stay fixed.
        task: object with ``per_example_loss(model, batch)``.
        selection (`ParamSelection`): parameters to differentiate.
        measurement (`bool`, defaults to `False`): use the task's test-side measurement if it has one.
    """

    def __init__(self, model: nn.Module, task: Any, selection: ParamSelection, measurement: bool = False):
        self.module = _TaskModule(model, task, measurement)
        self.selection = selection
        self.mask_kind = getattr(task, "mask_kind", None)
        self.vmap_ok: bool | None = None  # learnt on first use: can this model run under vmap?
        self.hooks_ok: bool | None = None  # learnt on first use: do module hooks give vmap's gradients?
        self.projection_columns: list = [None, None, None]  # hooks: the last directions seen, (their version, dtype, tables), (views, table copies)

    def __call__(self, params: Params, batch: Batch) -> torch.Tensor:
        renamed = {f"model.{k}": v for k, v in params.items()}
        with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD and double backward need the math kernel
            losses = functional_call(self.module, renamed, (batch,), strict=False)
        return losses.reshape(-1)

    def mean(self, params: Params, batch: Batch) -> torch.Tensor:
        return self(params, batch).mean()

    def single(self, params: Params, example: Batch) -> torch.Tensor:
        """Loss of one example given without its batch dimension (for ``vmap``)."""
        return self(params, {k: v.unsqueeze(0) for k, v in example.items()})[0]

    def vmappable(self, batch: Batch, dtype: torch.dtype) -> Batch:
        """Replace a 2-D padding mask by the 4-D additive mask vmap can trace."""
        mask = batch.get("attention_mask")
        if mask is None or mask.dim() != 2 or self.mask_kind is None:
            return batch
        return {**batch, "attention_mask": additive_mask(mask, self.mask_kind, dtype)}


def accumulation_dtype(params: Params) -> torch.dtype:
    """fp32 for half/bf16/fp32 models, fp64 for fp64 models.

    The precision rule: the model's own forward and backward passes (first and second order) run in its
    dtype, with the task's loss taken in fp32 from upcast logits; every per-example gradient (by module hooks: each
    module's activations and output gradients, before their products and sums), projection and Hessian-vector
    product leaves the model cast to this dtype, and everything after it (Krylov basis,
    eigenpairs, inverses, scores) stays in it. Vectors fed back into the model (HVP and JVP tangents) are
    rounded to the model's dtype.
    """
    dtype = next(iter(params.values())).dtype
    return torch.promote_types(dtype, torch.float32)


def check_finite(tensor: torch.Tensor, what: str, where: str, model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor``, or :class:`NonFiniteError` naming ``what`` and ``where``, with advice for ``model_dtype``
    (see :func:`nonfinite_advice`)."""
    if not _all_finite(tensor):
        raise NonFiniteError(f"NaN/Inf in {what} ({where}). Check the inputs of that batch (labels, lengths) and the model "
                             f"weights. {nonfinite_advice(model_dtype)}")
    return tensor


FINITE_CHECK_ELEMENTS = 2**22  # elements per slice when a sum is not finite and each entry must be checked


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, without ``torch.isfinite``'s temporaries the size of ``tensor`` (on CPU an absolute
    value and masks: 1.4x a ``[B, P]`` fp64 batch of gradients): a NaN or an infinity anywhere makes the sum non-finite, so
    a finite sum settles it; a non-finite one (or an overflow of finite entries) is checked slice by slice."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(FINITE_CHECK_ELEMENTS))


def nonfinite_advice(model_dtype: torch.dtype | None) -> str:
    """What to try when a model of ``model_dtype`` gives NaN/Inf (``None``: the dtype is not known here)."""
    half = ("A float16 model overflows easily (its largest value is 65504; second derivatives, e.g. through LayerNorm, "
            "exceed it first): load it in bfloat16 (same memory, float32's range) or float32.")
    if model_dtype == torch.float16:
        return half
    if model_dtype == torch.bfloat16:
        return ("A bfloat16 model has float32's range, so this is rarely overflow: look for NaN/Inf already in the weights "
                "(a diverged run) or an extreme input; bfloat16 keeps 8 bits of mantissa, so if the weights are finite, "
                "load the model in float32 and compare.")
    if model_dtype in (torch.float32, torch.float64):
        return (f"The model is {str(model_dtype).removeprefix('torch.')}, so overflow is unlikely: look for NaN/Inf already "
                "in the weights (a diverged run, e.g. torch.isfinite over model.parameters()) or an extreme input.")
    return "If the model is float16: " + half[0].lower() + half[1:]


def per_example_grads(
    loss_fn: LossFunction, params: Params, batch: Batch, chunk_size: int | None = None, mode: str = "auto"
) -> torch.Tensor:
    """Flattened gradient of each example's loss: ``[B, P]``, fp32 (fp64 for fp64 models).

    ``mode="hooks"`` takes them from one batched forward and backward with module hooks (``engine/hooks.py``;
    every selected parameter must belong to a ``Linear``, ``Conv1D``, ``Embedding`` or ``LayerNorm``),
    ``"vmap"`` vectorises over examples (chunks of ``chunk_size``), ``"loop"`` runs one backward per
    example, ``"auto"`` follows the rule of :func:`per_example_grad_tensors`. All give the same numbers.
    """
    grads = per_example_grad_tensors(loss_fn, params, batch, chunk_size, mode)
    if isinstance(grads, FlatGrads):  # hooks wrote them into one [B, P] buffer already
        return grads.flat
    return loss_fn.selection.flatten(grads, batch_dims=1).to(accumulation_dtype(params))


HOOK_CHECK_ROWS = 2  # rows of the first batch on which a caller that never needs [B, P] checks hooks against vmap


def hooks_by_default(dtype: torch.dtype) -> bool:
    """Whether ``mode="auto"`` tries module hooks for a model of this dtype: every floating dtype, half precision
    included (hooks upcast each module's activations and output gradients to fp32 before their products, so their
    half-precision gradients are closer to float32's than vmap's, which reduce in the model's dtype)."""
    return dtype.is_floating_point


HALF_CHECK_RTOL = {torch.bfloat16: 0.5, torch.float16: 0.25}  # see hooks_check_tolerance


def hooks_check_tolerance(dtype: torch.dtype) -> float:
    """Largest hooks-vs-vmap gap on the first batch, relative to the largest gradient entry, that passes the check.

    float32 / float64: √eps (rounding passes, a missed use of a parameter does not). Half precision: vmap's own
    gradients reduce in the model's dtype (an embedding row sums its tokens' output gradients in bfloat16), so the
    gap is vmap's rounding, not hooks': on the trained tiny BERTs of ``tests/utils.py`` (4 seeds, all parameters)
    it reached 0.32 in bfloat16 and 0.06 in float16, almost all of it in the embeddings, whose vmap gradients were
    0.42 from float32's (relative) against hooks' 0.19 (seed 2). Hence 0.5 / 0.25: a missed use still fails the check when it
    moves an entry by more than that fraction of the largest one (load the model in float32 to check it finer).
    """
    return HALF_CHECK_RTOL.get(dtype, torch.finfo(dtype).eps ** 0.5)


def per_example_grad_tensors(
    loss_fn: LossFunction, params: Params, batch: Batch, chunk_size: int | None = None, mode: str = "auto"
) -> Params:
    """Per-example gradients by parameter name, each ``[B, *shape]`` (see :func:`per_example_grads`).

    The ``"auto"`` rule (:func:`hooks_by_default`: every floating dtype): module hooks when every selected parameter
    is supported by them (:func:`hook_plan`). The first ``HOOK_CHECK_ROWS`` rows of their first batch are also computed by
    vmap and compared (within :func:`hooks_check_tolerance` of the model's dtype, relative to the largest entry), before the
    whole batch takes the path decided, so no batch's ``[B, P]`` is formed twice; on a mismatch, or a module
    called on inputs hooks cannot split by example, this ``loss_fn`` uses vmap from then on, with a warning.
    Otherwise vmap, falling back to the loop if vmap cannot trace the model.
    In half precision both paths run the forward and backward in the model's dtype; hooks then upcast activations
    and output gradients to fp32 before ``Σ_t g_t a_tᵀ``, while vmap's products and sums stay in the model's dtype.
    On the trained tiny BERTs of ``tests/utils.py`` in bfloat16 (4 seeds × last layer / all parameters) hooks'
    gradients were closer to float32's in every case (median per-example error 0.56-0.90% vs 0.64-1.13%), and so
    were their Arnoldi self-influences (mean relative error 0.8-10.5% vs 1.0-17.8%; tests/engine/test_hooks_precision.py).
    """
    hookable = hooks_by_default(next(iter(params.values())).dtype)
    if mode == "hooks" or (mode == "auto" and hookable and loss_fn.hooks_ok is not False):
        plan = hook_plan(loss_fn, params)
        if mode == "auto" and plan is not None and loss_fn.hooks_ok is None and batch_size_of(batch) > HOOK_CHECK_ROWS:
            decide_hooks(loss_fn, params, batch, chunk_size)
            return per_example_grad_tensors(loss_fn, params, batch, chunk_size, mode)
        if plan is None and mode == "hooks":
            raise InvalidInputError("Per-example gradients by hooks need every selected parameter to be the weight or bias "
                                    "of an nn.Linear, Conv1D, nn.Embedding or nn.LayerNorm; use mode='vmap' for this selection.")
        if plan is not None:
            grads = _checked_hook_grads(loss_fn, params, batch, plan, chunk_size, verify=mode == "auto")
            if grads is not None:
                return grads
    return _traced_grads(loss_fn, params, batch, chunk_size, mode if mode in ("vmap", "loop") else "auto")


def decide_hooks(loss_fn: LossFunction, params: Params, batch: Batch, chunk_size: int | None = None) -> None:
    """Where ``"auto"`` would take module hooks and they are not checked yet on ``loss_fn``, run their first-use check
    (:func:`per_example_grad_tensors` on the batch's first ``HOOK_CHECK_ROWS`` rows: hooks' and vmap's gradients of those
    rows only), which sets ``loss_fn.hooks_ok``; so a caller can send the whole batch one way, never forming ``[B, P]`` twice."""
    if (loss_fn.hooks_ok is None and hooks_by_default(next(iter(params.values())).dtype)
            and hook_plan(loss_fn, params) is not None):
        per_example_grad_tensors(loss_fn, params, slice_batch(batch, 0, min(batch_size_of(batch), HOOK_CHECK_ROWS)), chunk_size)


def _checked_hook_grads(loss_fn: LossFunction, params: Params, batch: Batch, plan: dict, chunk_size: int | None,
                        verify: bool) -> Params | None:
    """Hook gradients; on first use (``verify``) compared with vmap's. ``None`` where hooks do not apply here."""
    try:
        grads = hook_grads(loss_fn, params, batch, plan)
    except UnsupportedForHooks as reason:
        if not verify:
            raise InvalidInputError(f"Per-example gradients by hooks: {reason}; use mode='vmap' for this model.") from None
        loss_fn.hooks_ok = False
        logger.warning(f"Per-example gradients: module hooks cannot split this model's gradients by example ({reason}); using vmap.")
        return None
    if not verify or loss_fn.hooks_ok:
        return grads
    reference = _traced_grads(loss_fn, params, batch, chunk_size, "auto")
    scale = max(float(reference[n].abs().max()) for n in reference) or 1.0  # some entries are exactly 0 in theory (key biases)
    worst = max(float((grads[n] - reference[n]).abs().max()) for n in reference) / scale
    loss_fn.hooks_ok = worst <= hooks_check_tolerance(next(iter(params.values())).dtype)  # rounding passes, a missed use does not
    if not loss_fn.hooks_ok:
        logger.warning(f"Per-example gradients: module hooks differ from vmap on this model (relative {worst:.1e}; a selected "
                       "parameter is used outside its module's forward); using vmap.")
        return reference
    return grads


def _traced_grads(loss_fn: LossFunction, params: Params, batch: Batch, chunk_size: int | None, mode: str) -> Params:
    """vmap (``mode="auto"``: falling back to the loop once if the model cannot be traced) or the loop."""
    if mode == "auto":
        mode = "loop" if loss_fn.vmap_ok is False else "vmap"
    if mode == "vmap":
        try:
            grads = _vmap_grads(loss_fn, params, batch, chunk_size)
            loss_fn.vmap_ok = True
            return grads
        except RuntimeError as err:
            if loss_fn.vmap_ok is not None or "vmap" not in str(err):
                raise
            loss_fn.vmap_ok = False
            logger.warning(f"Per-example gradients: vmap cannot trace this model ({str(err)[:120]}...); using a loop.")
    return _loop_grads(loss_fn, params, batch)


def _vmap_grads(loss_fn: LossFunction, params: Params, batch: Batch, chunk_size: int | None) -> Params:
    traced = loss_fn.vmappable(batch, next(iter(params.values())).dtype)
    return vmap(grad(loss_fn.single), in_dims=(None, 0), chunk_size=chunk_size)(params, traced)


def _loop_grads(loss_fn: LossFunction, params: Params, batch: Batch) -> Params:
    rows = [grad(loss_fn.mean)(params, slice_batch(batch, i, i + 1)) for i in range(batch_size_of(batch))]
    return {name: torch.stack([row[name] for row in rows]) for name in params}


def mean_grad(loss_fn: LossFunction, params: Params, batch: Batch) -> torch.Tensor:
    """Flattened gradient of the batch's mean loss: ``[P]``."""
    g = grad(loss_fn.mean)(params, batch)
    return loss_fn.selection.flatten(g).to(accumulation_dtype(params))


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode (no dropout) and no autograd graph for unselected parameters; restores the mode.

    ``torch.func`` transforms ignore an outer ``no_grad``, so derivatives wrt the selection still flow.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
