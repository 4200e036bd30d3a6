"""Resumable s_test jobs: ``(H + λI)^-1 ∇L(z_test)`` by LiSSA for a test set, one safetensors file per test point.

Test points are solved in fixed groups of ``points_per_solve`` (group g holds points
``[g·K, (g+1)·K)``), so a rerun computes exactly what a fresh run would: finished groups are
skipped, unfinished ones recomputed whole, and a test set that grew only adds groups. Each file
records the request hash (see `hf_influence.jobs.shards.request_hash`) and its test row's hash; the
resolved LiSSA settings are saved once beside them, so a rerun neither re-estimates the spectrum nor
mixes configurations. SIGINT / SIGTERM stop after the group in progress. Under torchrun /
accelerate every process takes part in each group (the LiSSA repeats are spread over the processes)
and the main process writes the files. The CLI (`hf-influence stest`), the Trainer and the recipes
all run this job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .._utils.errors import DamagedArtifactError, IncompatibleBasisError, RunInterrupted
from .._utils.io import check_writable_dir, damaged_artifact, read_json_artifact, read_tensors_artifact, save_tensors, write_json_artifact
from ..data import dataset_fingerprint, dataset_of, select_rows
from ..engine.ihvp.lissa import LissaConfig
from ..curvature import ResolvedLissa
from ..influence import Influence
from .processes import StopRequests, is_main_process, wait_for_everyone
from .shards import request_hash

logger = logging.get_logger(__name__)

STEST_DIR = "s_test"
CONFIG_FILE = "stest_config.json"


def stest_save_path(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / STEST_DIR / f"s_test_{index:07d}.safetensors"


def save_stest(output_dir: str | os.PathLike, index: int, vector: torch.Tensor, metadata: dict) -> None:
    save_tensors(stest_save_path(output_dir, index), {"s_test": vector}, {"kind": "s_test", "test_index": index, **metadata})


def load_stest(output_dir: str | os.PathLike, index: int) -> tuple[torch.Tensor, dict]:
    """The ``[P]`` s_test of test point ``index`` (``named_parameters()`` order) and its metadata; a damaged file
    raises `DamagedArtifactError`."""
    path, what = stest_save_path(output_dir, index), f"the s_test vector of test point {index}"
    remedy = "Delete it and rerun the same `hf-influence stest` command: only the missing test points are solved again."
    tensors, metadata = read_tensors_artifact(path, what, remedy)
    if "s_test" not in tensors:
        raise damaged_artifact(path, what, "it lacks the tensor 's_test'", remedy)
    return tensors["s_test"], metadata


def stest_exists(output_dir: str | os.PathLike, index: int) -> bool:
    return stest_save_path(output_dir, index).is_file()


@dataclass
class StestRun:
    """What an s_test job did: ``computed`` / ``skipped`` test points, ``hvps`` spent, the LiSSA settings and
    spectrum it used, and (when ``load=True``) every point's vector ``[n_test, P]``."""

    computed: int
    skipped: int
    hvps: int
    lissa: ResolvedLissa
    vectors: torch.Tensor | None


def stest_request(inf: Influence, hessian_data: Any, lissa: str | LissaConfig, points_per_solve: int) -> dict:
    """Everything the saved vectors depend on, and its hash (``"hash"``)."""
    request = {
        "model_class": type(inf.model).__name__, "model_fingerprint": inf.selection.fingerprint(inf.model),
        "param_names": list(inf.selection.names), "hessian_data": dataset_fingerprint(hessian_data),
        "damping": inf.damping, "seed": inf.seed, "hessian_examples": inf.config.hessian_examples,
        "points_per_solve": points_per_solve, "lissa": dataclasses.asdict(lissa) if isinstance(lissa, LissaConfig) else lissa,
    }
    return {**request, "hash": request_hash(request)}


