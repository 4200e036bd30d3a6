"""Sharded, resumable jobs over fixed data partitions.

Rows are cut into fixed partitions of ``shard_size`` rows (partition ``p`` holds rows
``[p·S, (p+1)·S)``), whatever the number of processes. Rank 0 lists the partitions that have no
valid shard file yet (a file that fails its checksum is listed again) and broadcasts the list;
rank ``r`` takes every ``world``-th entry. Each partition is saved as one safetensors file,
atomically (tmp + rename), with the request hash in its metadata and a checksum of the whole file.
Shards live in a folder named after the hash of everything the scores depend on, so results of
different configurations never meet, and a rerun, with any number of processes, computes only
what is missing. A run refuses to start beside an unfinished run of another configuration (a
changed setting would otherwise silently start over), and SIGINT / SIGTERM stop it after the
shard in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .._utils.errors import CorruptShardError, DamagedArtifactError, IncompatibleBasisError, InvalidInputError, NonFiniteError, RunInterrupted
from .._utils.io import (
    check_writable_dir, damaged_artifact, read_json_artifact, read_tensors_artifact, save_tensors, write_json_artifact,
)
from .._utils.memory import release_memory
from .processes import StopRequests, broadcast_from_main, is_main_process, wait_for_everyone

logger = logging.get_logger(__name__)

REQUEST_FILE = "request.json"


def request_hash(request: dict) -> str:
    """SHA-256 of a JSON-ready request (key order does not matter)."""
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """Fixed partitions of ``num_rows`` rows into shards of ``shard_size`` rows, saved under ``folder``.

    Attributes:
        folder (`Path`): ``<root>/<kind>-<first 16 hex digits of the request hash>``.
        num_rows (`int`): rows to score (the partitioned axis).
        shard_size (`int`): rows per partition (the last one may be shorter).
        request (`dict`): everything the scores depend on; hashed into ``request_hash``.
    """

    folder: Path
    num_rows: int
    shard_size: int
    request: dict

    @classmethod
    def create(cls, root: str | os.PathLike, kind: str, request: dict, num_rows: int, shard_size: int,
               rows_of: str = "data") -> "ShardPlan":
        """The plan of a ``kind`` run over ``num_rows`` rows of ``rows_of`` (named in the error when there are none)."""
        if shard_size < 1:
            raise InvalidInputError(f"shard_size must be >= 1 row, got {shard_size}.")
        if num_rows < 1:
            raise InvalidInputError(f"Nothing to score: the {rows_of} has no rows. Pass at least one example.")
        request = {**request, "kind": kind, "num_rows": num_rows, "shard_size": shard_size}
        return cls(Path(root) / f"{kind}-{request_hash(request)[:16]}", num_rows, shard_size, request)

    @property
    def request_hash(self) -> str:
        return request_hash(self.request)

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows))


def shard_save_path(plan: ShardPlan, shard: int) -> Path:
    return plan.folder / f"shard_{shard:05d}.safetensors"


def save_shard(plan: ShardPlan, shard: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one partition's tensors (each ``[rows, ...]``) atomically, with its request hash (the file carries a checksum)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"kind": "influence_shard", "request_hash": plan.request_hash, "shard": shard,
                "rows": [plan.rows(shard).start, plan.rows(shard).stop]}
    save_tensors(shard_save_path(plan, shard), tensors, metadata)


def load_shard(plan: ShardPlan, shard: int) -> dict[str, torch.Tensor]:
    """One partition's tensors, verified; raises `CorruptShardError` naming what is wrong."""
    path = shard_save_path(plan, shard)
    try:
        tensors, metadata = read_tensors_artifact(path, f"score shard {shard}", "Rerunning the same command recomputes it; the other shards are kept.")
    except (DamagedArtifactError, FileNotFoundError) as err:
        raise CorruptShardError(str(err), path=path) from None
    rows = plan.rows(shard)
    expected = {"request_hash": plan.request_hash, "shard": shard, "rows": [rows.start, rows.stop]}
    wrong = [k for k, v in expected.items() if metadata.get(k) != v]
    if wrong:
        raise CorruptShardError(f"{path} belongs to another request or partition (differs in {', '.join(wrong)}).")
    lengths = {name: tensor.shape[0] if tensor.dim() else None for name, tensor in tensors.items()}
    if any(length != len(rows) for length in lengths.values()):
        raise CorruptShardError(f"{path} holds {lengths} rows per tensor, its partition has {len(rows)}.")
    return tensors


def shard_exists(plan: ShardPlan, shard: int) -> bool:
    """Whether partition ``shard`` has a valid file (a corrupt one is reported and counts as missing)."""
    if not shard_save_path(plan, shard).is_file():
        return False
    try:
        load_shard(plan, shard)
    except CorruptShardError as err:
        logger.warning(f"{err} It will be recomputed.")
        return False
    return True


