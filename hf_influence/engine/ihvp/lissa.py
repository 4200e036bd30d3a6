"""LiSSA (Agarwal et al. 2017; Koh & Liang 2017): stochastic Neumann series for ``(H + λI)^-1 v``.

Recursion: ``h_j = v + (I - (H_Bj + λI)/s) h_{j-1}``, ``h_0 = v``, result ``h_J / s``, averaged over
T independent repeats; ``H_Bj`` is the Hessian of the mean loss on a fresh random minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..._utils.errors import LissaDivergenceError
from .base import check_damping


@dataclass
class LissaConfig:
    """Settings of the LiSSA recursion.

    Args:
        scale (`float`, defaults to `10.0`): s; must exceed ``λ_max(H_B) + λ`` of every minibatch.
        steps (`int`, defaults to `1000`): J, recursion depth; needs ~ ``s/λ_min(H+λI)`` to converge.
        repeats (`int`, defaults to `1`): T, independent runs averaged.
        batch_size (`int`, defaults to `8`): B, examples per Hessian minibatch.
        damping (`float`, *optional*): additive λ; ``None`` takes the ``Influence`` damping.
        seed (`int`, defaults to `0`): seeds minibatch sampling.
        divergence_factor (`float`, defaults to `10.0`): a convergent run keeps
            ``‖h_j‖ <= (j+1)‖v‖``; beyond ``divergence_factor`` times that bound the run is stopped.
    """

    scale: float = field(default=10.0, metadata={"help": "s > λ_max + λ"})
    steps: int = field(default=1000, metadata={"help": "recursion depth J"})
    repeats: int = field(default=1, metadata={"help": "independent repeats T"})
    batch_size: int = field(default=8, metadata={"help": "Hessian minibatch size B"})
    damping: float | None = field(default=None, metadata={"help": "additive λ (None: the Influence damping)"})
    seed: int = field(default=0, metadata={"help": "seed of the minibatch sampler"})
    divergence_factor: float = field(default=10.0, metadata={"help": "norm growth that counts as divergence"})

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"LissaConfig.scale must be > 0 (and above λ_max + λ), got {self.scale}.")
        for name in ("steps", "repeats", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LissaConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.damping is not None:
            check_damping(self.damping)


@dataclass
class LissaResult:
    """``solution`` ``[P, k]`` ≈ ``(H + λI)^-1 V``; ``norms`` ``[T, J]``: max column norm of ``h_j``."""

    solution: torch.Tensor
    norms: torch.Tensor


def lissa_solve(
    sample_hvp: Callable[[torch.Tensor], torch.Tensor],
    vectors: torch.Tensor,
    config: LissaConfig,
    damping: float,
    progress: bool = True,
) -> LissaResult:
    """Run LiSSA on the columns of ``vectors`` (``[P, k]``) at once.

    ``sample_hvp(V)`` must return ``H_B V`` for a fresh random minibatch B at each call.
    Raises `LissaDivergenceError` (naming ``scale``) on NaN/Inf or norm growth.
    """
    damping = check_damping(damping)
    v_norm = vectors.norm(dim=0).clamp_min(torch.finfo(vectors.dtype).tiny)  # [k]
    total = torch.zeros_like(vectors)
    norms = torch.zeros(config.repeats, config.steps)
    bar = tqdm(total=config.repeats * config.steps, desc="LiSSA", disable=not progress)
    for repeat in range(config.repeats):
        h = vectors.clone()
        for step in range(config.steps):
            h = vectors + h - (sample_hvp(h) + damping * h) / config.scale
            ratio = h.norm(dim=0) / v_norm  # [k]
            norms[repeat, step] = float(ratio.max())
            _check_divergence(ratio, repeat, step, config, damping)
            bar.update(1)
        total += h / config.scale
    bar.close()
    return LissaResult(total / config.repeats, norms)


def _check_divergence(ratio: torch.Tensor, repeat: int, step: int, config: LissaConfig, damping: float) -> None:
    worst = float(ratio.max())
    if worst == worst and worst <= config.divergence_factor * (step + 1) and worst != float("inf"):
        return
    raise LissaDivergenceError(
        f"LiSSA diverged at step {step + 1} of repeat {repeat + 1}: ‖h_j‖/‖v‖ = {worst:.3g} (a convergent run stays "
        f"<= j+1 = {step + 1}). With scale={config.scale} and damping={damping}, the scale is below λ_max + λ of "
        f"the Hessian minibatches. Increase LissaConfig.scale (try {config.scale * 10:g}), or a larger batch_size."
    )


class LissaInverse:
    """Preconditioner form of LiSSA: each call solves for its rows; keeps the last norm trace."""

    def __init__(self, sample_hvp: Callable[[torch.Tensor], torch.Tensor], config: LissaConfig, damping: float, progress: bool = True):
        self.sample_hvp, self.config, self.damping, self.progress = sample_hvp, config, damping, progress
        self.last_result: LissaResult | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        self.last_result = lissa_solve(self.sample_hvp, rows.T, self.config, self.damping, self.progress)
        return self.last_result.solution.T
