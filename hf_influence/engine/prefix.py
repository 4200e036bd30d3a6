"""Run the frozen prefix of the forward pass once per Hessian batch, not once per HVP.

Every pass over the Hessian data (an Arnoldi or Lanczos step, a trace probe) runs the model on the
same batches in eval mode. The modules that finish before any selected parameter is used (the
embeddings and the layers below the selection) compute the same outputs on every pass: the
selection cannot reach them. :class:`PrefixReplay` runs them once per batch, keeps their outputs,
and replays those on later passes, so an HVP pass costs only the part of the model the selection
touches. With the last layer of a 12-layer encoder selected, that skips 11 layers' forward work.

The replay is checked before use: the HVP of one batch with and without it must agree (twice, so an
in-place change of a kept output shows) and replaying must not raise; if not, or if the kept outputs
would exceed the memory budget, every pass runs the whole model as before.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.utils import logging

from ..data import Batch
from .grads import LossFunction, Params
from .hvp import batch_hvp, dataset_hvp

logger = logging.get_logger(__name__)


def prefix_modules(loss_fn: LossFunction, params: Params, batch: Batch) -> list[nn.Module]:
    """The largest modules whose every call ends before the first call of a module owning a selected
    parameter (found by one hooked forward of ``batch``); empty when the selection is used first."""
    model = loss_fn.module.model
    selected = {id(model.get_parameter(name)) for name in loss_fn.selection.names}
    owners = {m for m in model.modules() if any(id(p) in selected for p in m._parameters.values() if p is not None)}
    clock, spans, first_owner_call = itertools.count(), {}, [float("inf")]

    def before(module: nn.Module, args: Any) -> None:
        tick = next(clock)
        spans.setdefault(module, [tick, tick])
        if module in owners:
            first_owner_call[0] = min(first_owner_call[0], tick)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        spans[module][1] = next(clock)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        with torch.no_grad():
            loss_fn(params, batch)
    finally:
        for handle in handles:
            handle.remove()
    if first_owner_call[0] == float("inf"):  # the loss never reached the selection: nothing to gain
        return []
    prefix = {m for m, (_, end) in spans.items() if end < first_owner_call[0]}
    names = {m: name for name, m in model.named_modules() if m in prefix}
    return [m for m, name in names.items() if not any(name.startswith(f"{other}.") for other in names.values())]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class PrefixReplay:
    """HVPs over fixed ``batches`` that replay the frozen prefix's outputs (see module docstring).

    Args:
        loss_fn (`LossFunction`): the training loss over the parameter selection.
        params (`Params`): the selected parameters.
        batches (`list[Batch]`): the Hessian data, already on the model's device.
        memory_budget (`float`): bytes the kept outputs may take; above it, no replay.
    """

    def __init__(self, loss_fn: LossFunction, params: Params, batches: list[Batch], memory_budget: float):
        self.loss_fn, self.params, self.batches = loss_fn, params, batches
        self.modules = prefix_modules(loss_fn, params, batches[0]) if batches else []
        self.outputs: list[list[list[Any]]] = []  # [batch][module][call]
        self._active: list[list[Any]] | None = None  # outputs of the batch being replayed
        if self.modules:
            self._record(memory_budget)
        if self.outputs and not self._agrees():
            logger.warning("Replaying the frozen layers' outputs did not reproduce a Hessian-vector product; every HVP pass runs the whole model.")
            self.outputs = []

    @property
    def active(self) -> bool:
        """Whether HVP passes replay the prefix."""
        return bool(self.outputs)

    def hvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` over all batches (see :func:`dataset_hvp`), replaying the prefix when active."""
        if not self.active:
            return dataset_hvp(self.loss_fn, self.params, self.batches, vectors)
        with self._replaying():
            return dataset_hvp(self.loss_fn, self.params, self._batches_in_replay(), vectors)

    def _batches_in_replay(self) -> Iterator[Batch]:
        for batch, outputs in zip(self.batches, self.outputs):
            self._active = [list(calls) for calls in outputs]
            yield batch

    def _record(self, memory_budget: float) -> None:
        kept, total = [], 0
        with self._patched(lambda index, original: self._recorder(index, original, kept)), torch.no_grad():
            for batch in self.batches:
                kept.append([[] for _ in self.modules])
                self.loss_fn(self.params, batch)
                total += _nbytes(kept[-1])
                if total > memory_budget:
                    logger.info(f"Frozen-layer outputs exceed the memory budget ({memory_budget / 2**30:.1f} GiB); not replayed.")
                    return
        self.outputs = kept

    def _recorder(self, index: int, original: Callable, kept: list) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            kept[-1][index].append(output)
            return output

        return forward

    def _replayer(self, index: int, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._active[index].pop(0)

        return forward

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[None]:
        try:
            with self._patched(self._replayer):
                yield
        finally:
            self._active = None

    @contextlib.contextmanager
    def _patched(self, make: Callable[[int, Callable], Callable]) -> Iterator[None]:
        """Swap each prefix module's ``forward`` for ``make(index, original)``; restore on exit."""
        originals = [m.__dict__.get("forward") for m in self.modules]
        for index, module in enumerate(self.modules):
            module.forward = make(index, module.forward)
        try:
            yield
        finally:
            for module, original in zip(self.modules, originals):
                if original is None:
                    del module.forward
                else:
                    module.forward = original

    def _agrees(self) -> bool:
        """HVP of the first batch with and without replay (twice) agree to float32 round-off."""
        first = self.batches[0]
        num = self.loss_fn.selection.num_params
        probe = torch.randn(num, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = probe.to(next(iter(self.params.values())).device)
        reference = batch_hvp(self.loss_fn, self.params, first, probe, where="Hessian data batch 0")
        replays = []
        for _ in range(2):
            self._active = [list(calls) for calls in self.outputs[0]]
            try:
                with self._replaying():
                    replays.append(batch_hvp(self.loss_fn, self.params, first, probe))
            except RuntimeError:  # e.g. torch.func refusing an in-place change of a kept output
                return False
        scale = reference.norm().clamp_min(1e-30)
        return all(((r - reference).norm() / scale).item() < 1e-4 for r in replays)