def merge_shards(plan: ShardPlan) -> dict[str, torch.Tensor]:
    """Every partition's tensors, verified and concatenated along the row axis: each ``[num_rows, ...]``."""
    parts = [load_shard(plan, shard) for shard in range(plan.num_shards)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@dataclass
class ShardReport:
    """What one run did: ``computed`` shards (all ranks), ``skipped`` (already saved), ``remaining`` after it."""

    plan: ShardPlan
    computed: list[int]
    skipped: int
    remaining: int
    processes: int

    @property
    def complete(self) -> bool:
        return self.remaining == 0


def compute_shards(
    plan: ShardPlan,
    compute: Callable[[range], dict[str, torch.Tensor]],
    accelerator: Any = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> ShardReport:
    """Compute and save every partition that has no valid shard file; return once all ranks are done.

    Args:
        plan (`ShardPlan`): partitions and folder.
        compute (`Callable`): ``rows -> {name: tensor [len(rows), ...]}`` for one partition.
        accelerator (`accelerate.Accelerator`, *optional*): spreads partitions over its processes.
        max_shards (`int`, *optional*): compute at most this many partitions in this run (all ranks
            together), then stop; a rerun continues.
        progress (`bool`, defaults to `True`): tqdm bar with ETA on the main process.
    """
    if max_shards is not None and max_shards < 1:
        raise InvalidInputError(f"max_shards must be >= 1 (or None for all), got {max_shards}.")
    check_writable_dir(plan.folder.parent, "The shard folder")
    check_no_unfinished_run(plan)  # on every rank, so that all of them stop alike
    pending = broadcast_from_main(_pending_shards(plan) if is_main_process(accelerator) else None, accelerator)
    todo = pending if max_shards is None else pending[:max_shards]
    rank = 0 if accelerator is None else accelerator.process_index
    processes = 1 if accelerator is None else accelerator.num_processes
    mine = todo[rank::processes]
    bar = tqdm(mine, desc=f"{plan.request['kind']} shards", unit="shard", disable=not (progress and is_main_process(accelerator)))
    with StopRequests() as stop:
        for done, shard in enumerate(bar, start=1):
            tensors = _compute_shard(plan, shard, compute)
            if done == 1:
                _write_request(plan)
            save_shard(plan, shard, tensors)
            del tensors
            release_memory()  # freed per-shard buffers go back to the OS at each shard boundary (flat memory in N)
            if stop.received is not None:
                raise RunInterrupted(
                    f"Stopped by {stop.received} after shard {shard}: this process saved {done} of its {len(mine)} shard(s) "
                    f"in {plan.folder}. Rerun the same command to continue; only the missing shards are computed."
                )
    wait_for_everyone(accelerator)
    return ShardReport(plan, todo, plan.num_shards - len(pending), len(pending) - len(todo), processes)


def _compute_shard(plan: ShardPlan, shard: int, compute: Callable[[range], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``compute`` for one partition; a NaN/Inf error names the partition's rows."""
    rows = plan.rows(shard)
    try:
        return compute(rows)
    except NonFiniteError as err:
        raise NonFiniteError(f"Shard {shard} (rows {rows.start}-{rows.stop - 1}): {err}") from None


def _pending_shards(plan: ShardPlan) -> list[int]:
    """Partitions without a valid shard file."""
    return [shard for shard in range(plan.num_shards) if not shard_exists(plan, shard)]


def _write_request(plan: ShardPlan) -> None:
    """``request.json`` beside the shards, written with the first one (a failed start leaves no folder)."""
    request_path = plan.folder / REQUEST_FILE
    if not request_path.is_file():
        write_json_artifact(request_path, {**plan.request, "hash": plan.request_hash})


def check_no_unfinished_run(plan: ShardPlan) -> None:
    """Refuse to start beside an unfinished run of the same kind and another request (its ``request.json``
    tells which settings differ): resuming with a changed setting would silently start over."""
    for request_path in sorted(plan.folder.parent.glob(f"{plan.request['kind']}-*/{REQUEST_FILE}")):
        folder = request_path.parent
        saved = read_request(request_path)
        num_shards = -(-saved["num_rows"] // saved["shard_size"])
        done = len(list(folder.glob("shard_*.safetensors")))
        if folder == plan.folder or done >= num_shards:
            continue
        differing = sorted(k for k in set(saved) | set(plan.request) if k != "hash" and saved.get(k) != plan.request.get(k))
        raise IncompatibleBasisError(
            f"{plan.folder.parent} holds an unfinished {plan.request['kind']} run of another configuration ({folder.name}: "
            f"{done} of {num_shards} shards saved), which differs from this run in: {', '.join(differing)}. To finish "
            f"it, rerun with its settings (in {request_path}); to start this run instead, delete {folder} or use "
            "another output folder."
        )


def read_request(request_path: Path) -> dict:
    """A shard folder's ``request.json``, verified (the checksum of the file, and the request hash it records)."""
    remedy = (f"Delete it and rerun the command: the shards in {request_path.parent} are kept (each carries its own checksum), "
              f"and {REQUEST_FILE} is written again when that configuration runs next.")
    saved = read_json_artifact(request_path, "the request of a sharded run", remedy, keys=("kind", "num_rows", "shard_size", "hash"))
    if saved["hash"] != request_hash({k: v for k, v in saved.items() if k != "hash"}):
        raise damaged_artifact(request_path, "the request of a sharded run", "its settings do not match the hash it records", remedy)
    return saved
