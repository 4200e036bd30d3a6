"""Find the frozen prefix of the forward pass: the modules that finish before any selected parameter is used, and which
of their outputs are read later (see `hf_influence.engine.prefix.PrefixReplay`, which replays them)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..data import Batch
from .grads import LossFunction, Params


class PrefixModule(NamedTuple):
    """A module of the frozen prefix, and whether its output is read once the selection is in use."""

    module: nn.Module
    read_later: bool  # kept and replayed; otherwise replayed as a shape-only stand-in (no memory)


def prefix_modules(loss_fn: LossFunction, params: Params, batch: Batch) -> list[PrefixModule]:
    """The largest modules whose every call ends before the first call of a module using a selected
    parameter (found by one hooked forward of ``batch``); empty when the selection is used first.

    A module uses the parameters it owns, and those of descendants never called themselves (a PEFT
    ``lora.Embedding`` reads its ``lora_embedding_A`` ``ParameterDict``, which is never called). A second
    forward finds which of the prefix modules' outputs are *read later*: used by any torch operation
    that runs outside the prefix modules (the embeddings feed only layer 0: not read later; the
    layer below the selection is)."""
    model = loss_fn.module.model
    clock, spans = itertools.count(), {}

    def before(module: nn.Module, args: Any) -> None:
        tick = next(clock)
        spans.setdefault(module, [tick, tick])

    def after(module: nn.Module, args: Any, output: Any) -> None:
        spans[module][1] = next(clock)

    with _hooked(model.modules(), before, after), torch.no_grad():
        loss_fn(params, batch)
    first_use = min((_first_call(model, name, spans) for name in loss_fn.selection.names), default=float("inf"))
    if first_use == float("inf"):  # the loss never reached the selection: nothing to gain
        return []
    prefix = {m for m, (_, end) in spans.items() if end < first_use}
    names = {m: name for name, m in model.named_modules() if m in prefix}
    largest = [m for m, name in names.items() if not any(name.startswith(f"{other}.") for other in names.values())]
    read = _read_later(loss_fn, params, batch, largest)
    return [PrefixModule(m, index in read) for index, m in enumerate(largest)]


def _first_call(model: nn.Module, parameter: str, spans: dict) -> float:
    """When the forward first called the innermost called module holding ``parameter`` (``inf``: none was)."""
    path = parameter.rpartition(".")[0]
    while path and model.get_submodule(path) not in spans:
        path = path.rpartition(".")[0]
    module = model.get_submodule(path) if path else model
    return spans[module][0] if module in spans else float("inf")


# what a shape-only stand-in answers like the real tensor: reading these is not reading the data
_METADATA = {"dtype", "shape", "device", "ndim", "layout", "requires_grad", "is_cuda", "is_meta", "is_nested",
             "size", "dim", "numel", "element_size", "is_floating_point", "is_complex", "get_device"}


def _name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)  # a property getter is the descriptor's __get__
    return getattr(owner, "__name__", "") if getattr(func, "__name__", "") == "__get__" else getattr(func, "__name__", "")


class _ReadTracker(TorchFunctionMode):
    """Notes which prefix modules' output tensors a torch operation outside every prefix module uses.

    One tensor can be the output of several prefix modules: a module that returns its input (``nn.Identity``, an
    eval-mode ``nn.Dropout``, e.g. the ``lora_dropout`` of a PEFT LoRA layer) passes on the tensor of the module
    before it. A read marks every module that produced it, so neither is replayed as a stand-in."""

    def __init__(self):
        super().__init__()
        self.produced: dict[int, set[int]] = {}  # id of an output tensor -> indices of the prefix modules returning it
        self.alive: list[Any] = []  # the outputs, so their ids stay unique for the whole forward
        self.depth, self.read = 0, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and _name(func) not in _METADATA:
            for t in tensors_in((args, kwargs)):
                self.read.update(self.produced.get(id(t), ()))
        return func(*args, **kwargs)


def _read_later(loss_fn: LossFunction, params: Params, batch: Batch, modules: list[nn.Module]) -> set[int]:
    tracker, index_of = _ReadTracker(), {m: i for i, m in enumerate(modules)}

    def before(module: nn.Module, args: Any) -> None:
        tracker.depth += 1

    def after(module: nn.Module, args: Any, output: Any) -> None:
        tracker.depth -= 1
        for t in tensors_in(output):
            tracker.produced.setdefault(id(t), set()).add(index_of[module])
        tracker.alive.append(output)

    with _hooked(modules, before, after), torch.no_grad(), tracker:
        loss_fn(params, batch)
    return tracker.read


@contextlib.contextmanager
def _hooked(modules: Iterable[nn.Module], before: Callable, after: Callable) -> Iterator[None]:
    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts (``ModelOutput`` included)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
