"""``hf-influence fit``: the Hessian's spectrum and its Arnoldi eigenbasis, fitted once and saved.

The Hessian is that of the mean training loss over the first ``--hessian_examples`` training rows.
Writes ``arnoldi_basis.safetensors`` (top ``--rank`` eigenpairs of ``--iterations`` Arnoldi steps,
tied to the model's weights) and the ``fit`` section of ``influence_config.json`` (settings,
eigenvalues, spectrum estimates, model fingerprint, library versions). ``hf-influence score`` and
``filter`` then project every gradient onto this basis. Under ``torchrun`` / ``accelerate launch``
the main process fits and the others wait.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from .. import Influence
from .._utils.errors import InvalidInputError
from .._utils.io import check_writable_dir
from ..distributed import is_main_process, start_processes, wait_for_everyone
from ..engine.ihvp.arnoldi import CURVATURES, basis_save_path
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .loading import load_model, load_split
from .outputs import listing, model_description, print_table, update_run_config


@dataclass
class FitArguments:
    """Arnoldi and spectrum settings for ``hf-influence fit``."""

    rank: int = field(default=20, metadata={"help": "Eigenpairs kept (p̄): the largest |λ| of the Krylov space."})
    iterations: int = field(default=60, metadata={"help": "Arnoldi iterations n (one HVP pass over the Hessian data each); >= rank."})
    curvature: str = field(default="hessian", metadata={"help": "'hessian' (Arnoldi) or 'fisher' (the empirical Fisher's exact "
                                                                "eigenpairs from one pass of per-example gradients; --iterations unused)."})
    spectrum: bool = field(default=True, metadata={"help": "Also estimate λ_max, λ_min (Lanczos) and tr(H) (Hutch++), "
                                                           "with error bars, for the config file and summary."})
    spectrum_iterations: int = field(default=30, metadata={"help": "Lanczos steps of the spectrum estimate."})
    trace_matvecs: int = field(default=30, metadata={"help": "HVPs spent on the trace estimate."})

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise InvalidInputError(f"--curvature must be one of {CURVATURES}, got {self.curvature!r}.")
        if not 1 <= self.rank <= self.iterations:
            raise InvalidInputError(f"Need 1 <= --rank <= --iterations, got rank={self.rank}, iterations={self.iterations}: raise --iterations.")
        if self.spectrum_iterations < 1 or self.trace_matvecs < 1:
            raise InvalidInputError("--spectrum_iterations and --trace_matvecs must be >= 1.")


def run_fit(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments, args: FitArguments) -> dict:
    """Fit and save the Arnoldi basis (main process), write the config section, print a summary; return it."""
    start = time.perf_counter()
    accelerator = start_processes()
    check_writable_dir(inf_args.output_dir, "--output_dir")
    model, tokenizer = load_model(model_args)
    hessian = load_split(data_args.train_data, data_args.train_split, data_args, tokenizer, inf_args.hessian_examples)
    main = is_main_process(accelerator)
    inf = Influence(model, params=inf_args.params, last_n_layers=inf_args.last_n_layers, damping=inf_args.damping,
                    batch_size=inf_args.batch_size, seed=inf_args.seed, progress=main)
    result = _fit_and_save(inf, hessian, inf_args, args) if main else {}
    wait_for_everyone(accelerator)
    if main:
        result["seconds"] = round(time.perf_counter() - start, 2)
        update_run_config(inf_args.output_dir, "fit", model_description(inf, model_args.model_name_or_path),
                          (model_args, data_args, inf_args, args), result)
        _print_summary(result, inf_args.output_dir)
    if accelerator is not None:
        accelerator.end_training()
    return result


def _fit_and_save(inf: Influence, hessian, inf_args: InfluenceArguments, args: FitArguments) -> dict:
    """The spectrum (optional) and the basis, saved; the figures for the config file."""
    spectrum = inf.spectrum(hessian, iterations=args.spectrum_iterations, trace_matvecs=args.trace_matvecs) if args.spectrum else None
    basis = inf.fit_basis(hessian, rank=args.rank, iterations=args.iterations, curvature=args.curvature)
    path = basis.save(basis_save_path(inf_args.output_dir))
    return {"basis": str(path), "hessian_examples": len(hessian), "num_params": inf.selection.num_params,
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
