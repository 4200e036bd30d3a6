"""The curvature side of `Influence`: eigenbasis fits (Arnoldi / block Krylov on the Hessian, the empirical
Fisher), the spectrum estimate, the explicit Hessian, LiSSA's s_test, and the one basis reuse rule."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from transformers.utils import logging

from ._utils.errors import IncompatibleBasisError, InvalidInputError
from .config import Algorithm, BasisConfig, Curvature, Keep, implicit_iterations
from .cost_estimate import costed
from .data import RandomBatches, batch_size_of, dataset_of, to_device
from .engine.grads import accumulation_dtype, eval_mode
from .engine.hvp import batch_hvp, explicit_hessian
from .engine.hvp_memory import budgeted
from .engine.ihvp.arnoldi import ArnoldiBasis
from .engine.ihvp.block import fit_eigenpairs
from .engine.ihvp.fisher import fisher_eigenpairs, fisher_product, held_bytes
from .engine.ihvp.lissa import LissaConfig, LissaInverse, LissaResult, choose_lissa_config
from .engine.prefix import PrefixReplay
from .engine.spectrum import (Spectrum, check_spectrum_request, hutchinson_trace, hutchpp_trace, krylov_iteration, power_iteration,
                              ritz_extremes, trace_blocks)
from .params import weights_version
from .wiring import ModelWiring, refuses_autocast

logger = logging.get_logger(__name__)


class ResolvedLissa(NamedTuple):
    """The `LissaConfig` a ``lissa=`` request stands for, and the `Spectrum` it was chosen from (``"auto"`` only)."""

    config: LissaConfig
    spectrum: Spectrum | None


class CurvatureMethods(ModelWiring):
    """`Influence`'s curvature methods (see the module docstring); scores are in `hf_influence.influence`."""

    @refuses_autocast
    @costed("fit_arnoldi")
    def fit_arnoldi(self, hessian_data: Any, rank: int = BasisConfig.rank, iterations: int = BasisConfig.iterations, seed: int | None = None,
                    algorithm: str = BasisConfig.algorithm, tol: float = BasisConfig.tol, keep: str = BasisConfig.keep,
                    data_parallel: bool = False, block_size: int | None = BasisConfig.block_size) -> ArnoldiBasis:
        """Fit the top-``rank`` eigenpairs (largest |λ|, or λ) of the Hessian of the mean loss over ``hessian_data`` from
        at most about ``iterations`` Hessian-vector products (Schioppa et al. 2022); the Ritz residuals ``‖Hu - λu‖`` are
        logged, and the products run are the basis's ``iterations``.

        Args:
            algorithm (`str`, defaults to `"arnoldi"`): ``"arnoldi"`` (one HVP per pass over the Hessian data:
                ``iterations`` passes in sequence) or ``"block"`` (block Krylov: ``b`` HVPs per pass, ``iterations / b``
                passes; ``b`` is chosen from ``memory_budget_gb`` and two timed passes, and logged).
            tol (`float`, defaults to `1e-3`): stop before ``iterations`` once every kept pair's residual is
                ``<= tol × |λ_max|`` (0: run them all); the settings of `hf_influence.config.BasisConfig`.
            keep (`str`, defaults to `"magnitude"`): keep the pairs of largest |λ| or (``"largest"``) of largest λ.
            block_size (`int`, *optional*): ``algorithm="block"`` only: the block width ``b`` (capped by ``memory_budget_gb``,
                logged), so fits of the same data choose the same blocks whatever the timings; ``None`` chooses it.
            data_parallel (`bool`, defaults to `False`): every process calls this with the same ``hessian_data``
                (torch.distributed initialised); each takes every ``world_size``-th Hessian batch, the products are
                summed over processes, and all return the same basis. With one process it is the plain fit.
        """
        config = BasisConfig(rank, iterations, Curvature.HESSIAN.value, algorithm, tol, keep, block_size)
        if rank > self.selection.num_params:
            raise InvalidInputError(f"rank={rank} exceeds the {self.selection.num_params} selected parameters: lower rank.")
        self.check_data(**{"Hessian data": hessian_data})
        batches = self._materialize(hessian_data)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        params = self._params()
        like = torch.empty((), dtype=accumulation_dtype(params), device=self._device())
        activations = self._hvp_activation_bytes(batches) if config.algorithm == Algorithm.BLOCK else None
        with eval_mode(self.model):
            hvp = PrefixReplay(self.train_loss, params, batches, self.memory_budget, across_processes=data_parallel).hvp
            pairs, products = fit_eigenpairs(hvp, self.selection.num_params, rank, iterations, Algorithm(config.algorithm), generator, like,
                                             self.memory_budget, across_processes=data_parallel, progress=self.progress,
                                             tol=config.tol, keep=Keep(config.keep), activation_bytes=activations,
                                             block_size=config.block_size)
        return self._basis(pairs.eigenvalues, pairs.eigenvectors, products, "hessian", config.keep)

    @costed("fit_basis")
    def fit_basis(self, hessian_data: Any, rank: int = BasisConfig.rank, iterations: int = BasisConfig.iterations,
                  curvature: str = BasisConfig.curvature, algorithm: str = BasisConfig.algorithm, tol: float = BasisConfig.tol,
                  keep: str = BasisConfig.keep, data_parallel: bool = False, block_size: int | None = BasisConfig.block_size) -> ArnoldiBasis:
        """:meth:`fit_arnoldi` (``curvature="hessian"``, with ``algorithm``, ``tol``, ``keep`` and ``block_size``) or :meth:`fit_fisher`
        (``"fisher"``; ``iterations``, ``algorithm``, ``keep`` and ``block_size`` unused); the settings of `hf_influence.config.BasisConfig`,
        checked there. ``data_parallel=True``: every process calls this with the same data and gets the same basis."""
        config = BasisConfig(rank, iterations, curvature, algorithm, tol, keep, block_size)
        if config.curvature == Curvature.FISHER:
            return self.fit_fisher(hessian_data, rank=config.rank, data_parallel=data_parallel)
        return self.fit_arnoldi(hessian_data, rank=config.rank, iterations=config.iterations, algorithm=config.algorithm,
                                tol=config.tol, keep=config.keep, data_parallel=data_parallel, block_size=config.block_size)

    @refuses_autocast
    @costed("fit_fisher")
    def fit_fisher(self, hessian_data: Any, rank: int = BasisConfig.rank, data_parallel: bool = False) -> ArnoldiBasis:
        """Fit the top-``rank`` eigenpairs of the empirical Fisher ``F = mean_z g_z g_zᵀ`` over ``hessian_data``.

        ``F`` is the Gauss-Newton-type curvature that K-FAC / EK-FAC approximate: positive
        semi-definite, of rank at most the number of examples. Its eigenpairs are exact, from one pass
        of per-example gradients and an SVD, with no HVP passes, so the fit costs about as much as
        scoring the Hessian data once. The basis is used like :meth:`fit_arnoldi`'s (``method="arnoldi"``).
        The per-example gradients are held at once when they and the SVD's copies (``3 × examples × P`` floats) fit
        ``memory_budget_gb``; otherwise the
        eigenpairs come from block Krylov on Fisher products ``F V``, one gradient pass per block, nothing held
        (Krylov accuracy: all ``max(2 × rank, rank + 20)`` products, with no convergence stop, since ``tol``'s scale |λ_max|
        would leave the small kept eigenvalues accurate only to ``tol × λ_max``; residuals logged; ``iterations`` on the
        basis counts the products).
        ``data_parallel=True``: every process calls this with the same data, computes the gradients of its share of
        the batches, and gets the same basis as one process would.
        """
        if rank < 1 or rank > self.selection.num_params:
            raise InvalidInputError(f"rank must be in [1, {self.selection.num_params}] (number of parameters), got {rank}.")
        self.check_data(**{"Hessian data": hessian_data})
        batches = self._materialize(hessian_data, self.batch_size)  # [B, P] gradients: batch_size rows
        count, num = sum(batch_size_of(b) for b in batches), self.selection.num_params
        if rank > count:
            raise InvalidInputError(f"rank={rank} exceeds the {count} Hessian examples, the largest rank the empirical Fisher "
                                    "can have: lower rank or pass more Hessian data.")
        dtype = accumulation_dtype(self._params())
        size = held_bytes(count, num, torch.finfo(dtype).bits // 8)
        grad_fn = self._grad_fn(self.train_loss)
        with eval_mode(self.model):
            if size <= self.memory_budget:
                eigenvalues, eigenvectors = fisher_eigenpairs(grad_fn, batches, rank, data_parallel, self.progress)
                return self._basis(eigenvalues, eigenvectors, 0, "fisher")
            iterations = implicit_iterations(rank)
            logger.info(f"fit_fisher: {count} × {num:,} per-example gradients (held for the SVD: {size / 2**30:.2f} GiB) exceed memory_budget_gb="
                        f"{self.memory_budget / 2**30:g}; fitting by block Krylov on Fisher products instead ({iterations} products, "
                        "each block one gradient pass, no gradients held).")
            operator = functools.partial(fisher_product, grad_fn, batches, across_processes=data_parallel)
            pairs, products = fit_eigenpairs(operator, num, rank, iterations, Algorithm.BLOCK, torch.Generator().manual_seed(self.seed),
                                             torch.empty((), dtype=dtype, device=self._device()), self.memory_budget, data_parallel, self.progress)
        return self._basis(pairs.eigenvalues, pairs.eigenvectors, products, "fisher")

    @refuses_autocast
    @costed("spectrum")
    def spectrum(
        self,
        hessian_data: Any,
        method: str = "lanczos",
        iterations: int = 30,
        trace_estimator: str = "hutch++",
        trace_matvecs: int = 30,
        data_parallel: bool = False,
    ) -> Spectrum:
        """Estimate ``λ_max`` (and with Lanczos ``λ_min``) and ``tr(H)`` from HVPs, with error bars.

        Args:
            method (`str`, defaults to `"lanczos"`): ``"lanczos"`` (also gives the bottom of the
                spectrum, i.e. the damping that makes ``H + λI`` positive definite) or ``"power"``.
            iterations (`int`, defaults to `30`): Lanczos steps / maximum power iterations.
            trace_estimator (`str`, defaults to `"hutch++"`): ``"hutch++"`` or ``"hutchinson"``.
            trace_matvecs (`int`, defaults to `30`): HVPs spent on the trace, in blocks (Hutch++: three blocks of a
                third; Hutchinson: one block), each block one pass over the Hessian data.
            data_parallel (`bool`, defaults to `False`): every process calls this with the same data; each takes its
                share of the Hessian batches and the products are summed, so all get the same estimate.
            The estimate runs over the ``hessian_examples`` rows every Hessian pass uses.
        """
        check_spectrum_request(method, trace_estimator)
        self.check_data(**{"Hessian data": hessian_data})
        batches = self._materialize(hessian_data)
        params = self._params()
        dtype, device, num = accumulation_dtype(params), self._device(), self.selection.num_params
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randn(num, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        with eval_mode(self.model):
            hvp = PrefixReplay(self.train_loss, params, batches, self.memory_budget, across_processes=data_parallel).hvp
            if method == "lanczos":
                _, hessenberg = krylov_iteration(hvp, start, iterations, self.progress, desc="Lanczos")
                top, top_err, bottom, bottom_err = ritz_extremes(hessenberg)
                extremes, hvps = {"lambda_min": bottom, "lambda_min_error": bottom_err}, hessenberg.shape[1]
            else:
                top, top_err, hvps = power_iteration(hvp, start, iterations)
                extremes = {}
            estimator = hutchpp_trace if trace_estimator == "hutch++" else hutchinson_trace
            held = trace_blocks(trace_estimator, trace_matvecs)[1] * num * dtype.itemsize
            probes = budgeted(hvp, num, dtype.itemsize, self._hvp_activation_bytes(batches), self.memory_budget - held, "Trace probes")
            trace, stderr = estimator(probes, num, trace_matvecs, generator, dtype, device)
        return Spectrum(top, top_err, trace, stderr, hvps + trace_matvecs, **extremes)

    @refuses_autocast
    @costed("exact_hessian")
    def exact_hessian(self, hessian_data: Any) -> torch.Tensor:
        """The explicit ``[P, P]`` Hessian of the mean loss (small parameter sets only)."""
        self.check_data(**{"Hessian data": hessian_data})
        with eval_mode(self.model):
            return explicit_hessian(self.train_loss, self._params(), self._materialize(hessian_data), progress=self.progress)

    @refuses_autocast
    @costed("s_test")
    def s_test(self, test_data: Any, hessian_data: Any, lissa: str | LissaConfig = "auto") -> torch.Tensor:
        """``(H + λI)^-1 ∇L(z_test)`` by LiSSA for each test example: ``[n_test, P]`` (``named_parameters()`` order).

        ``lissa`` is a `LissaConfig`, ``"auto"`` (settings from :meth:`spectrum`, see
        ``choose_lissa_config``), ``"fastif"`` or ``"koh_liang"`` (the papers' settings at this
        ``Influence``'s damping). :meth:`solve_s_test` also returns the solver's record.
        """
        return self.solve_s_test(test_data, hessian_data, lissa).solution.T

    @refuses_autocast
    @costed("solve_s_test")
    def solve_s_test(self, test_data: Any, hessian_data: Any, lissa: str | LissaConfig | ResolvedLissa = "auto") -> LissaResult:
        """:meth:`s_test` with the solver's record: ``solution`` ``[P, n_test]``, ``hvps`` (minibatch HVPs, all
        processes), the `LissaConfig` it ended with (a divergence restart raises ``scale``) and the norms."""
        self.check_data(**{"test data": test_data, "Hessian data": hessian_data})
        precondition = self._lissa(hessian_data, lissa)
        test_grads = self.gradients(test_data, test_side=True)
        with eval_mode(self.model):
            precondition(test_grads)
        return precondition.last_result

    def resolve_lissa(self, hessian_data: Any, lissa: str | LissaConfig | ResolvedLissa = "auto") -> ResolvedLissa:
        """The `LissaConfig` that ``lissa`` stands for (itself, or the papers' presets at this damping, or
        ``"auto"``: chosen from :meth:`spectrum` of the Hessian rows), with that spectrum.

        Resolve once and pass the result to several :meth:`s_test` calls to pay for the spectrum once.
        """
        if isinstance(lissa, ResolvedLissa):
            return lissa
        if isinstance(lissa, LissaConfig):
            return ResolvedLissa(lissa, None)
        if lissa == "auto":
            spectrum = self.spectrum(hessian_data)
            num_examples = len(dataset_of(self.hessian_rows(hessian_data)))
            return ResolvedLissa(choose_lissa_config(spectrum, self.damping, num_examples, seed=self.seed), spectrum)
        if lissa in ("fastif", "koh_liang"):
            return ResolvedLissa(getattr(LissaConfig, lissa)(damping=self.damping, seed=self.seed), None)
        raise InvalidInputError(f"lissa must be a LissaConfig, 'auto', 'fastif' or 'koh_liang'; got {lissa!r}.")

    def _lissa(self, hessian_data: Any, lissa: str | LissaConfig | ResolvedLissa) -> LissaInverse:
        config = self.resolve_lissa(hessian_data, lissa).config
        stream = RandomBatches(self.hessian_rows(hessian_data), config.batch_size, self._pad_id())
        damping = self.damping if config.damping is None else config.damping
        params, device = self._params(), self._device()

        def sample_hvp(vectors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            with eval_mode(self.model):
                return batch_hvp(self.train_loss, params, to_device(stream.sample(generator), device), vectors, where="a LiSSA minibatch")

        return LissaInverse(sample_hvp, config, damping, self.progress)

    def _fit_default_basis(self, hessian_data: Any, rank: int) -> ArnoldiBasis:
        iterations = implicit_iterations(rank)
        logger.info(f"No basis given: fitting Arnoldi (rank={rank}, iterations={iterations}) on the Hessian data.")
        return self.fit_arnoldi(hessian_data, rank=rank, iterations=iterations)

    def _basis(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, iterations: int, curvature: str,
               keep: str = BasisConfig.keep) -> ArnoldiBasis:
        description = self.selection.describe()
        return ArnoldiBasis(
            eigenvalues.cpu(), eigenvectors.cpu(), description["names"], description["shapes"], iterations,
            self.selection.fingerprint(self.model), type(self.model).__name__, curvature, keep,
        )

    def basis_mismatches(self, basis: ArnoldiBasis, rank: int | None = None, curvature: str | None = None,
                         keep: str | None = None) -> list[str]:
        """Why ``basis`` cannot serve this model and selection (and the requested ``rank`` / ``curvature`` / ``keep``, when
        given); empty when it can. The model check hashes the selected weights, so it runs once per basis and
        weights version (`hf_influence.params.weights_version`): again only after a weight changed."""
        version = weights_version(self._params().items())
        if self._verified_bases.get(id(basis), (None, None))[1] != version:
            described = self.selection.describe()
            problems = basis.mismatches(described["names"], described["shapes"], self.selection.fingerprint(self.model),
                                        type(self.model).__name__)
            if problems:
                return problems + basis.request_mismatches(rank, curvature, keep)
            self._verified_bases[id(basis)] = (basis, version)  # the basis kept alive, so its id is not reused
        return basis.request_mismatches(rank, curvature, keep)

    def check_basis(self, basis: ArnoldiBasis, rank: int | None = None, curvature: str | None = None, keep: str | None = None) -> None:
        """Raise `IncompatibleBasisError` unless ``basis`` can serve this model (see :meth:`basis_mismatches`)."""
        problems = self.basis_mismatches(basis, rank, curvature, keep)
        if problems:
            raise IncompatibleBasisError(
                "This eigenbasis was fitted for a different model or request: " + "; ".join(problems) + ". Fit a new basis "
                "with Influence.fit_basis(...) on this model, or load the model the basis was fitted on."
            )
