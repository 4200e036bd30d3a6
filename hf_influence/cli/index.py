"""``hf-influence index``: store every training row's features once, for exact top-k ``hf-influence query`` runs.

Features (``p̄`` numbers per row: Arnoldi eigen-coordinates, random-projection coordinates, or a seeded
random projection of the gradient for TracIn) are written in fixed shards of ``--shard_size`` rows under
``--index_dir`` (default ``output_dir/influence_index``): under ``torchrun`` / ``accelerate launch`` the
processes share them, a rerun computes only the missing ones, ``--max_shards n`` stops after n new
shards. When all are saved the main process writes the query side and the manifest. Memory of the
index: rows × p̄ × 4 bytes (float32) or × 2 (``--dtype float16``). Damping is applied at query time.
Arnoldi needs ``hf-influence fit`` first (same config).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .._utils.errors import InvalidInputError
from ..config import BasisConfig, Method, ScoringConfig, check_count
from ..engine.ihvp.arnoldi import ArnoldiBasis, basis_exists, basis_save_path
from ..index import INDEX_METHODS, build_index
from ..index.store import STORAGE_DTYPES
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .loading import load_split
from .outputs import print_table
from .session import Session

INDEX_DIR = "influence_index"


@dataclass
class IndexArguments:
    """What ``hf-influence index`` stores."""

    method: str = field(default="arnoldi", metadata={
        "help": "arnoldi (eigen-coordinates of the fitted basis), randproj (coordinates in a seeded random subspace, "
                "preconditioned by (QᵀHQ + λI)^-1 at query time) or tracin (TracIn on a seeded --rank-dimensional random "
                "projection of the gradient: an approximation of the gradient dot product)."})
    basis_path: str | None = field(default=None, metadata={"help": "Arnoldi basis file or folder (default: --output_dir)."})
    rank: int = field(default=BasisConfig.rank, metadata={"help": "Subspace dimension p̄ of randproj and tracin (arnoldi: the basis rank)."})
    dtype: str = field(default="float32", metadata={"help": "Storage of the features: float32, or float16 (half the memory)."})
    index_dir: str | None = field(default=None, metadata={"help": f"Folder of the index (default: --output_dir/{INDEX_DIR})."})
    shard_size: int = field(default=ScoringConfig.shard_size, metadata={"help": "Rows per saved shard (keep it when resuming)."})
    max_shards: int | None = field(default=None, metadata={"help": "Compute at most this many new shards, then stop; rerun to continue."})

    def __post_init__(self):
        if self.method not in [m.value for m in INDEX_METHODS]:
            raise InvalidInputError(f"--method must be one of {[m.value for m in INDEX_METHODS]} for an index, got {self.method!r}.")
        if self.dtype not in STORAGE_DTYPES:
            raise InvalidInputError(f"--dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}.")
        check_count(self.rank, "--rank")
        check_count(self.shard_size, "--shard_size")
        check_count(self.max_shards, "--max_shards", optional=True)


def index_folder(index_dir: str | None, output_dir: str) -> Path:
    return Path(index_dir) if index_dir else Path(output_dir) / INDEX_DIR


def run_index(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments, args: IndexArguments) -> dict:
    """Build (or finish) the index, write the ``index`` section of ``influence_config.json``, print a summary; return it."""
    basis_path = basis_save_path(args.basis_path or inf_args.output_dir)
    if args.method == Method.ARNOLDI and not basis_exists(basis_path):
        raise InvalidInputError(f"No Arnoldi basis at {basis_path}. Run `hf-influence fit` with the same --config first, pass "
                                "--basis_path, or use --method randproj / tracin.")
    folder = index_folder(args.index_dir, inf_args.output_dir)
    with Session(model_args, inf_args, progress=False) as run:
        train = load_split(data_args.train_data, data_args.train_split, data_args, run.tokenizer, data_args.max_train_examples)
        basis = ArnoldiBasis.load(basis_path) if args.method == Method.ARNOLDI else None
        start = time.perf_counter()
        build = build_index(run.inf, train, args.method, basis, rank=args.rank, dtype=args.dtype, output_dir=folder,
                            shard_size=args.shard_size, accelerator=run.accelerator, max_shards=args.max_shards, progress=run.is_main)
        seconds = time.perf_counter() - start
        report = build.report
        result = {"index_dir": str(folder), "rows": report.plan.num_rows, "shards_computed": len(report.computed),
                  "shards_skipped": report.skipped, "shards_remaining": report.remaining, "processes": report.processes,
                  "build_seconds": round(seconds, 3), "complete": build.index is not None}
        if build.index is not None:
            result |= {"rank": build.index.rank, "dtype": args.dtype, "memory_mb": round(build.index.memory_bytes / 2**20, 3)}
        run.finish("index", (model_args, data_args, inf_args, args), result)
        if run.is_main:
            rows = [(key.replace("_", " "), value) for key, value in result.items()]
            if report.remaining:
                rows.append(("next", f"{report.remaining} shard(s) left: rerun the same command to continue"))
            print_table(f"hf-influence index --method {args.method}", rows)
    return result
