"""Kronecker-structured random projections of per-example gradients (LoGra, Choe et al. 2024; TRAK, Park et al. 2023).

The map ``Φ`` (``[p̄, P]``) is block diagonal over the selected parameters and never materialised whole:

- a parameter of two or more dimensions, seen as a matrix ``[n_r, n_c]`` (``nn.Linear`` ``[out, in]``, GPT-2's
  ``Conv1D`` ``[in, out]``, ``nn.Embedding`` ``[V, D]``; more dimensions flattened after the first), gets two factors
  ``R_r`` ``[k_r, n_r]`` and ``R_c`` ``[k_c, n_c]``: its features are ``vec(R_r G R_cᵀ) = (R_r ⊗ R_c) vec(G)`` (row-major),
  the first ``p_b`` of the ``k_r × k_c`` grid. A linear layer's per-example gradient is ``G = Σ_t g_t a_tᵀ``, so they
  are ``Σ_t (R_r g_t)(R_c a_t)ᵀ``, taken in the hooked pass without forming ``[B, out, in]``; an embedding's
  are ``Σ_t R_r[:, id_t] (R_c g_t)ᵀ``: the columns of ``R_r`` gathered at the ids (padding ids excluded);
- a vector (bias, LayerNorm weight) gets one dense factor ``R`` ``[p_b, n]`` applied to its ``[B, n]`` gradient.

Widths: every parameter gets one feature (so no parameter's gradient is left out of the estimate; hence ``p̄`` must be
at least the number of selected tensors), the rest of ``p̄`` is split in proportion to ``sqrt(n_b)`` (``n_b`` the
parameter's size), each capped at ``n_b`` (what a capped one leaves is split again over the rest), rounded to
integers by largest remainder; a matrix's grid is the near-square ``k_r × k_c >= p_b`` with ``k_r <= n_r``, ``k_c <= n_c``.

Factors are seeded, with orthonormal rows (QR of a Gaussian, signs fixed, so each is uniformly distributed), hence
``Φ`` has orthonormal rows like the dense random subspace (`hf_influence.engine.scoring.random_subspace`): random
projection's ``(ΦHΦᵀ + λI)⁻¹`` keeps the meaning of ``λ``, and at full width (``p̄ = P``) ``Φ`` is orthogonal and the
scores are exact. Inner products: ``E[Φᵀ W Φ] = I`` with ``W = diag(weights)``, ``n_b / p_b`` on block b's features,
so ``Σ_j w_j φ_j(x) φ_j(y)`` estimates ``xᵀy`` without bias (projected TracIn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from transformers.utils import logging

from ..data import Batch, batch_size_of
from .grads import LossFunction, Params, accumulation_dtype
from .hooks import _accumulate, _hooked_pass
from .projection import project_in_slices

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Block:
    """One parameter's part of ``Φ``: features ``[offset, offset + width)``; ``rows`` ``R_r`` (or the dense ``R``), ``cols`` ``R_c``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    width: int
    rows: torch.Tensor  # [k_r, n_r], or [width, n] for a vector
    cols: torch.Tensor | None  # [k_c, n_c]; None for a vector

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def split_width(sizes: list[int], rank: int) -> list[int]:
    """Features per parameter: one each, the rest ``∝ sqrt(size)``, none above its size; summing to ``rank``
    (``len(sizes) <= rank <= sum(sizes)``)."""
    if not len(sizes) <= rank <= sum(sizes):
        raise ValueError(f"rank {rank} outside [{len(sizes)}, {sum(sizes)}]: at least one feature per parameter, at most its size")
    widths, open_, left = [1] * len(sizes), {b for b in range(len(sizes)) if sizes[b] > 1}, rank - len(sizes)
    while open_:
        total = sum(math.sqrt(sizes[b]) for b in open_)
        capped = [b for b in open_ if 1 + left * math.sqrt(sizes[b]) / total >= sizes[b]]
        if not capped:
            break
        for b in capped:
            widths[b], left = sizes[b], left - sizes[b] + 1
            open_.discard(b)
    if open_:
        total = sum(math.sqrt(sizes[b]) for b in open_)
        shares = {b: left * math.sqrt(sizes[b]) / total for b in open_}
        for b in open_:
            widths[b] += math.floor(shares[b])
        for b in sorted(open_, key=lambda b: (math.floor(shares[b]) - shares[b], b))[: rank - sum(widths)]:
            widths[b] += 1
    return widths


def grid(width: int, n_r: int, n_c: int) -> tuple[int, int]:
    """``(k_r, k_c)``: near-square, ``k_r·k_c >= width``, ``k_r <= n_r``, ``k_c <= n_c`` (``width <= n_r·n_c``)."""
    k_r = min(n_r, math.ceil(math.sqrt(width)))
    k_c = min(n_c, math.ceil(width / k_r))
    return min(n_r, math.ceil(width / k_c)), k_c


