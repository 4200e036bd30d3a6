"""`GraphParts`: the parts of a cost estimate measured by running the model (once per batch shape, cached by
`ModelWiring`): the activations of HVP passes and of the forward and backward that take per-example gradients, and the
frozen layers' outputs kept for replay (`engine/hvp_memory.py`, `engine/prefix.py`). Nothing runs on data that fails the
method's own data check; that method then raises it."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from ._utils.errors import HfInfluenceError
from .cost_estimate import MemoryPart
from .data import batch_size_of, longest_rows
from .engine.grads import eval_mode
from .engine.hvp_memory import backward_bytes
from .engine.prefix import kept_bytes


class GraphParts:
    """Mixin of `CostParts` (its ``owner``, ``parts``, ``notes``, ``budget``, ``B``, and the Hessian ``batches`` and
    ``hessian_data`` its ``hessian()`` collated)."""

    def activations(self) -> int:
        """What a batched HVP's graph saves on the largest Hessian batch (measured once: one forward and backward)."""
        if "_activations" not in self.__dict__:
            measured = bool(self.batches) and self.usable(self.hessian_data)
            self._activations = self.owner._hvp_activation_bytes(self.batches) if measured else 0
            if measured:
                self.notes.append("the batched HVPs' activations were measured by one forward and backward of the largest Hessian batch")
        return self._activations

    def replay(self) -> None:
        """The frozen prefix's outputs that fits and the spectrum keep for replay over the Hessian rows (``engine/prefix.py``,
        found on two rows and scaled by the tokens)."""
        if not self.batches or not self.usable(self.hessian_data):
            return
        with eval_mode(self.owner.model):
            kept = kept_bytes(self.owner.train_loss, self.owner._params(), self.batches, self.budget)
        if kept:
            self.parts.append(MemoryPart("the frozen layers' outputs kept for replay over the Hessian rows", "held", kept,
                                         "fewer Hessian rows (hessian_examples)"))

    def usable(self, data: Any) -> bool:
        """Whether ``data`` passes the method's own data check (``ModelWiring.check_data``, remembered), so that a forward
        may measure it; if not, nothing is measured and the method raises that check's error."""
        try:
            self.owner.check_data(data=data)
        except (HfInfluenceError, TypeError, ValueError, KeyError, IndexError):
            return False
        return True

    def longest(self, data: Any, rows: int, hessian: bool = False) -> Any:
        """The ``rows`` longest rows of ``data`` (of its Hessian rows with ``hessian``) as one batch (``data.longest_rows``),
        or ``None`` when they cannot be read or fail the data check (the method says what is wrong)."""
        if not self.usable(data):
            return None
        try:
            return longest_rows(self.owner.hessian_rows(data) if hessian else data, rows, self.owner._pad_id())
        except (HfInfluenceError, TypeError, ValueError, KeyError, IndexError):
            return None

    def backward_graph(self, *scored: Any, hessian: bool = False) -> None:
        """The forward and backward that take per-example gradients (hooks or vmap; projections, norms) on the largest batch
        of the ``scored`` data (``batch_size`` of its longest rows; a DataLoader's own batch size): its activations, measured
        by one forward (``ModelWiring._grad_activation_bytes``), and the backward's gradients (``hvp_memory.backward_bytes``)."""
        sizes = []
        for data in (data for data in scored if data is not None):
            rows = data.batch_size if isinstance(data, DataLoader) and data.batch_size else self.B  # a DataLoader keeps its batches
            batch = self.longest(data, rows, hessian)
            if batch is not None:
                sizes.append((self.owner._grad_activation_bytes(batch), batch_size_of(batch)))
        if sizes:
            activations, rows = max(sizes)
            self.parts.append(MemoryPart(f"the forward and backward of a batch of {rows} rows for their gradients (the longest rows: "
                                         f"activations {activations / 2**20:.2f} MiB, measured, and their gradients)", "working",
                                         backward_bytes(activations), f"a smaller batch_size ({self.B} now)"))
            self.notes.append("the gradients' forward and backward were measured by one forward of the longest rows")
