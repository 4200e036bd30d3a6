"""LiSSA (Agarwal et al. 2017; Koh & Liang 2017): stochastic Neumann series for ``(H + λI)^-1 v``.

Recursion: ``h_j = v + (I - (H_Bj + λI)/s) h_{j-1}``, ``h_0 = v``, result ``h_J / s``, averaged over
T independent repeats; ``H_Bj`` is the Hessian of the mean loss on a fresh random minibatch.
Repeats are seeded by their index and spread over processes (``_utils.comm``), so any number of
processes gives the same result as one. Settings can be chosen from the Hessian spectrum
(Klochkov & Liu, "Revisiting inverse Hessian vector products for calculating influence functions"):
see :func:`choose_lissa_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..._utils import comm
from ..._utils.errors import InvalidInputError, LissaDivergenceError
from ..spectrum import Spectrum
from ...config import check_damping

logger = logging.get_logger(__name__)
SampleHVP = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (V [P,k], generator) -> H_B V


def fastif_damping(damp: float, scale: float) -> float:
    """FastIF / Koh & Liang write ``h_j = v + (1 - damp) h - H h / scale``; that is our additive
    ``λ = damp · scale``."""
    return check_damping(damp * scale)


@dataclass
class LissaConfig:
    """Settings of the LiSSA recursion (FastIF's (damp, scale) pair: use :func:`fastif_damping`).

    Args:
        scale (`float`, defaults to `10.0`): s; must exceed ``λ_max(H_B) + λ`` of every minibatch.
        steps (`int`, defaults to `1000`): J, recursion depth; ~ ``s/λ_min(H+λI) · ln(1/ε)`` to converge.
        repeats (`int`, defaults to `1`): T, independent runs averaged (a round, when adaptive).
        batch_size (`int`, defaults to `8`): B, examples per Hessian minibatch.
        damping (`float`, *optional*): additive λ; ``None`` takes the ``Influence`` damping.
        seed (`int`, defaults to `0`): repeat i samples with seed ``(seed, i)``.
        tolerance (`float`, *optional*): stop a repeat early once ``‖h_j - h_{j-1}‖ / ‖h_j‖`` falls below it.
        max_repeats (`int`, *optional*): if above ``repeats``, add rounds of ``repeats`` runs until the
            relative standard error of the mean is under ``variance_tolerance`` or this many ran.
        variance_tolerance (`float`, defaults to `0.05`): target relative standard error across repeats.
        restarts (`int`, defaults to `0`): on divergence, retry this many times with 4x scale and steps.
        divergence_factor (`float`, defaults to `10.0`): a convergent run keeps ``‖h_j‖ <= (j+1)‖v‖``;
            beyond ``divergence_factor`` times that the run is stopped.
    """

    scale: float = field(default=10.0, metadata={"help": "s > λ_max + λ"})
    steps: int = field(default=1000, metadata={"help": "recursion depth J"})
    repeats: int = field(default=1, metadata={"help": "independent repeats T (per round when adaptive)"})
    batch_size: int = field(default=8, metadata={"help": "Hessian minibatch size B"})
    damping: float | None = field(default=None, metadata={"help": "additive λ (None: the Influence damping)"})
    seed: int = field(default=0, metadata={"help": "seed; repeat i uses (seed, i)"})
    tolerance: float | None = field(default=None, metadata={"help": "early-stop relative change"})
    max_repeats: int | None = field(default=None, metadata={"help": "adaptive repeats up to this many"})
    variance_tolerance: float = field(default=0.05, metadata={"help": "target relative standard error"})
    restarts: int = field(default=0, metadata={"help": "retries with 4x scale on divergence"})
    divergence_factor: float = field(default=10.0, metadata={"help": "norm growth that counts as divergence"})

    def __post_init__(self):
        if not self.scale > 0:
            raise InvalidInputError(f"LissaConfig.scale must be > 0 (and above λ_max + λ), got {self.scale}.")
        for name in ("steps", "repeats", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"LissaConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.damping is not None:
            check_damping(self.damping)
        if self.max_repeats is not None and self.max_repeats < self.repeats:
            raise InvalidInputError(f"LissaConfig.max_repeats ({self.max_repeats}) must be >= repeats ({self.repeats}).")
        if self.restarts < 0:
            raise InvalidInputError(f"LissaConfig.restarts must be >= 0, got {self.restarts}.")

    @classmethod
    def koh_liang(cls, damping: float | None = 0.0, **overrides) -> "LissaConfig":
        """Koh & Liang (2017) released defaults: scale 10, recursion depth 10,000, one repeat."""
        return cls(**{"scale": 10.0, "steps": 10_000, "repeats": 1, "batch_size": 8, "damping": damping, **overrides})

    @classmethod
    def fastif(cls, damping: float | None = fastif_damping(5e-3, 1e4), **overrides) -> "LissaConfig":
        """FastIF (Guo et al. 2021): Hessian batches of 1, scale 1e4, damp 5e-3 (λ = 50), 1,000 steps, repeats
        meant to be spread over processes (8 here)."""
        return cls(**{"scale": 1e4, "steps": 1000, "repeats": 8, "batch_size": 1, "damping": damping, **overrides})


def choose_lissa_config(
    spectrum: Spectrum, damping: float, num_examples: int, target_error: float = 0.05, min_batch: int = 64, seed: int = 0
) -> LissaConfig:
    """LiSSA settings from the Hessian spectrum, each with its reason logged.

    - batch ``B = min(N, max(tr(H)/λ_max, min_batch))``: below ``tr(H)/λ_max`` minibatch curvature
      noise dominates (Klochkov & Liu). Beyond that, B and the repeats T trade evenly (the variance
      goes as 1/(B·T), the cost as B·T) except through the scale margin below, which shrinks slowly
      with B; ``min_batch`` keeps that margin moderate (≈1.5) without paying for huge batches;
    - scale ``s = m · λ_max + λ``: the recursion contracts only when ``s > λ_max(H_B) + λ``. A
      minibatch Hessian overshoots ``λ_max(H)`` by ~``λ_max·sqrt(tr(H)/(λ_max·B))`` (matrix
      concentration), so ``m = 1.1 + 2·sqrt(tr(H)/(λ_max·B))`` (at most 2); with the full batch only
      the estimate's own error is left: ``m = 1.05`` plus the Ritz residual;
    - steps ``J = s / μ_min · ln(1/ε)`` with ``μ_min = λ_min + λ``: the slowest mode decays as ``(1 - μ_min/s)^J``;
      ``ε = 0.05`` leaves a relative error that keeps Pearson with the exact s_test above 0.99;
    - repeats: 1 with the full batch (no sampling noise); else rounds of 2 until the relative standard
      error of the mean is under 0.1, at most 16;
    - early stop when the iterate's relative change is under ``ε · μ_min / s``.
    """
    damping = check_damping(damping)
    floor = spectrum.lambda_min if spectrum.lambda_min is not None else 0.0
    mu_min = floor + damping
    if mu_min <= 0:
        raise InvalidInputError(
            f"H + λI is not positive definite (λ_min = {floor:.4g}, damping = {damping}): LiSSA cannot converge. "
            f"Use damping > {-floor:.4g}, or the Arnoldi / exact methods."
        )
    batch = int(min(num_examples, max(math.ceil(spectrum.effective_rank), min_batch)))
    full_batch = batch == num_examples
    if full_batch:
        margin = 1.05 + spectrum.lambda_max_error / max(spectrum.lambda_max, 1e-30)
    else:
        margin = min(2.0, 1.1 + 2 * math.sqrt(spectrum.effective_rank / batch))
    scale = margin * spectrum.lambda_max + damping
    steps = int(min(1_000_000, max(10, math.ceil(scale / mu_min * math.log(1 / target_error)))))
    config = LissaConfig(
        scale=scale, steps=steps, repeats=1 if full_batch else 2, batch_size=batch, damping=damping, seed=seed,
        tolerance=target_error * mu_min / scale, max_repeats=None if full_batch else 16,
        variance_tolerance=0.1, restarts=1,
    )
    logger.info(
        f"LiSSA auto settings from {spectrum}: batch_size={batch} (max(tr(H)/λ_max = {spectrum.effective_rank:.1f}, "
        f"{min_batch}), capped at N={num_examples}), scale={scale:.4g} (= {margin:.3g}·λ_max + λ), steps={steps} "
        f"(condition (λ_max+λ)/(λ_min+λ) = {(spectrum.lambda_max + damping) / mu_min:.1f}, target error {target_error}), "
        f"repeats={'1 (full batch: no sampling noise)' if full_batch else '2 per round up to 16, until rel. std. error < 0.1'}."
    )
    return config


@dataclass
class LissaResult:
    """``solution`` ``[P, k]`` ≈ ``(H + λI)^-1 V``; ``norms`` ``[T, J]``: max column ``‖h_j‖/‖v‖``
    (zero after an early stop); ``hvps``: minibatch HVP calls (each on k columns), all processes."""

    solution: torch.Tensor
    norms: torch.Tensor
    hvps: int
    config: LissaConfig


def lissa_solve(sample_hvp: SampleHVP, vectors: torch.Tensor, config: LissaConfig, damping: float, progress: bool = True) -> LissaResult:
    """Run LiSSA on the columns of ``vectors`` (``[P, k]``) at once, restarting on divergence if allowed.

    ``sample_hvp(V, generator)`` returns ``H_B V`` for a minibatch B drawn with ``generator``.
    Raises `LissaDivergenceError` (naming ``scale``) on NaN/Inf or norm growth.
    """
    damping = check_damping(damping)
    for attempt in range(config.restarts + 1):
        try:
            return _solve_rounds(sample_hvp, vectors, config, damping, progress)
        except LissaDivergenceError as err:
            if attempt == config.restarts:
                raise
            config = dataclasses.replace(config, scale=4 * config.scale, steps=4 * config.steps)
            logger.warning(f"{err} Restarting with scale={config.scale:.4g}, steps={config.steps}.")
    raise AssertionError("unreachable")


def _solve_rounds(sample_hvp: SampleHVP, vectors: torch.Tensor, config: LissaConfig, damping: float, progress: bool) -> LissaResult:
    """Rounds of ``config.repeats`` repeats, split over processes, until the variance target is met."""
    total, squares = torch.zeros_like(vectors), torch.zeros(vectors.shape[1], dtype=torch.float64, device=vectors.device)
    limit = config.max_repeats or config.repeats
    norms = torch.zeros(limit, config.steps)
    done = hvps = 0
    bar = tqdm(total=limit * config.steps, desc="LiSSA", disable=not progress or comm.rank() != 0)
    while done < limit:
        indices = range(done, min(done + config.repeats, limit))
        round_total, round_squares, round_hvps = _run_round(sample_hvp, vectors, config, damping, indices, norms, bar)
        total += comm.all_reduce_sum(round_total)
        squares += comm.all_reduce_sum(round_squares)
        hvps += int(comm.all_reduce_sum(torch.tensor([round_hvps], dtype=torch.float64))[0])
        done = indices.stop
        if _relative_stderr(total, squares, done) <= config.variance_tolerance:
            break
    bar.close()
    comm.all_reduce_sum(norms)
    return LissaResult(total / done, norms[:done], hvps, config)


def _run_round(sample_hvp, vectors, config, damping, indices, norms, bar) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This process's share of one round; divergence anywhere stops every process."""
    round_total = torch.zeros_like(vectors)
    round_squares = torch.zeros(vectors.shape[1], dtype=torch.float64, device=vectors.device)
    hvps, error = 0, None
    for index in indices:
        if index % comm.world_size() != comm.rank():
            continue
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        try:
            solution, steps = _one_repeat(sample_hvp, vectors, config, damping, generator, norms[index], bar)
        except LissaDivergenceError as err:
            error = err
            break
        round_total += solution
        round_squares += solution.double().pow(2).sum(dim=0)
        hvps += steps
    failed = comm.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))
    if error is not None:
        raise error
    if failed[0] > 0:
        raise LissaDivergenceError(f"LiSSA diverged on another process (scale={config.scale}, damping={damping}). Increase LissaConfig.scale.")
    return round_total, round_squares, hvps