def _orthonormal_rows(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, size]`` rows of a uniformly random orthogonal matrix (``count <= size``), fp64."""
    q, r = torch.linalg.qr(torch.randn(size, count, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else None


class KroneckerMap:
    """The implicit ``[p̄, P]`` map (see the module docstring): ``φ = Φ g`` per example, ``Φ X``, ``Y Φ``, rows on demand.

    Args:
        blocks (`list[Block]`): one per selected parameter, in the selection's order.
    """

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks
        self.by_name = {b.name: b for b in blocks}

    @classmethod
    def draw(cls, names: list[str], shapes: list[tuple[int, ...]], rank: int, generator: torch.Generator,
             dtype: torch.dtype = torch.float32) -> "KroneckerMap":
        """A seeded map of ``rank`` features over parameters ``names`` of ``shapes`` (factors drawn in that order)."""
        return cls._build(names, shapes, rank, lambda count, size: _orthonormal_rows(count, size, generator).to(dtype))

    @classmethod
    def from_factors(cls, names: list[str], shapes: list[tuple[int, ...]], rank: int, factors: torch.Tensor) -> "KroneckerMap":
        """The map whose :meth:`factors` are ``factors`` (same names, shapes and rank)."""
        pieces, start = [], 0

        def take(count: int, size: int) -> torch.Tensor:
            nonlocal start
            if start + count * size > factors.numel():
                raise ValueError(f"{factors.numel()} factor values for a map that needs more (rank {rank}, shapes {shapes})")
            pieces.append(factors[start:start + count * size].view(count, size))
            start += count * size
            return pieces[-1]

        kmap = cls._build(names, shapes, rank, take)
        if start != factors.numel():
            raise ValueError(f"{factors.numel()} factor values for a map that holds {start}")
        return kmap

    @classmethod
    def _build(cls, names, shapes, rank, factor) -> "KroneckerMap":
        shapes = [tuple(s) for s in shapes]
        blocks, offset = [], 0
        for name, shape, width in zip(names, shapes, split_width([math.prod(s) for s in shapes], rank)):
            matrix = _matrix_shape(shape)
            if matrix is None:
                rows, cols = factor(width, math.prod(shape)), None
            else:
                k_r, k_c = grid(width, *matrix)
                rows, cols = factor(k_r, matrix[0]), factor(k_c, matrix[1])
            blocks.append(Block(name, shape, offset, width, rows, cols))
            offset += width
        return cls(blocks)

    @property
    def shape(self) -> tuple[int, int]:
        """``(p̄, P)``."""
        return sum(b.width for b in self.blocks), sum(b.numel for b in self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].rows.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].rows.device

    @property
    def weights(self) -> torch.Tensor:
        """``[p̄]``: ``n_b / p_b`` on each feature of block b (``E[Φᵀ diag(weights) Φ] = I``)."""
        return torch.cat([torch.full((b.width,), b.numel / b.width, dtype=torch.float64) for b in self.blocks])

    def to(self, *args, **kwargs) -> "KroneckerMap":
        """The map with its factors moved / cast as ``Tensor.to`` would (itself when nothing changes)."""
        moved = [replace(b, rows=b.rows.to(*args, **kwargs), cols=None if b.cols is None else b.cols.to(*args, **kwargs))
                 for b in self.blocks]
        same = all(m.rows is b.rows and m.cols is b.cols for m, b in zip(moved, self.blocks))
        return self if same else KroneckerMap(moved)

    def factors(self) -> torch.Tensor:
        """Every factor flattened and concatenated (``R_r`` then ``R_c``, block by block): what :meth:`from_factors` reads."""
        parts = [t.reshape(-1) for b in self.blocks for t in (b.rows, b.cols) if t is not None]
        return torch.cat(parts)

    def project_block(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``[B, p_b]``: block ``name``'s features of per-example gradients ``value`` ``[B, *shape]``."""
        b = self.by_name[name]
        if b.cols is None:
            return value.reshape(value.shape[0], -1) @ b.rows.T
        grads = value.reshape(value.shape[0], b.rows.shape[1], b.cols.shape[1])
        return (b.rows @ grads @ b.cols.T).reshape(value.shape[0], -1)[:, :b.width]

    def project_outer(self, name: str, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``[B, p_b]``: features of ``G_b = Σ_t left_t right_tᵀ`` (``left`` ``[B, T, n_r]``, ``right`` ``[B, T, n_c]``), never formed."""
        b = self.by_name[name]
        return torch.bmm((left @ b.rows.T).transpose(1, 2), right @ b.cols.T).reshape(left.shape[0], -1)[:, :b.width]

    def project_lookup(self, name: str, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``[B, p_b]``: an embedding's features, ``G_b = Σ_t e_{id_t} g_tᵀ`` (``ids`` ``[B, T]``, ``g`` ``[B, T, D]``)."""
        b = self.by_name[name]
        gathered = b.rows.T[ids]  # [B, T, k_r]: R_r's columns at the ids
        return torch.bmm(gathered.transpose(1, 2), g @ b.cols.T).reshape(g.shape[0], -1)[:, :b.width]

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, p̄]`` = per-example gradients ``{name: [B, *shape]}`` times ``Φᵀ``."""
        return torch.cat([self.project_block(b.name, grads[b.name]) for b in self.blocks], dim=1)

    def __matmul__(self, columns: torch.Tensor) -> torch.Tensor:
        """``Φ X``: ``[P, c]`` → ``[p̄, c]``."""
        pieces = torch.split(columns.T, [b.numel for b in self.blocks], dim=1)
        return self.project({b.name: p for b, p in zip(self.blocks, pieces)}).T

    def __rmatmul__(self, rows: torch.Tensor) -> torch.Tensor:
        """``Y Φ``: ``[n, p̄]`` → ``[n, P]`` (each block ``R_rᵀ Y_b R_c``)."""
        parts = []
        for b in self.blocks:
            y = rows[:, b.offset:b.offset + b.width]
            if b.cols is None:
                parts.append(y @ b.rows)
                continue
            grid_ = torch.nn.functional.pad(y, (0, b.rows.shape[0] * b.cols.shape[0] - b.width))
            parts.append((b.rows.T @ grid_.view(-1, b.rows.shape[0], b.cols.shape[0]) @ b.cols).reshape(rows.shape[0], -1))
        return torch.cat(parts, dim=1)

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``Φ`` as a dense ``[stop - start, P]`` matrix."""
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)[start:stop]
        return eye @ self


