"""``hf-influence fit``: the Hessian's spectrum and its Arnoldi eigenbasis, fitted once and saved.

The Hessian is that of the mean training loss over a seeded random subset of ``--hessian_examples``
training rows.
Writes ``arnoldi_basis.safetensors`` (top ``--rank`` eigenpairs of ``--iterations`` Arnoldi steps,
tied to the model's weights) and the ``fit`` section of ``influence_config.json`` (settings,
eigenvalues, spectrum estimates, model fingerprint, library versions). ``hf-influence score`` and
``filter`` then project every gradient onto this basis. Under ``torchrun`` / ``accelerate launch``
every process runs the fit on its share of the Hessian batches (the products are summed across
processes, so all end with the same basis) and the main process saves it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .._utils.errors import InvalidInputError
from ..config import BasisConfig, pick, settings_named
from ..engine.ihvp.arnoldi import basis_save_path
from ..influence import Influence
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .loading import load_split
from .outputs import listing, print_table
from .session import Session


@dataclass
class FitArguments(BasisConfig):
    """Eigenbasis settings (`hf_influence.config.BasisConfig`) and the spectrum estimate of ``hf-influence fit``."""

    spectrum: bool = field(default=True, metadata={"help": "Also estimate λ_max, λ_min (Lanczos) and tr(H) (Hutch++), "
                                                           "with error bars, for the config file and summary."})
    spectrum_iterations: int = field(default=30, metadata={"help": "Lanczos steps of the spectrum estimate."})
    trace_matvecs: int = field(default=30, metadata={"help": "HVPs spent on the trace estimate."})

    def __post_init__(self):
        with settings_named("--"):
            super().__post_init__()
        if self.spectrum_iterations < 1 or self.trace_matvecs < 1:
            raise InvalidInputError("--spectrum_iterations and --trace_matvecs must be >= 1.")


def run_fit(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments, args: FitArguments) -> dict:
    """Fit the eigenbasis (every process), save it and write the config section (main process), print a summary; return it."""
    with Session(model_args, inf_args) as run:
        hessian = load_split(data_args.train_data, data_args.train_split, data_args, run.tokenizer, data_args.max_train_examples)
        result = _fit_and_save(run, hessian, args)
        run.finish("fit", (model_args, data_args, inf_args, args), result)
        if run.is_main:
            _print_summary(result, inf_args.output_dir)
    return result


def _fit_and_save(run: Session, hessian, args: FitArguments) -> dict:
    """The spectrum (optional) and the basis, saved by the main process; the figures for the config file."""
    inf: Influence = run.inf
    data_parallel = run.accelerator is not None  # every process takes its share of the Hessian batches
    spectrum = (inf.spectrum(hessian, iterations=args.spectrum_iterations, trace_matvecs=args.trace_matvecs, data_parallel=data_parallel)
                if args.spectrum else None)
    basis = inf.fit_basis(hessian, **dataclasses.asdict(pick(args, BasisConfig)), data_parallel=data_parallel)
    path = basis_save_path(run.output_dir)
    if run.is_main:
        basis.save(path)
    return {"basis": str(path), "hessian_examples": len(inf.hessian_rows(hessian)), "num_params": inf.selection.num_params,
            "curvature": basis.curvature, "iterations_completed": basis.iterations, "eigenvalues": basis.eigenvalues.tolist(),
            "spectrum": None if spectrum is None else dataclasses.asdict(spectrum)}


def _print_summary(result: dict, output_dir: str) -> None:
    eigenvalues = result["eigenvalues"]
    rows = [("Hessian examples", result["hessian_examples"]), ("parameters", f"{result['num_params']:,}"),
            ("curvature", result["curvature"]), ("Arnoldi iterations", result["iterations_completed"]), ("rank kept", len(eigenvalues)),
            ("eigenvalues kept", f"{eigenvalues[0]:.4g} ... {eigenvalues[-1]:.4g}")]
    spectrum = result["spectrum"]
    if spectrum is not None:
        rows += [("λ_max (Lanczos)", f"{spectrum['lambda_max']:.4g} ± {spectrum['lambda_max_error']:.2g}"),
                 ("λ_min (Lanczos)", f"{spectrum['lambda_min']:.4g} ± {spectrum['lambda_min_error']:.2g}"),
                 ("tr(H) (Hutch++)", f"{spectrum['trace']:.4g} ± {spectrum['trace_stderr']:.2g}")]
    rows += [("seconds", result["seconds"]), ("basis", result["basis"]), ("output_dir", listing(output_dir))]
    print_table("hf-influence fit", rows)
