"""Arnoldi eigenbasis of the Hessian (Schioppa et al. 2022, "Scaling Up Influence Functions", Alg. 1-2).

At most ``iterations`` HVPs build an orthonormal Krylov basis with full re-orthogonalisation
(``spectrum.krylov_iteration``), fewer once the kept Ritz pairs have converged (``base.ConvergenceStop``); the small
projected matrix is diagonalised and distilled to the ``rank`` eigenpairs of largest |λ| (or largest λ). Scores
in that basis use ``Σ_i (u_i·g_x)(u_i·g_z) / (λ_i + damping)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
import torch

from ..._utils.adapters import adapter_names_in, describe_adapter_change
from ..._utils.errors import IncompatibleBasisError
from ..._utils.io import damaged_artifact, read_tensors_artifact, save_tensors
from ...config import Keep, check_damping

BASIS_FILE = "arnoldi_basis.safetensors"
_METADATA_KEYS = ("param_names", "param_shapes", "iterations", "fingerprint", "model_class", "curvature", "keep")
_LATER_KEYS = ("curvature", "keep")  # absent from bases saved before they existed: Hessian bases, kept by |λ|


@dataclass
class ArnoldiBasis:
    """Top eigenpairs of the Hessian (or of the empirical Fisher) over a parameter selection, tied to one model's weights.

    Attributes:
        eigenvalues (`torch.Tensor` of shape `[p̄]`): λ_i, ordered by decreasing |λ| (``keep="largest"``: λ).
        eigenvectors (`torch.Tensor` of shape `[p̄, P]`): orthonormal u_i in ``named_parameters()`` order.
        param_names (`list[str]`), param_shapes (`list[list[int]]`): the parameter selection.
        iterations (`int`): Krylov products run (a fit stops before its cap once converged; 0 for the Fisher, which is
            decomposed exactly).
        fingerprint (`str`): hash of the selected weights (see ``ParamSelection.fingerprint``).
        model_class (`str`): class name of the model it was fitted on.
        curvature (`str`, defaults to `"hessian"`): ``"hessian"`` (``Influence.fit_arnoldi``) or
            ``"fisher"`` (``Influence.fit_fisher``).
        keep (`str`, defaults to `"magnitude"`): the pairs kept, those of largest |λ| or ``"largest"`` λ
            (`hf_influence.config.Keep`); the same for the Fisher, which has no negative λ.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    param_names: list[str]
    param_shapes: list[list[int]]
    iterations: int
    fingerprint: str
    model_class: str
    curvature: str = "hessian"
    keep: str = Keep.MAGNITUDE.value

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def inverse_eigenvalues(self, damping: float) -> torch.Tensor:
        """``1 / (λ_i + damping)``, ``[p̄]``. Damping is the scorer's setting, not the basis's: one basis serves any."""
        return 1.0 / (self.eigenvalues + check_damping(damping))

    def metadata(self) -> dict:
        return {"kind": "arnoldi_basis", "rank": self.rank, **{k: getattr(self, k) for k in _METADATA_KEYS}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a folder: ``path/arnoldi_basis.safetensors``; or a ``.safetensors`` file)."""
        return save_basis(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ArnoldiBasis":
        """Read a basis written by :meth:`save`."""
        return load_basis(path)

    def mismatches(self, param_names: list[str], param_shapes: list[list[int]], fingerprint: str, model_class: str) -> list[str]:
        """Why this basis cannot serve the given model and parameter selection: the one reuse rule, reached through
        `Influence.basis_mismatches` by the facade, the Trainer, the CLI and sharded jobs. Empty = reusable."""
        problems = []
        if list(param_names) != list(self.param_names) or [list(s) for s in param_shapes] != self.param_shapes:
            problems.append(
                f"parameter selection: saved {len(self.param_names)} tensors ({_short(self.param_names)}), "
                f"requested {len(param_names)} ({_short(param_names)})" + describe_adapter_change(self.param_names, param_names)
            )
        elif fingerprint != self.fingerprint:
            weights = "model weights or PEFT adapter (its weights or config)" if adapter_names_in(param_names) else "model weights"
            problems.append(f"{weights}: saved fingerprint {self.fingerprint[:12]}…, this model {fingerprint[:12]}…")
        if model_class != self.model_class:
            problems.append(f"model class: saved {self.model_class}, requested {model_class}")
        return problems

    def request_mismatches(self, rank: int | None = None, curvature: str | None = None, keep: str | None = None) -> list[str]:
        """How this basis differs from a requested ``rank`` / ``curvature`` / ``keep`` (each ignored when ``None``; ``keep``
        also for a Fisher basis, whose eigenvalues are all >= 0 so both choices keep the same pairs)."""
        problems = []
        if rank is not None and rank != self.rank:
            problems.append(f"rank: saved {self.rank}, requested {rank}")
        if curvature is not None and curvature != self.curvature:
            problems.append(f"curvature: saved {self.curvature}, requested {curvature}")
        if keep is not None and self.curvature != "fisher" and Keep(keep).value != self.keep:
            problems.append(f"keep: saved {self.keep} (eigenpairs of largest {'|λ|' if self.keep == 'magnitude' else 'λ'}), requested {keep}")
        return problems


def _short(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def basis_save_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it names a ``.safetensors`` file, else ``path/arnoldi_basis.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / BASIS_FILE


def basis_exists(path: str | os.PathLike) -> bool:
    return basis_save_path(path).is_file()


def save_basis(basis: ArnoldiBasis, path: str | os.PathLike) -> Path:
    target = basis_save_path(path)
    save_tensors(target, {"eigenvalues": basis.eigenvalues, "eigenvectors": basis.eigenvectors}, basis.metadata())
    return target


def load_basis(path: str | os.PathLike) -> ArnoldiBasis:
    target = basis_save_path(path)
    if not target.is_file():
        raise FileNotFoundError(f"No Arnoldi basis at {target}. Fit one with Influence.fit_arnoldi(...).save(path).")
    remedy = ("Fit it again, which overwrites it: `hf-influence fit` with the same --output_dir, or "
              "Influence.fit_basis(...).save(path).")
    tensors, meta = read_tensors_artifact(target, "an Arnoldi basis", remedy)
    if meta.get("kind") != "arnoldi_basis":
        raise IncompatibleBasisError(f"{target} holds a {meta.get('kind')!r}, not an Arnoldi basis.")
    missing = [k for k in ("eigenvalues", "eigenvectors") if k not in tensors] + [
        k for k in _METADATA_KEYS if k not in meta and k not in _LATER_KEYS]
    if missing:
        raise damaged_artifact(target, "an Arnoldi basis", f"it lacks {', '.join(missing)}", remedy)
    fields = {k: meta[k] for k in _METADATA_KEYS if k in meta}  # the dataclass defaults stand in for _LATER_KEYS
    return ArnoldiBasis(tensors["eigenvalues"], tensors["eigenvectors"], **fields)