class KroneckerProjections:
    """Sink of the hooked pass (``hooks._accumulate``): ``total`` ``[B, p̄]`` built module by module, with no
    per-example gradient of a matrix parameter formed (``outer``, ``lookup``); a vector's ``[B, n]`` is projected."""

    def __init__(self, kmap: KroneckerMap, size: int, dtype: torch.dtype, device: torch.device):
        self.kmap = kmap
        self.total = torch.zeros((size, kmap.shape[0]), dtype=dtype, device=device)

    def _add(self, name: str, features: torch.Tensor) -> None:
        block = self.kmap.by_name[name]
        self.total[:, block.offset:block.offset + block.width] += features

    def put(self, name: str, value: torch.Tensor) -> None:
        self._add(name, self.kmap.project_block(name, value))

    def outer(self, name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        self._add(name, self.kmap.project_outer(name, left, right))

    def lookup(self, name: str, ids: torch.Tensor, g: torch.Tensor, padding_idx: int | None) -> None:
        if padding_idx is not None:
            g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
        self._add(name, self.kmap.project_lookup(name, ids, g))


def hook_kronecker(loss_fn: LossFunction, batch: Batch, plan: dict, kmap: KroneckerMap) -> torch.Tensor:
    """``[B, p̄]``: ``Φ ∇L_b`` of each example from one forward and backward (see :class:`KroneckerProjections`); fp32
    (fp64 for fp64 models)."""
    calls, out_grads, dtype = _hooked_pass(loss_fn, batch, plan)
    sink = KroneckerProjections(kmap.to(dtype), batch_size_of(batch), dtype, kmap.device)
    for (module, inputs, _), out_grad in zip(calls, out_grads):
        if out_grad is not None:
            _accumulate(module, plan[module], inputs, out_grad.to(dtype), sink)
    return sink.total


def project_kronecker(loss_fn: LossFunction, params: Params, batch: Batch, kmap: KroneckerMap, chunk_size: int | None = None) -> torch.Tensor:
    """``[B, p̄]`` = per-example gradients times ``Φᵀ``: from the hooked pass once hooks passed their first-use check,
    else from per-example gradients (vmap) of at most ``chunk_size`` examples at a time, block by block (the rule of
    `hf_influence.engine.projection.project_in_slices`)."""
    dtype = accumulation_dtype(params)
    return project_in_slices(loss_fn, params, batch, lambda grads: kmap.to(dtype).project({n: g.to(dtype) for n, g in grads.items()}),
                             lambda plan: hook_kronecker(loss_fn, batch, plan, kmap), chunk_size)
