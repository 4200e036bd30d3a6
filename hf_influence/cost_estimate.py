"""`CostEstimate`: what one call will hold in memory and how many passes it will make, as one log line, and its
refusal when it cannot fit the memory budget (built by `hf_influence.cost`); :func:`costed` applies both to a method."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

from transformers.utils import logging

from ._utils.errors import MemoryBudgetError

logger = logging.get_logger(__name__)
GIB = 2**30


class MemoryPart(NamedTuple):
    """One large tensor (or group) a call holds at once."""

    what: str  # e.g. "basis [10, P]"
    kind: str  # basis, krylov, grads (per batch), held (all rows), hessian, working, scores
    nbytes: int
    way_out: str  # the setting that shrinks it ("" when only the selection or the budget does)


@dataclass(frozen=True)
class CostEstimate:
    """The estimated cost of one call of an `Influence` method (``Influence.estimate_cost``). Nothing is run to make it.

    Attributes:
        action (`str`): the method estimated.
        num_params (`int`): P, the selected parameters.
        dtype_bytes (`int`): bytes per value of gradients, bases and products (4: fp32; 8 for fp64 models).
        batch_size (`int`): examples per batch of per-example gradients.
        budget_bytes (`float`): ``memory_budget_gb`` in bytes.
        memory (`tuple[MemoryPart, ...]`): what the call holds at once; :attr:`peak_bytes` is their sum.
        spare_bytes (`int`): how much of that the call could do without (a block fit that picks narrower blocks);
            the call is refused when :attr:`required_bytes` (peak minus spare) exceeds the budget.
        rank (`int`, *optional*): eigenpairs / directions of the basis involved.
        grads (`str`): how per-example gradients are taken (formed ``[B, P]`` per batch, projected by hooks, none).
        hessian_rows, hessian_batches (`int`, *optional*): the Hessian rows every pass runs over, and their batches.
        passes (`int`): passes over the Hessian rows (each one ``operator`` per batch, on one or a block of vectors).
        products (`int`): Hessian-vector (or Fisher) products over all passes, counted per vector.
        batch_hvps (`int`): HVP calls on one Hessian batch (``passes × hessian_batches``; Fisher products: 0 HVPs).
        lissa_hvps (`int`): LiSSA minibatch HVP calls (each on ``lissa_rows`` rows), an upper bound when noted.
        operator (`str`): ``"HVP"`` or ``"Fisher product"``.
        notes (`tuple[str, ...]`): what the figures assume or leave out.
    """

    action: str
    num_params: int
    dtype_bytes: int
    batch_size: int
    budget_bytes: float
    memory: tuple[MemoryPart, ...] = ()
    spare_bytes: int = 0
    rank: int | None = None
    grads: str = "none formed"
    hessian_rows: int | None = None
    hessian_batches: int | None = None
    passes: int = 0
    products: int = 0
    batch_hvps: int = 0
    lissa_hvps: int = 0
    lissa_rows: int | None = None
    operator: str = "HVP"
    notes: tuple[str, ...] = ()

    def _bytes(self, kind: str) -> int:
        return sum(part.nbytes for part in self.memory if part.kind == kind)

    @property
    def basis_bytes(self) -> int:
        """The basis (rank × P) or random subspace the call holds."""
        return self._bytes("basis")

    @property
    def grad_batch_bytes(self) -> int:
        """Per-example gradients ``[B, P]`` formed per batch (0 when the path never forms them)."""
        return self._bytes("grads")

    @property
    def hessian_bytes(self) -> int:
        """The explicit ``[P, P]`` Hessian, when the call forms it."""
        return self._bytes("hessian")

    @property
    def peak_bytes(self) -> int:
        return sum(part.nbytes for part in self.memory)

    @property
    def required_bytes(self) -> int:
        return self.peak_bytes - self.spare_bytes

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.budget_bytes

    def __str__(self) -> str:
        text = [f"{self.action}: {_count(self.num_params)} parameters selected"]
        if self.basis_bytes:
            text.append(f"basis {_size(self.basis_bytes)} (rank {self.rank})")
        if self.passes:
            what = "passes" if self.operator == "HVP" else f"passes of {self.operator}s"
            rows = "" if self.hessian_rows is None else f" over {self.hessian_rows:,} Hessian rows"
            calls = ("" if self.hessian_batches is None or self.operator != "HVP" else
                     f"{self.hessian_batches:,} batches: {self.batch_hvps:,} batch HVPs, ")
            text.append(f"{self.passes:,} {what}{rows} ({calls}{self.products:,} products)")
        if self.lissa_hvps:
            text.append(f"LiSSA {self.lissa_hvps:,} minibatch HVPs of {self.lissa_rows} row{'s' * (self.lissa_rows != 1)}")
        if self.grad_batch_bytes:
            text.append(f"per-example gradients {_size(self.grad_batch_bytes)} per batch of {self.batch_size} ({self.grads})")
        else:
            text.append(f"per-example gradients: {self.grads}")
        text[-1] += f"; peak ≈ {_size(self.peak_bytes)}, budget {self.budget_bytes / GIB:g} GiB"
        return ", ".join(text) + "".join(f"; {note}" for note in self.notes)

    def check(self) -> None:
        """Raise `MemoryBudgetError` (what does not fit, the figures, the ways out) unless the call fits the budget."""
        if self.fits:
            return
        parts = sorted(self.memory, key=lambda part: -part.nbytes)
        held = ", ".join(f"{part.what} {_size(part.nbytes)}" for part in parts if part.nbytes)
        ways = list(dict.fromkeys(part.way_out for part in parts if part.way_out and part.nbytes > 0.05 * self.required_bytes))
        ways.append(f"select fewer parameters (P = {self.num_params:,} now) with last_n_layers=k or params=[regexes]")
        ways.append(f"raise memory_budget_gb to {_round_up(self.required_bytes / GIB):g} or more, if the machine has that memory")
        raise MemoryBudgetError(
            f"{self.action} would hold about {_size(self.required_bytes)} at once, over memory_budget_gb="
            f"{self.budget_bytes / GIB:g} ({held}). Nothing was run. Ways out: " + "; ".join(ways) + ".", self)


def _size(nbytes: float) -> str:
    if nbytes >= 100 * GIB:
        return f"{nbytes / GIB:,.0f} GiB"
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= 0.01 * GIB else f"{nbytes / 2**20:.2f} MiB"


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits."""
    step = 10 ** (math.floor(math.log10(value)) - 1)
    return round(math.ceil(value / step) * step, 12)


def _count(number: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= scale:
            return f"{number / scale:.1f}{suffix}"
    return str(number)


def costed(action: str):
    """Before the method runs: its ``estimate_cost(action, ...)`` logged at INFO, and checked (the outermost call only:
    a call made inside another was counted by the outer one)."""

    def decorate(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if getattr(self, "_estimated", False):
                return method(self, *args, **kwargs)
            cost = self.estimate_cost(action, *args, **kwargs)
            logger.info(str(cost))
            cost.check()
            self._estimated = True
            try:
                return method(self, *args, **kwargs)
            finally:
                self._estimated = False

        return run

    return decorate
