"""Squared per-example gradient norms (TracIn self-influence) from one hooked pass, never forming ``[B, P]``.

A linear map's per-example weight gradient is ``Gᵀ A`` (``A`` ``[T, in]`` its inputs, ``G`` ``[T, out]`` its output
gradients, one example), and its squared norm needs only the two ``T × T`` Gram matrices:

    ‖Gᵀ A‖² = Σ_{t,s} (g_t · g_s)(a_t · a_s) = sum((G Gᵀ) ∘ (A Aᵀ))

(the "ghost norm" of Goodfellow 2015, used for DP-SGD by Li et al. 2022), and a bias adds
``‖Σ_t g_t‖² = sum(G Gᵀ)`` from the same Gram. **The rule**, per call of a ``Linear`` / ``Conv1D``: take the Grams
when they and their product cost fewer multiply-adds than forming and squaring the gradient,
``T²·(out + 1 + in/k) < (T + 1)·in·out`` (:func:`grams_cheaper`), where ``k`` is the number of selected calls reading
the same input tensor (BERT's query, key and value share one input Gram); else form ``Gᵀ A`` with one ``bmm`` and
square it. On the tiny BERT of ``benchmarks/throughput.py`` (64 tokens, width 128) every linear call takes the Grams.
Embeddings are the same identity with one-hot inputs, ``Σ_{t,s: id_t = id_s} g_t · g_s`` (``Σ_t ‖g_t‖²`` when no
row repeats an id, as position ids), unless the table has no more rows than the sequence has tokens, where the dense
per-example gradient ``[B, rows, D]`` is smaller than ``G`` and is formed from one-hot rows and squared instead.
Layer and RMS norms go through :func:`~.hooks._accumulate` (their per-example gradients are ``[B, D]``).

A parameter reached by several calls (GPT-2's tied ``wte`` / ``lm_head``, T5's shared embedding) is summed over
its calls before the norm, so its per-example gradient is formed. Products are accumulated in fp32 (fp64 for
fp64 models), as the precision rule says (``engine/grads.accumulation_dtype``).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..data import Batch, batch_size_of
from .hooks import _accumulate, _hooked_pass

if TYPE_CHECKING:
    from .grads import LossFunction


def hook_squared_norms(loss_fn: LossFunction, batch: Batch, plan: dict[nn.Module, dict[str, str]]) -> torch.Tensor:
    """``[B]``: each example's squared gradient norm over the selection (TracIn self-influence), from one forward
    and backward, without forming the ``[B, P]`` per-example gradients (see the module docstring)."""
    calls, out_grads, dtype = _hooked_pass(loss_fn, batch, plan)
    reached = [(module, inputs, g.to(dtype)) for (module, inputs, _), g in zip(calls, out_grads) if g is not None]
    counts = Counter(name for module, _, _ in reached for name in plan[module].values())
    shapes = dict(zip(loss_fn.selection.names, loss_fn.selection.shapes))
    sink = SquaredNorms(counts, shapes, batch_size_of(batch), dtype, reached[0][2].device if reached else None)
    grams = InputGrams(reached, plan, counts)
    for module, inputs, g in reached:
        roles = plan[module]
        if grams.chosen(module, inputs):
            sink.add(grams.ghost_norm(module, inputs, g.reshape(g.shape[0], -1, g.shape[-1]), "bias" in roles))
        else:
            _accumulate(module, roles, inputs, g, sink)
    return sink.result()


def grams_cheaper(steps: int, d_in: int, d_out: int, readers: int) -> bool:
    """The rule: the Grams and their product (``T²·(out + 1)`` plus a ``1/k`` share of ``T²·in``) cost fewer
    multiply-adds than forming and squaring ``Gᵀ A`` (``(T + 1)·in·out``)."""
    return steps * steps * (d_out + 1 + d_in / readers) < (steps + 1) * d_in * d_out


def _linear_sizes(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a ``Linear`` (weight ``[out, in]``) or GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    rows, cols = module.weight.shape
    return (rows, cols) if isinstance(module, Conv1D) else (cols, rows)


class InputGrams:
    """Which linear calls take the Gram route (the rule in the module docstring), and their input Grams
    ``A Aᵀ`` ``[B, T, T]``, each computed once per input tensor."""

    def __init__(self, reached: list, plan: dict[nn.Module, dict[str, str]], counts: Counter):
        eligible = [(m, a) for m, a, _ in reached if type(m) in (nn.Linear, Conv1D) and "weight" in plan[m]
                    and all(counts[n] == 1 for n in plan[m].values())]
        readers = Counter(self._key(a) for _, a in eligible)
        self.calls = set()
        for module, inputs in eligible:
            steps = inputs[0].numel() // inputs.shape[-1]  # T (a 2-D input is one token per example)
            d_in, d_out = _linear_sizes(module)
            if grams_cheaper(steps, d_in, d_out, readers[self._key(inputs)]):
                self.calls.add((id(module), self._key(inputs)))
        self.grams: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(inputs: torch.Tensor) -> tuple:
        return inputs.data_ptr(), tuple(inputs.shape), inputs.stride()

    def chosen(self, module: nn.Module, inputs: torch.Tensor) -> bool:
        return (id(module), self._key(inputs)) in self.calls

    def ghost_norm(self, module: nn.Module, inputs: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
        """``[B]``: ``sum((G Gᵀ) ∘ (A Aᵀ))`` (plus ``sum(G Gᵀ)`` for the bias) from ``g`` ``[B, T, out]``."""
        key = self._key(inputs)
        if key not in self.grams:
            a = inputs.to(g.dtype).reshape(g.shape[0], -1, inputs.shape[-1])  # [B, T, in]
            self.grams[key] = torch.bmm(a, a.transpose(1, 2))
        a_gram, g_gram = self.grams[key], torch.bmm(g, g.transpose(1, 2))  # [B, T, T] each
        weight = torch.linalg.vecdot(g_gram.reshape(g.shape[0], -1), a_gram.reshape(g.shape[0], -1))
        return weight + g_gram.sum(dim=(1, 2)) if bias else weight


class SquaredNorms:
    """``‖∇L_b‖²`` per example, for the parameters :class:`InputGrams` does not take: a parameter reached by one
    call adds the squared norm of its per-example gradient (an embedding's from the token pairs that share an id);
    one reached by several calls is summed over its calls first (the ``put`` / ``lookup`` sink of ``_accumulate``)."""

    def __init__(self, calls_per_name: Counter, shapes: dict[str, tuple], size: int, dtype: torch.dtype, device: torch.device):
        self.calls_per_name, self.shapes, self.pending = calls_per_name, shapes, {}
        self.total = torch.zeros(size, dtype=dtype, device=device)

    def add(self, squared: torch.Tensor) -> None:
        self.total += squared

    def put(self, name: str, value: torch.Tensor) -> None:
        if self.calls_per_name[name] == 1:
            flat = value.reshape(value.shape[0], -1)
            self.total += torch.linalg.vecdot(flat, flat)
        else:
            self.pending[name] = value if name not in self.pending else self.pending[name] + value

    def lookup(self, name: str, ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None) -> None:
        if padding_idx is not None:
            g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
        rows, single = self.shapes[name][0], self.calls_per_name[name] == 1
        if single and rows > ids.shape[1]:
            if bool((ids.sort(dim=1).values.diff(dim=1) != 0).all()):  # no id twice in a row (positions): Σ_t ‖g_t‖²
                self.add(torch.linalg.vecdot(g.flatten(1), g.flatten(1)))
            else:  # Σ_{t,s: id_t = id_s} g_t · g_s
                self.add((torch.bmm(g, g.transpose(1, 2)) * (ids.unsqueeze(2) == ids.unsqueeze(1))).sum(dim=(1, 2)))
            return
        if single:  # a small table (token types): its per-example gradient by one-hot rows, [B, rows, D]
            self.put(name, torch.bmm(F.one_hot(ids, rows).to(g.dtype).transpose(1, 2), g))
            return
        dense = torch.zeros((g.shape[0], *self.shapes[name]), dtype=g.dtype, device=g.device)
        dense.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
        self.put(name, dense)

    def result(self) -> torch.Tensor:
        for value in self.pending.values():
            flat = value.reshape(value.shape[0], -1)
            self.total += torch.linalg.vecdot(flat, flat)
        self.pending.clear()
        return self.total
