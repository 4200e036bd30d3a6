"""Arnoldi eigenbasis of the Hessian (Schioppa et al. 2022, "Scaling Up Influence Functions", Alg. 1-2).

``iterations`` HVPs build an orthonormal Krylov basis with full re-orthogonalisation
(``spectrum.krylov_iteration``); the small
projected matrix is diagonalised and distilled to the ``rank`` eigenpairs of largest |λ|. Scores
in that basis use ``Σ_i (u_i·g_x)(u_i·g_z) / (λ_i + damping)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
import torch

from ..._utils.errors import IncompatibleBasisError, InvalidInputError
from ..._utils.io import load_tensors, save_tensors
from .base import check_damping

BASIS_FILE = "arnoldi_basis.safetensors"
CURVATURES = ("hessian", "fisher")  # fitted by Influence.fit_arnoldi / Influence.fit_fisher
_METADATA_KEYS = ("param_names", "param_shapes", "damping", "iterations", "fingerprint", "model_class", "curvature")


def distill(basis: torch.Tensor, hessenberg: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs by |λ|: eigenvalues ``[rank]``, unit eigenvectors ``[rank, P]``."""
    m = hessenberg.shape[1]
    if rank > m:
        raise InvalidInputError(f"rank={rank} exceeds the {m} Arnoldi iterations completed; lower rank or raise iterations.")
    square = hessenberg[:m, :m].double()
    eigenvalues, eigenvectors = torch.linalg.eigh((square + square.T) / 2)
    order = eigenvalues.abs().argsort(descending=True)[:rank]
    vectors = eigenvectors[:, order].T.to(basis.dtype) @ basis[:m]  # [rank, P]
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return eigenvalues[order].to(basis.dtype), vectors


@dataclass
class ArnoldiBasis:
    """Top eigenpairs of the Hessian (or of the empirical Fisher) over a parameter selection, tied to one model's weights.

    Attributes:
        eigenvalues (`torch.Tensor` of shape `[p̄]`): λ_i, ordered by decreasing |λ|.
        eigenvectors (`torch.Tensor` of shape `[p̄, P]`): orthonormal u_i in ``named_parameters()`` order.
        param_names (`list[str]`), param_shapes (`list[list[int]]`): the parameter selection.
        damping (`float`): additive λ used in scores.
        iterations (`int`): Arnoldi iterations run (0 for the Fisher, which is decomposed exactly).
        fingerprint (`str`): hash of the selected weights (see ``ParamSelection.fingerprint``).
        model_class (`str`): class name of the model it was fitted on.
        curvature (`str`, defaults to `"hessian"`): ``"hessian"`` (``Influence.fit_arnoldi``) or
            ``"fisher"`` (``Influence.fit_fisher``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    param_names: list[str]
    param_shapes: list[list[int]]
    damping: float
    iterations: int
    fingerprint: str
    model_class: str
    curvature: str = "hessian"

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def inverse_eigenvalues(self) -> torch.Tensor:
        """``1 / (λ_i + damping)``, ``[p̄]``."""
        return 1.0 / (self.eigenvalues + check_damping(self.damping))

    def metadata(self) -> dict:
        return {"kind": "arnoldi_basis", "rank": self.rank, **{k: getattr(self, k) for k in _METADATA_KEYS}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (a folder: ``path/arnoldi_basis.safetensors``; or a ``.safetensors`` file)."""
        return save_basis(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ArnoldiBasis":
        """Read a basis written by :meth:`save`."""
        return load_basis(path)

    def check_compatible(self, param_names: list[str], param_shapes: list[list[int]], fingerprint: str, model_class: str) -> None:
        """Refuse use with another model or parameter selection, showing saved vs requested."""
        problems = []
        if list(param_names) != list(self.param_names) or [list(s) for s in param_shapes] != self.param_shapes:
            problems.append(
                f"parameter selection: saved {len(self.param_names)} tensors ({_short(self.param_names)}), "
                f"requested {len(param_names)} ({_short(param_names)})"
            )
        elif fingerprint != self.fingerprint:
            problems.append(f"model weights: saved fingerprint {self.fingerprint[:12]}…, this model {fingerprint[:12]}…")
        if model_class != self.model_class:
            problems.append(f"model class: saved {self.model_class}, requested {model_class}")
        if problems:
            raise IncompatibleBasisError(
                "This Arnoldi basis was fitted on a different model: " + "; ".join(problems) + ". Fit a new basis "
                "with Influence.fit_arnoldi(...) on this model, or load the model the basis was fitted on."
            )


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
    tensors, meta = load_tensors(target)
    if meta.get("kind") != "arnoldi_basis":
        raise IncompatibleBasisError(f"{target} holds a {meta.get('kind')!r}, not an Arnoldi basis.")
    fields = {k: meta[k] for k in _METADATA_KEYS if k in meta}  # bases saved before `curvature` existed are Hessian ones
    return ArnoldiBasis(tensors["eigenvalues"], tensors["eigenvectors"], **fields)
