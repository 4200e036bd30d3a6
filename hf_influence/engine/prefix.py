"""Run the frozen prefix of the forward pass once per Hessian batch, not once per HVP.

Every pass over the Hessian data (an Arnoldi or Lanczos step, a trace probe) runs the model on the
same batches in eval mode. The modules that finish before any selected parameter is used (the
embeddings and the layers below the selection) compute the same outputs on every pass: the
selection cannot reach them. :class:`PrefixReplay` runs them once per batch and replays their
outputs on later passes, so an HVP pass costs only the part of the model the selection touches:
with the last layer of a 12-layer encoder selected, that skips 11 layers' forward work. Only the
outputs read past the prefix are kept (the hidden states entering the selection); the others (the
embeddings feeding layer 0, ...) are replayed as shape-only stand-ins that hold no memory.

The replay is checked before use: the HVP of one batch with and without it must agree (twice, so an
in-place change of a kept output shows) and replaying must not raise; if not, or if the kept outputs
would exceed the memory budget, every pass runs the whole model as before. The prefix is found by
`hf_influence.engine.frozen_prefix`.

Data-parallel (``across_processes=True``): each process keeps and replays only its share of the
batches (every ``world_size``-th), and the products are summed over processes (see
:func:`hvp.dataset_hvp`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from transformers.utils import logging

from .._utils import comm
from ..data import Batch, batch_size_of, batch_tokens, slice_batch, to_device
from .frozen_prefix import prefix_modules, tensors_in
from .grads import LossFunction, Params
from .hvp import batch_hvp, dataset_hvp

logger = logging.get_logger(__name__)
_PROBE_ROWS = 2  # rows of the first batch that find the prefix and check the replay


def _stand_in(value: Any) -> Any:
    """``value`` with every tensor replaced by a zero-strided one of the same shape, dtype and device."""
    if isinstance(value, torch.Tensor):
        return torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
    if isinstance(value, dict):
        return type(value)(**{k: _stand_in(v) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_stand_in(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_stand_in(v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    """Bytes of the distinct storages in ``value`` (a stand-in holds one element; a passed-on tensor counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors_in(value)}
    return sum(storages.values())


def kept_bytes(loss_fn: LossFunction, params: Params, batches: list[Batch], memory_budget: float) -> int:
    """About what :class:`PrefixReplay` keeps over ``batches`` (collated anywhere): the outputs it would keep for the
    first batch's probe rows (the prefix found as it finds it), scaled by every batch's tokens; 0 when there is no prefix
    or it would not be kept within ``memory_budget``. Costs three forwards of the probe rows, no pass."""
    if not batches:
        return 0
    probe = to_device(slice_batch(batches[0], 0, _PROBE_ROWS), next(iter(params.values())).device)
    found = [p.module for p in prefix_modules(loss_fn, params, probe) if p.read_later]
    kept: list[Any] = []
    handles = [module.register_forward_hook(lambda module, args, output: kept.append(output)) for module in found]
    try:
        with torch.no_grad():
            loss_fn(params, probe)
    finally:
        for handle in handles:
            handle.remove()
    total = _nbytes(kept) * sum(batch_tokens(batch) for batch in batches) // batch_tokens(probe)
    return total if total <= memory_budget else 0


