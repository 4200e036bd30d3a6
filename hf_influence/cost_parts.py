"""`CostParts`: the figures of one cost estimate (memory held at once by part, passes, products, notes), each from the
rule the code that runs applies (see `hf_influence.cost`, which builds one per public method)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._utils.errors import HfInfluenceError
from .config import Algorithm, Method, RandomProjection, implicit_iterations
from .cost_estimate import CostEstimate, MemoryPart
from .cost_graphs import GraphParts
from .data import batch_size_of
from .engine.grads import HOOK_CHECK_ROWS, accumulation_dtype, hooks_by_default
from .engine.hooks import hook_plan
from .engine.hvp import EXPLICIT_CHUNK
from .engine.hvp_memory import pass_bytes, vectors_per_backward
from .engine.ihvp.block import ORTHOGONALISATION_BLOCKS, block_steps, candidate_widths, fixed_width, krylov_bytes, step_bytes, timing_widths
from .engine.ihvp.lissa import LissaConfig
from .engine.projection import choose_projection, embedding_tables, grads_chunk_size
from .engine.spectrum import check_spectrum_request, trace_blocks
from .engine.subspace_hessian import subspace_rows_per_pass

FEWER_ROWS = "fewer rows per call (split the data, or run `hf-influence score`, which streams shards)"
SMALLER_GRAPH = "a smaller hessian_batch_size or batch_size (fewer tokens per Hessian batch)"


class CostParts(GraphParts):
    """Collects the parts of one estimate: memory held at once, passes, notes (the parts measured by running a forward
    are `GraphParts`')."""

    def __init__(self, owner: Any, action: str):
        self.owner, self.action = owner, action
        self.P, self.budget, self.B = owner.selection.num_params, owner.memory_budget, owner.batch_size
        self.d = torch.finfo(accumulation_dtype(owner._params())).bits // 8
        self.parts: list[MemoryPart] = []
        self.spare = 0  # bytes the parts hold beyond the least the call needs (block fits at width 1)
        self.fields: dict[str, Any] = {"passes": 0, "products": 0, "batch_hvps": 0, "lissa_hvps": 0}
        self.notes: list[str] = []
        self.largest = self.B  # rows in the largest Hessian batch
        self.batches: list = []  # the Hessian batches, collated on the CPU
        self.hessian_data: Any = None  # the data they came from

    def hold(self, what: str, kind: str, rows: float, way_out: str) -> None:
        """``rows`` vectors of P values held at once."""
        self.parts.append(MemoryPart(what, kind, int(rows * self.P * self.d), way_out))

    def hessian(self, data: Any, batch_size: int | None = None) -> None:
        """The Hessian rows and batches every pass runs over: the facade's own batches (collated on the CPU, nothing run
        or moved to the device)."""
        try:
            batches = self.owner._hessian_batches(data, batch_size)
        except (HfInfluenceError, TypeError, ValueError, KeyError, IndexError):  # the method's data check says what is wrong
            return
        self.fields.update(hessian_rows=sum(batch_size_of(b) for b in batches), hessian_batches=len(batches))
        self.largest = max(batch_size_of(b) for b in batches)
        self.batches, self.hessian_data = batches, data

    def hvp_pass(self, vectors: int, left: float, what: str, graph: bool = True, least: int = 0) -> int:
        """A pass of batched HVPs on ``vectors`` vectors within ``left`` bytes (`engine/hvp_memory.py`: fewer per batched
        backward when all do not fit), or ``least`` bytes if more (what the step holds after the pass); ``graph=False``
        for Fisher products (P-sized buffers only). Returns its bytes."""
        activations = self.activations() if graph else 0
        chunk = vectors_per_backward(vectors, self.P, self.d, activations, left)
        nbytes = max(pass_bytes(vectors, self.P, self.d, activations, chunk), least)
        per = "" if chunk == vectors else f", {chunk} per batched backward"
        graph_part = f", the graph of the largest Hessian batch ({activations / 2**20:.2f} MiB) once and per vector" if graph else ""
        self.parts.append(MemoryPart(f"{what}: a pass of {vectors} vector{'s' * (vectors > 1)}{per}{graph_part}", "working", nbytes,
                                     SMALLER_GRAPH if graph else ""))
        return nbytes

    def passes(self, passes: int, products: int) -> None:
        self.fields["passes"] += passes
        self.fields["products"] += products
        if self.fields.get("hessian_batches") is not None:
            self.fields["batch_hvps"] += passes * self.fields["hessian_batches"]

    def basis(self, rank: int, what: str = "basis") -> None:
        self.fields["rank"] = rank
        self.hold(f"{what} [{rank}, P]", "basis", rank, "a lower rank")

    def gradients(self, rows: int, how: str) -> None:
        """Per-example gradients ``[rows, P]`` formed per batch (``how`` says how they are taken)."""
        self.fields["grads"] = how
        self.hold(f"per-example gradients [{rows}, P] per batch", "grads", rows, f"a smaller batch_size ({self.B} now)")

    def krylov(self, iterations: int, algorithm: Algorithm, operator: str = "HVP", way_out: str = "fewer iterations",
               block_size: int | None = None) -> None:
        """A Krylov fit of ``iterations`` steps; block widths, passes and their memory follow the block planner's rules."""
        self.fields["operator"] = operator
        if operator == "HVP":
            self.replay()
        if algorithm is Algorithm.ARNOLDI:
            self.passes(iterations, iterations)
            self.hold(f"Krylov vectors [{iterations + 1}, P]", "krylov", iterations + 1, way_out)
            self.hvp_pass(1, self.budget, f"Arnoldi {operator}s", graph=operator == "HVP")
            return
        graph = operator == "HVP"
        activations = self.activations() if graph else 0
        if block_size is not None:
            width = fixed_width(block_size, self.P, iterations, self.d, self.budget, activations, log=False)
            widths, timed = [width], ()
        else:
            widths = candidate_widths(self.P, iterations, self.d, self.budget, activations)
            timed = timing_widths(widths)
        steps = {w: block_steps(iterations, w) for w in widths}
        width = min(widths, key=lambda w: (steps[w], w))  # the planner's choice when a pass costs the same at any width
        self.passes(len(timed) + steps[width], sum(timed) + width * steps[width])
        self.hold(f"block Krylov vectors [{(steps[width] + 1) * width}, P]", "krylov", (steps[width] + 1) * width, way_out)
        left = self.budget - krylov_bytes(width, iterations, self.P, self.d)
        held = self.hvp_pass(width, left, f"block Krylov {operator}s (or after it the orthogonalisation's [P, {width}] blocks)", graph,
                             least=ORTHOGONALISATION_BLOCKS * width * self.P * self.d)
        least = krylov_bytes(1, iterations, self.P, self.d) + step_bytes(1, self.P, self.d, activations)
        self.spare += max(0, krylov_bytes(width, iterations, self.P, self.d) + held - least)
        if len(widths) > 1:
            self.notes.append(f"block width chosen at run time by {len(timed)} timed passes: {steps[width]} passes of {width} vectors "
                              f"(the memory above) if a pass costs the same at any width, up to {iterations} passes of 1")

    def fit(self, data: Any, rank: int, iterations: int, algorithm: Algorithm, block_size: int | None = None) -> None:
        self.hessian(data)
        self.basis(rank)
        self.krylov(iterations, algorithm, block_size=block_size)

    def exact(self, decomposed: bool) -> None:
        self.passes(math.ceil(self.P / EXPLICIT_CHUNK), self.P)
        self.hold("explicit Hessian [P, P]", "hessian", self.P, "method='arnoldi' or 'lissa' (no P × P matrix)")
        copies = max(3 * self.d, 16) if decomposed else 3 * self.d  # columns, concatenation, symmetrisation; fp64 copy, eigenvectors
        self.hold("its working copies (forming" + (" and decomposing it)" if decomposed else " it)"), "working", self.P * copies / self.d, "")

    def spectrum(self, method: str = "lanczos", iterations: int = 30, trace_estimator: str = "hutch++", trace_matvecs: int = 30) -> None:
        """Lanczos (or power iteration) one vector per pass, then the trace probes in blocks (``spectrum.trace_blocks``),
        one after the other: the larger of the two is counted."""
        check_spectrum_request(method, trace_estimator)
        self.replay()
        self.passes(iterations, iterations)
        if method == "power":
            self.notes.append(f"power iteration: at most {iterations} passes")
        blocks, held = trace_blocks(trace_estimator, trace_matvecs)
        for block in blocks:
            self.passes(1, block)
        rows, what = (iterations + 1, f"Lanczos vectors [{iterations + 1}, P]") if method == "lanczos" else (3, "power iterates [3, P]")
        one = pass_bytes(1, self.P, self.d, self.activations())
        if held > rows:  # the two phases run one after the other
            self.hold(f"trace probes and products [{held}, P]", "krylov", held, "fewer trace_matvecs")
            self.hvp_pass(max(blocks), self.budget - held * self.P * self.d, "trace probes")
        else:
            self.hold(what, "krylov", rows, "fewer iterations")
            self.parts.append(MemoryPart(f"{'Lanczos' if method == 'lanczos' else 'power iteration'}: a pass of 1 vector, the graph "
                                         "of the largest Hessian batch once and per vector", "working", one, SMALLER_GRAPH))

    def lissa(self, data: Any, lissa: Any, columns: int | None, solves: int | None) -> None:
        """LiSSA solves with ``columns`` right-hand sides each (the spectrum first for ``"auto"``)."""
        config = getattr(lissa, "config", lissa)  # a ResolvedLissa carries its LissaConfig
        if isinstance(lissa, str) and lissa in ("fastif", "koh_liang"):
            config = getattr(LissaConfig, lissa)(damping=self.owner.damping, seed=self.owner.seed)
        if isinstance(lissa, str) and lissa == "auto":
            self.hessian(data)
            self.spectrum()
            self.notes.append("LiSSA's depth, repeats and minibatch are chosen from the spectrum at run time: not counted")
        if not isinstance(config, LissaConfig) or columns is None or solves is None:
            return
        repeats = config.max_repeats or config.repeats
        hvps = config.steps * repeats * sum(4**attempt for attempt in range(config.restarts + 1)) * solves
        if config.tolerance is not None or repeats != config.repeats or config.restarts:
            self.notes.append("LiSSA: at most (early stop, adaptive repeats or restarts may stop sooner)")
        self.fields.update(lissa_hvps=hvps, lissa_rows=config.batch_size)
        fewer = f"fewer rows per call ({columns} right-hand sides)"
        self.hold(f"LiSSA iterates [5 × {columns}, P]", "working", 5 * columns, fewer)
        rows = self.longest(data, config.batch_size, hessian=True)  # the largest minibatch LiSSA can draw
        activations = 0 if rows is None else self.owner._hvp_activation_bytes([rows])
        self.parts.append(MemoryPart(f"LiSSA minibatch HVPs: a pass of {columns} vector{'s' * (columns > 1)}, the graph of its "
                                     f"{config.batch_size} longest Hessian rows ({activations / 2**20:.2f} MiB) once and per vector",
                                     "working", pass_bytes(columns, self.P, self.d, activations), f"{fewer}, or a smaller LiSSA batch_size"))

    def hooks_check(self, then: str) -> None:
        """The only per-example gradients formed where hooks take the rest: the first-use check's (``grads.decide_hooks``)."""
        self.gradients(2 * min(self.B, HOOK_CHECK_ROWS), f"hooks' and vmap's for {HOOK_CHECK_ROWS} rows of the first batch (the "
                                                         f"hooks check); {then}")

    def projection(self, rank: int) -> str:
        """Projected features of ``rank`` directions: the path the engine takes (returned), and what it holds."""
        mode = self.owner.projection
        mode = choose_projection(self.P, rank, self.B, self.budget) if mode == "auto" else mode
        if mode == "jvp":
            self.fields["grads"] = f"none formed: forward-mode JVPs along the {rank} directions"
        else:  # the engine's rules: vmap gradients in chunks within the budget; hooks copy the embedding tables where they fit
            plan = hook_plan(self.owner.train_loss, self.owner._params())
            if plan is not None and hooks_by_default(self.owner._dtype()):  # the engine's rule: project_in_slices
                self.hooks_check("then projected module by module in the hooked pass")
            else:
                chunk = grads_chunk_size(self.P, self.B, self.budget)
                self.gradients(chunk, f"projected {chunk} examples at a time (vmap)")
            tables = sum(embedding_tables(plan).values()) if plan is not None else 0
            if 0 < rank * tables * self.d <= self.budget:
                self.hold(f"the embedding tables' transposed copy [{rank}, {tables:,}] (hooks)", "working", rank * tables / self.P, "")
                self.spare += rank * tables * self.d
        return mode

    def kronecker_subspace(self, rank: int) -> None:
        """The Kronecker map's subspace Hessian: map rows materialised a block at a time, each block one pass of batched
        HVPs whose graph (measured on the largest Hessian batch) is held once and again per row (``kronecker.py``)."""
        activations = self.activations()
        step = subspace_rows_per_pass(rank, self.P, self.d, self.budget, activations)
        one, two = (pass_bytes(rows, self.P, self.d, activations) for rows in (1, 2))
        self.passes(math.ceil(rank / step), rank)
        self.parts.append(MemoryPart(f"batched HVP graph (activations {activations / 2**20:.2f} MiB saved on the largest Hessian batch, "
                                     "measured) and first-order gradients", "working", 2 * one - two, SMALLER_GRAPH))
        self.parts.append(MemoryPart(f"{step} Kronecker map rows per pass: their batched backward and [P, {step}] buffers", "working",
                                     step * (two - one), "a lower rank"))
        self.spare += (step - 1) * (two - one)  # the pass takes fewer rows at a time within a smaller budget
        self.fields["grads"] = "none formed: Kronecker maps applied to hooked gradient pieces"

    def method_parts(self, method: Method, train: Any, hessian_data: Any, basis: Any, lissa: Any, rank: int,
                     columns: int | None, solves: int | None, norms: bool = False, test: Any = None) -> None:
        """The cost of ``Influence._method_parts`` (the preconditioner and the training side's features; ``test``: the test
        rows whose features are taken too)."""
        hessian_data = train if hessian_data is None else hessian_data
        if method is Method.ARNOLDI:
            if basis is None:
                self.fit(hessian_data, rank, implicit_iterations(rank), Algorithm.ARNOLDI)
            else:
                self.basis(basis.rank)
            if self.projection(self.fields["rank"]) != "jvp":
                self.backward_graph(train, test)
        elif method is Method.RANDPROJ:
            self.hessian(hessian_data)
            self.fields["rank"] = rank
            if self.owner.config.random_projection == RandomProjection.KRONECKER:
                self.kronecker_subspace(rank)
                self.backward_graph(train, test)  # the map is applied to hooked gradient pieces
                return
            self.basis(rank, "random subspace")
            self.passes(1, rank)
            self.hvp_pass(rank, self.budget - rank * self.P * self.d, "the random subspace's Hessian products")
            if self.projection(rank) != "jvp":
                self.backward_graph(train, test)
        else:
            if method is Method.TRACIN and norms and hooks_by_default(self.owner._dtype()):
                self.hooks_check("then hooks, where they apply, take norms without [B, P]")
            else:
                self.gradients(self.B, "formed")
            self.backward_graph(train, test)
        if method is Method.EXACT:
            self.hessian(hessian_data)
            self.exact(decomposed=True)
        if method is Method.LISSA:
            self.lissa(hessian_data, lissa, columns, solves)

    def done(self) -> CostEstimate:
        return CostEstimate(self.action, self.P, self.d, self.B, self.budget, tuple(self.parts), spare_bytes=self.spare,
                            notes=tuple(self.notes), **self.fields)
