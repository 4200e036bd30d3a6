"""``hf-influence stest``: s_test = (H + λI)^-1 ∇L(z_test) by LiSSA for a test set, one safetensors
file per test point, resumable.

Test points are solved in fixed groups of ``points_per_solve`` (group g holds points
``[g·K, (g+1)·K)``), so a rerun computes exactly what a fresh run would: finished groups are
skipped, unfinished ones recomputed whole; SIGINT / SIGTERM stop the run after the group in
progress. Under ``torchrun`` / ``accelerate launch`` the LiSSA repeats are spread over the
processes and rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import Influence, LissaConfig
from .._utils.errors import IncompatibleBasisError, InvalidInputError, RunInterrupted
from .._utils.io import atomic_path, check_writable_dir, load_tensors, save_tensors
from ..data import dataset_fingerprint
from ..distributed import StopRequests, start_processes
from .arguments import DataArguments, InfluenceArguments, ModelArguments
from .loading import load_model, load_split

STEST_DIR = "s_test"
CONFIG_FILE = "stest_config.json"
PRESETS = ("auto", "fastif", "koh_liang", "manual")


@dataclass
class StestArguments:
    """LiSSA settings for ``hf-influence stest``."""

    lissa: str = field(default="auto", metadata={"help": "auto (from the Hessian spectrum), fastif, koh_liang, or manual "
                                                        "(then --scale/--steps/--repeats/--lissa_batch_size)."})
    scale: float = field(default=10.0, metadata={"help": "manual: s, must exceed λ_max + λ."})
    steps: int = field(default=1000, metadata={"help": "manual: recursion depth J."})
    repeats: int = field(default=1, metadata={"help": "manual: independent repeats T (spread over processes)."})
    lissa_batch_size: int = field(default=8, metadata={"help": "manual: Hessian minibatch size B."})
    points_per_solve: int = field(default=8, metadata={"help": "Test points solved together (one LiSSA run, k columns)."})

    def __post_init__(self):
        if self.lissa not in PRESETS:
            raise InvalidInputError(f"--lissa must be one of {PRESETS}, got {self.lissa!r}.")
        if self.points_per_solve < 1:
            raise InvalidInputError(f"--points_per_solve must be >= 1, got {self.points_per_solve}.")

    def requested(self) -> str | LissaConfig:
        if self.lissa != "manual":
            return self.lissa
        return LissaConfig(scale=self.scale, steps=self.steps, repeats=self.repeats, batch_size=self.lissa_batch_size)


def stest_save_path(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / STEST_DIR / f"s_test_{index:07d}.safetensors"


def save_stest(output_dir: str | os.PathLike, index: int, vector: torch.Tensor, metadata: dict) -> None:
    save_tensors(stest_save_path(output_dir, index), {"s_test": vector}, {"kind": "s_test", "test_index": index, **metadata})


def load_stest(output_dir: str | os.PathLike, index: int) -> tuple[torch.Tensor, dict]:
    """The ``[P]`` s_test of test point ``index`` (``named_parameters()`` order) and its metadata."""
    tensors, metadata = load_tensors(stest_save_path(output_dir, index))
    return tensors["s_test"], metadata


def stest_exists(output_dir: str | os.PathLike, index: int) -> bool:
    return stest_save_path(output_dir, index).is_file()


def run_stest(model_args: ModelArguments, data_args: DataArguments, inf_args: InfluenceArguments, args: StestArguments) -> dict:
    """Compute and save s_test for every test point not already saved; return a summary."""
    start = time.perf_counter()
    accelerator = start_processes()
    is_main = accelerator is None or accelerator.is_main_process
    if data_args.test_data is None:
        raise InvalidInputError("hf-influence stest needs --test_data (the points whose s_test is computed).")
    check_writable_dir(inf_args.output_dir, "--output_dir")
    model, tokenizer = load_model(model_args)
    train = load_split(data_args.train_data, data_args.train_split, data_args, tokenizer, inf_args.hessian_examples)
    test = load_split(data_args.test_data, data_args.test_split, data_args, tokenizer, data_args.max_test_examples)
    inf = Influence(model, params=inf_args.params, last_n_layers=inf_args.last_n_layers, damping=inf_args.damping,
                    batch_size=inf_args.batch_size, seed=inf_args.seed, progress=is_main)
    request = _request(inf, train, inf_args, args)
    config = _resolved_config(inf, train, request, args, inf_args.output_dir, is_main)
    row_hashes = [_row_hash(test[i]) for i in range(len(test))]
    todo = _unfinished_groups(inf_args.output_dir, row_hashes, args.points_per_solve, request["hash"])
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every rank has planned before rank 0 writes anything
    hvps = 0
    with StopRequests() as stop:
        for done, group in enumerate(tqdm(todo, desc="s_test groups", disable=not is_main), start=1):
            vectors = inf.s_test(test.select(group), train, lissa=config)  # [k, P]
            hvps += inf.last_lissa.hvps
            if is_main:
                for index, vector in zip(group, vectors):
                    save_stest(inf_args.output_dir, index, vector, {"request_hash": request["hash"], "row_hash": row_hashes[index]})
            if stop.received is not None:
                raise RunInterrupted(f"Stopped by {stop.received} after {done} of {len(todo)} group(s) of test points; their "
                                     "s_test files are saved. Rerun the same command to continue.")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    summary = {"test_points": len(test), "computed": sum(len(g) for g in todo), "skipped": len(test) - sum(len(g) for g in todo),
               "hvps": hvps, "seconds": round(time.perf_counter() - start, 2), "lissa": dataclasses.asdict(config)}
    if is_main:
        _print_summary(summary, inf_args.output_dir)
    if accelerator is not None:
        accelerator.end_training()
    return summary


def _request(inf: Influence, train: Any, inf_args: InfluenceArguments, args: StestArguments) -> dict:
    """Everything the saved vectors depend on, and its hash."""
    requested = args.requested()
    request = {
        "model_class": type(inf.model).__name__, "model_fingerprint": inf.selection.fingerprint(inf.model),
        "param_names": list(inf.selection.names), "hessian_data": dataset_fingerprint(train),
        "damping": inf.damping, "seed": inf_args.seed, "points_per_solve": args.points_per_solve,
        "lissa": dataclasses.asdict(requested) if isinstance(requested, LissaConfig) else requested,
    }
    request["hash"] = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    return request


def _resolved_config(inf: Influence, train: Any, request: dict, args: StestArguments, output_dir: str, is_main: bool) -> LissaConfig:
    """The LissaConfig of this output folder: read back on a rerun (refused if the request changed), else resolved."""
    path = Path(output_dir) / STEST_DIR / CONFIG_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["request"]["hash"] != request["hash"]:
            differing = sorted(k for k in request if k != "hash" and saved["request"].get(k) != request[k])
            raise IncompatibleBasisError(
                f"{path.parent} holds s_test vectors from another configuration (differs in: {', '.join(differing)}). "
                "Use a new --output_dir, or delete that folder to start over."
            )
        return LissaConfig(**saved["lissa"])
    config = inf.resolve_lissa_config(train, args.requested())
    spectrum = dataclasses.asdict(inf.last_spectrum) if args.lissa == "auto" else None
    if is_main:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"request": request, "lissa": dataclasses.asdict(config), "spectrum": spectrum}, indent=2))
    return config


def _unfinished_groups(output_dir: str, row_hashes: list[str], size: int, request_hash: str) -> list[list[int]]:
    """Fixed groups of test indices with at least one point missing or unreadable."""
    groups = [list(range(s, min(s + size, len(row_hashes)))) for s in range(0, len(row_hashes), size)]
    return [g for g in groups if not all(_is_saved(output_dir, i, row_hashes[i], request_hash) for i in g)]


def _is_saved(output_dir: str, index: int, row_hash: str, request_hash: str) -> bool:
    if not stest_exists(output_dir, index):
        return False
    try:
        _, metadata = load_stest(output_dir, index)
    except Exception:  # truncated or corrupted: recompute it
        return False
    if metadata.get("request_hash") != request_hash or metadata.get("row_hash") != row_hash:
        raise IncompatibleBasisError(
            f"{stest_save_path(output_dir, index)} was computed for another test example or configuration. "
            "Use a new --output_dir, or delete the s_test folder to start over."
        )
    return True


def _row_hash(row: dict) -> str:
    numeric = {k: torch.as_tensor(v).tolist() for k, v in sorted(row.items())}
    return hashlib.sha256(json.dumps(numeric).encode()).hexdigest()[:16]


def _print_summary(summary: dict, output_dir: str) -> None:
    lissa = summary["lissa"]
    print(f"s_test: {summary['test_points']} test points, {summary['computed']} computed, {summary['skipped']} already saved; "
          f"{summary['hvps']} minibatch HVPs in {summary['seconds']}s")
    print(f"LiSSA: scale={lissa['scale']:.4g} steps={lissa['steps']} repeats={lissa['repeats']} "
          f"batch_size={lissa['batch_size']} damping={lissa['damping']}")
    print(f"vectors: {Path(output_dir) / STEST_DIR}/s_test_<index>.safetensors (key 's_test', parameter order in {CONFIG_FILE})")