def sharded_s_test(
    inf: Influence,
    test_data: Any,
    hessian_data: Any,
    output_dir: str | os.PathLike,
    lissa: str | LissaConfig = "auto",
    points_per_solve: int = 8,
    accelerator: Any = None,
    load: bool = False,
    progress: bool = True,
) -> StestRun:
    """Compute and save s_test for every test point not already saved under ``output_dir/s_test``.

    Args:
        inf (`Influence`): the facade (damping, parameters, seed).
        test_data, hessian_data (`datasets.Dataset`): the test points, and the rows defining the Hessian.
        lissa (`str` or `LissaConfig`): ``"auto"``, ``"fastif"``, ``"koh_liang"`` or explicit settings.
        points_per_solve (`int`, defaults to `8`): test points solved together (one LiSSA run, k columns).
        accelerator (`accelerate.Accelerator`, *optional*): every process takes part in each group.
        load (`bool`, defaults to `False`): read every point's vector back into ``StestRun.vectors``.
        progress (`bool`, defaults to `True`): a bar over the groups on the main process.
    """
    check_writable_dir(output_dir, "The s_test folder")
    is_main = is_main_process(accelerator)
    request = stest_request(inf, hessian_data, lissa, points_per_solve)
    resolved = _resolved_lissa(inf, hessian_data, request, lissa, output_dir, is_main)
    row_hashes = [_row_hash(row) for row in dataset_of(test_data)]
    todo = _unfinished_groups(output_dir, row_hashes, points_per_solve, request["hash"])
    wait_for_everyone(accelerator)  # every rank has planned before the main process writes anything
    hvps = 0
    with StopRequests() as stop:
        for done, group in enumerate(tqdm(todo, desc="s_test groups", disable=not (progress and is_main)), start=1):
            result = inf.solve_s_test(select_rows(test_data, group), hessian_data, lissa=resolved)
            hvps += result.hvps
            if is_main:
                for index, vector in zip(group, result.solution.T):
                    save_stest(output_dir, index, vector, {"request_hash": request["hash"], "row_hash": row_hashes[index]})
            if stop.received is not None:
                raise RunInterrupted(f"Stopped by {stop.received} after {done} of {len(todo)} group(s) of test points; their "
                                     "s_test files are saved. Rerun the same command to continue.")
    wait_for_everyone(accelerator)
    computed = sum(len(g) for g in todo)
    vectors = torch.stack([load_stest(output_dir, i)[0] for i in range(len(row_hashes))]) if load else None
    return StestRun(computed, len(row_hashes) - computed, hvps, resolved, vectors)


def _resolved_lissa(inf: Influence, hessian_data: Any, request: dict, lissa: str | LissaConfig, output_dir: str | os.PathLike,
                    is_main: bool) -> ResolvedLissa:
    """The LiSSA settings of this folder: read back on a rerun (refused if the request changed), else resolved and saved."""
    path = Path(output_dir) / STEST_DIR / CONFIG_FILE
    if path.is_file():
        saved = read_stest_config(output_dir)
        if saved["request"]["hash"] != request["hash"]:
            differing = sorted(k for k in request if k != "hash" and saved["request"].get(k) != request[k])
            raise IncompatibleBasisError(
                f"{path.parent} holds s_test vectors from another configuration (differs in: {', '.join(differing)}). "
                "Use a new --output_dir, or delete that folder to start over."
            )
        return ResolvedLissa(LissaConfig(**saved["lissa"]), None)
    resolved = inf.resolve_lissa(hessian_data, lissa)
    if is_main:
        spectrum = None if resolved.spectrum is None else dataclasses.asdict(resolved.spectrum)
        write_json_artifact(path, {"request": request, "lissa": dataclasses.asdict(resolved.config), "spectrum": spectrum})
    return resolved


def read_stest_config(output_dir: str | os.PathLike) -> dict:
    """``output_dir/s_test/stest_config.json`` (``request``, ``lissa``, ``spectrum``); a damaged one raises
    `DamagedArtifactError` with the way out."""
    path = Path(output_dir) / STEST_DIR / CONFIG_FILE
    what = "the LiSSA settings of an s_test folder"
    remedy = (f"Delete it and rerun the same command: the LiSSA settings are resolved again from the same arguments, "
              f"and the s_test files in {path.parent} are kept.")
    saved = read_json_artifact(path, what, remedy, keys=("request", "lissa"))
    if not isinstance(saved["request"], dict) or "hash" not in saved["request"] or not isinstance(saved["lissa"], dict):
        raise damaged_artifact(path, what, "its 'request' or 'lissa' entry is malformed", remedy)
    return saved


def _unfinished_groups(output_dir: str | os.PathLike, row_hashes: list[str], size: int, request_hash: str) -> list[list[int]]:
    """Fixed groups of test indices with at least one point missing or unreadable."""
    groups = [list(range(s, min(s + size, len(row_hashes)))) for s in range(0, len(row_hashes), size)]
    return [g for g in groups if not all(_is_saved(output_dir, i, row_hashes[i], request_hash) for i in g)]


def _is_saved(output_dir: str | os.PathLike, index: int, row_hash: str, request_hash: str) -> bool:
    if not stest_exists(output_dir, index):
        return False
    try:
        _, metadata = load_stest(output_dir, index)
    except DamagedArtifactError as err:
        logger.warning(f"{err} It will be recomputed now.")
        return False
    if metadata.get("request_hash") != request_hash or metadata.get("row_hash") != row_hash:
        raise IncompatibleBasisError(
            f"{stest_save_path(output_dir, index)} was computed for another test example or configuration. "
            "Use a new --output_dir, or delete the s_test folder to start over."
        )
    return True


def _row_hash(row: dict) -> str:
    numeric = {k: torch.as_tensor(v).tolist() for k, v in sorted(row.items()) if not isinstance(v, str)}
    return hashlib.sha256(json.dumps(numeric).encode()).hexdigest()[:16]