class PrefixReplay:
    """HVPs over fixed ``batches`` that replay the frozen prefix's outputs (see module docstring).

    Args:
        loss_fn (`LossFunction`): the training loss over the parameter selection.
        params (`Params`): the selected parameters.
        batches (`list[Batch]`): the Hessian data, already on the model's device.
        memory_budget (`float`): bytes the kept outputs may take; above it, no replay.
        across_processes (`bool`, defaults to `False`): every process holds the same ``batches`` and
            calls :meth:`hvp` in step; each works on its share and the products are summed.
    """

    def __init__(self, loss_fn: LossFunction, params: Params, batches: list[Batch], memory_budget: float,
                 across_processes: bool = False):
        self.across_processes = across_processes
        if across_processes:
            comm.check_same_everywhere([batch_size_of(b) for b in batches], "Hessian data (examples per batch)")
            batches = comm.local_share(batches)
        self.loss_fn, self.params, self.batches = loss_fn, params, batches
        probe = slice_batch(batches[0], 0, _PROBE_ROWS) if batches else None  # the checks need the model's structure, not the data
        found = prefix_modules(loss_fn, params, probe) if batches else []
        self.modules = [p.module for p in found]
        self.read_later = [p.read_later for p in found]
        self.outputs: list[list[list[Any]]] = []  # [batch][module][call]
        self._active: list[list[Any]] | None = None  # outputs of the batch being replayed
        if self.modules:
            self.outputs = self._recorded(self.batches, memory_budget)
        elif batches:
            logger.info("No frozen prefix to replay: a selected parameter is used by the model's first module (e.g. the "
                        "embeddings or a LoRA adapter on them); every HVP pass runs the whole model.")
        problem = self._disagreement(probe) if self.outputs else None
        if problem:
            logger.warning(f"Replaying the frozen layers' outputs {problem}; every HVP pass runs the whole model.")
            self.outputs = []
        if self.outputs:
            logger.info(f"Replaying the frozen prefix ({self._describe()}) in every HVP pass: "
                        f"{sum(_nbytes(o) for o in self.outputs) / 2**20:.1f} MiB kept over {len(self.outputs)} batches.")

    @property
    def active(self) -> bool:
        """Whether HVP passes replay the prefix."""
        return bool(self.outputs)

    def hvp(self, vectors: torch.Tensor, per_backward: int | None = None) -> torch.Tensor:
        """``H V`` ``[P, k]`` over all batches (see :func:`dataset_hvp`), replaying the prefix when active.

        A block of k columns shares each batch's forward and first backward (see :func:`batch_hvp`), in batched
        backwards of at most ``per_backward`` columns."""
        if not self.active:
            return dataset_hvp(self.loss_fn, self.params, self.batches, vectors, self.across_processes, per_backward)
        with self._replaying():
            return dataset_hvp(self.loss_fn, self.params, self._batches_in_replay(), vectors, self.across_processes, per_backward)

    def _batches_in_replay(self) -> Iterator[Batch]:
        for batch, outputs in zip(self.batches, self.outputs):
            self._active = [list(calls) for calls in outputs]
            yield batch

    def _recorded(self, batches: list[Batch], memory_budget: float) -> list[list[list[Any]]]:
        """The kept prefix outputs of each batch (``[batch][module][call]``); empty when they exceed ``memory_budget``."""
        kept, total = [], 0
        with self._patched(lambda index, original: self._recorder(index, original, kept)), torch.no_grad():
            for batch in batches:
                kept.append([[] for _ in self.modules])
                self.loss_fn(self.params, batch)
                total += _nbytes(kept[-1])
                if total > memory_budget:
                    logger.info(f"Frozen-layer outputs exceed the memory budget ({memory_budget / 2**30:.1f} GiB): not replayed, every "
                                "HVP pass runs the whole model (raise memory_budget_gb to replay them).")
                    return []
        return kept

    def _recorder(self, index: int, original: Callable, kept: list) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            kept[-1][index].append(output if self.read_later[index] else _stand_in(output))
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

    def _describe(self) -> str:
        names = {m: name for name, m in self.loss_fn.module.model.named_modules()}
        kept = sum(self.read_later)
        return f"{len(self.modules)} modules, {names[self.modules[0]]} to {names[self.modules[-1]]}, {kept} with outputs kept"

    def _disagreement(self, probe: Batch) -> str | None:
        """Why the HVP of ``probe`` (a few rows) replaying its recorded prefix outputs (twice) differs from the HVP
        without replay beyond float32 round-off; ``None`` when they agree."""
        num = self.loss_fn.selection.num_params
        vector = torch.randn(num, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        vector = vector.to(next(iter(self.params.values())).device)
        reference = batch_hvp(self.loss_fn, self.params, probe, vector, where="Hessian data batch 0")
        recorded = self._recorded([probe], float("inf"))[0]
        replays = []
        for _ in range(2):
            self._active = [list(calls) for calls in recorded]
            try:
                with self._replaying():
                    replays.append(batch_hvp(self.loss_fn, self.params, probe, vector))
            except RuntimeError as err:  # e.g. torch.func refusing an in-place change of a kept output
                return f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        scale = reference.norm().clamp_min(1e-30)
        error = max(((r - reference).norm() / scale).item() for r in replays)
        return None if error < 1e-4 else f"changed a Hessian-vector product (relative difference {error:.1e} on the check rows)"