def _one_repeat(sample_hvp, vectors, config, damping, generator, norm_trace, bar) -> tuple[torch.Tensor, int]:
    v_norm = vectors.norm(dim=0).clamp_min(torch.finfo(vectors.dtype).tiny)  # [k]
    h = vectors.clone()
    for step in range(config.steps):
        update = vectors - (sample_hvp(h, generator) + damping * h) / config.scale
        h = h + update
        ratio = h.norm(dim=0) / v_norm  # [k]
        norm_trace[step] = float(ratio.max())
        _check_divergence(ratio, step, config, damping)
        bar.update(1)
        if config.tolerance is not None and float((update.norm(dim=0) / h.norm(dim=0)).max()) < config.tolerance:
            bar.update(config.steps - step - 1)
            return h / config.scale, step + 1
    return h / config.scale, config.steps


def _relative_stderr(total: torch.Tensor, squares: torch.Tensor, count: int) -> float:
    """Largest over columns of ``std(mean) / ‖mean‖`` across ``count`` repeats (inf if count < 2)."""
    if count < 2:
        return float("inf")
    mean = total.double() / count
    spread = (squares / count - mean.pow(2).sum(dim=0)).clamp_min(0) * count / (count - 1)
    return float((spread.sqrt() / count**0.5 / mean.norm(dim=0).clamp_min(1e-300)).max())


def _check_divergence(ratio: torch.Tensor, step: int, config: LissaConfig, damping: float) -> None:
    worst = float(ratio.max())
    if worst == worst and worst <= config.divergence_factor * (step + 1):
        return
    raise LissaDivergenceError(
        f"LiSSA diverged at step {step + 1}: ‖h_j‖/‖v‖ = {worst:.3g} (a convergent run stays <= j+1 = {step + 1}). "
        f"With scale={config.scale:.4g} and damping={damping}, the scale is below λ_max + λ of the Hessian "
        f"minibatches. Increase LissaConfig.scale (try {config.scale * 10:.4g}), use a larger batch_size, or lissa='auto'."
    )


class LissaInverse:
    """Preconditioner form of LiSSA: each call solves for its rows; keeps the last result."""

    def __init__(self, sample_hvp: SampleHVP, config: LissaConfig, damping: float, progress: bool = True):
        self.sample_hvp, self.config, self.damping, self.progress = sample_hvp, config, damping, progress
        self.last_result: LissaResult | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.last_result = lissa_solve(self.sample_hvp, rows.T, self.config, self.damping, self.progress)
        return self.last_result.solution.T
