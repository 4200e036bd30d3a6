"""Process start-up, and sharded, resumable scoring over fixed data partitions.

Rows are cut into fixed partitions of ``shard_size`` rows (partition ``p`` holds rows
``[p·S, (p+1)·S)``), whatever the number of processes. Rank 0 lists the partitions that have no
valid shard file yet (a file that fails its checksum is listed again) and broadcasts the list;
rank ``r`` takes every ``world``-th entry. Each partition is saved as one safetensors file,
atomically (tmp + rename), with the request hash and a checksum of its tensors in the metadata.
Shards live in a folder named after the hash of everything the scores depend on, so results of
different configurations never meet, and a rerun, with any number of processes, computes only
what is missing. A run refuses to start beside an unfinished run of another configuration (a
changed setting would otherwise silently start over), and SIGINT / SIGTERM stop it after the
shard in progress.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ._utils.errors import CorruptShardError, IncompatibleBasisError, InvalidInputError, NonFiniteError, RunInterrupted
from ._utils.io import atomic_path, check_writable_dir, load_tensors, save_tensors
from .data import dataset_fingerprint
from .engine.ihvp.arnoldi import ArnoldiBasis
from .influence import Influence, Method
from .knn import KnnScores, build_index, check_num_neighbors, dataset_of, select_rows

logger = logging.get_logger(__name__)

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} -m hf_influence.cli.main ..."
SHARDED_METHODS = (Method.ARNOLDI, Method.TRACIN)
REQUEST_FILE = "request.json"


def start_processes():
    """An ``Accelerator`` when launched with ``WORLD_SIZE > 1`` (CPU/gloo without CUDA), else ``None``.

    Refuses the silent CPU trap: ``WORLD_SIZE > 1`` in the environment but a world of one process
    (e.g. ``accelerate launch --cpu --num_processes 2``, which starts a single process).
    """
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected <= 1:
        return None
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    check_world(accelerator, expected)
    return accelerator


def check_world(accelerator: Any, expected: int) -> None:
    """Raise if ``accelerator`` does not span the ``expected`` processes the launcher announced."""
    if accelerator.num_processes != expected:
        raise InvalidInputError(
            f"WORLD_SIZE={expected} but this run has {accelerator.num_processes} process(es): the processes did not "
            f"join one group, so each would redo all the work. On CPU launch with `{CPU_LAUNCH.format(n=expected)}` "
            f"or `torchrun --nproc_per_node {expected} -m hf_influence.cli.main ...`; on GPUs `accelerate launch "
            f"--multi_gpu --num_processes {expected} ...`."
        )


# ----------------------------------------------------------------------------- process helpers
def is_main_process(accelerator: Any = None) -> bool:
    return accelerator is None or accelerator.is_main_process


def wait_for_everyone(accelerator: Any = None) -> None:
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def broadcast_from_main(value: Any, accelerator: Any = None) -> Any:
    """Rank 0's ``value`` on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


# ----------------------------------------------------------------------------- shards on disk
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


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_save_path(plan: ShardPlan, shard: int) -> Path:
    return plan.folder / f"shard_{shard:05d}.safetensors"


def save_shard(plan: ShardPlan, shard: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one partition's tensors (each ``[rows, ...]``) atomically, with request hash and checksum."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"kind": "influence_shard", "request_hash": plan.request_hash, "shard": shard,
                "rows": [plan.rows(shard).start, plan.rows(shard).stop], "checksum": tensors_checksum(tensors)}
    save_tensors(shard_save_path(plan, shard), tensors, metadata)


def load_shard(plan: ShardPlan, shard: int) -> dict[str, torch.Tensor]:
    """One partition's tensors, verified; raises `CorruptShardError` naming what is wrong."""
    path = shard_save_path(plan, shard)
    try:
        tensors, metadata = load_tensors(path)
    except Exception as err:  # missing, truncated, not safetensors: every reader error means "recompute it"
        raise CorruptShardError(f"{path} cannot be read ({type(err).__name__}: {err}).") from None
    rows = plan.rows(shard)
    expected = {"request_hash": plan.request_hash, "shard": shard, "rows": [rows.start, rows.stop]}
    wrong = [k for k, v in expected.items() if metadata.get(k) != v]
    if wrong:
        raise CorruptShardError(f"{path} belongs to another request or partition (differs in {', '.join(wrong)}).")
    if metadata.get("checksum") != tensors_checksum(tensors):
        raise CorruptShardError(f"{path} fails its checksum: its contents changed after it was written.")
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


# ----------------------------------------------------------------------------- running shards
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
        with atomic_path(request_path) as tmp:
            tmp.write_text(json.dumps({**plan.request, "hash": plan.request_hash}, indent=2, sort_keys=True))


def check_no_unfinished_run(plan: ShardPlan) -> None:
    """Refuse to start beside an unfinished run of the same kind and another request (its ``request.json``
    tells which settings differ): resuming with a changed setting would silently start over."""
    for request_path in sorted(plan.folder.parent.glob(f"{plan.request['kind']}-*/{REQUEST_FILE}")):
        folder = request_path.parent
        saved = json.loads(request_path.read_text())
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


class StopRequests:
    """Within the block, SIGINT / SIGTERM are recorded in ``received`` (the signal's name) instead of
    stopping the process, so that a loop can stop after its current step; a second signal stops at
    once. Previous handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.received = signal.Signals(signum).name
        logger.warning(f"{self.received} received: stopping after the shard in progress (send it again to stop at once).")


# ----------------------------------------------------------------------------- scoring jobs
@dataclass
class ShardedScores:
    """A sharded scoring run: its ``report`` and, when every shard is saved, the merged ``scores``.

    ``scores`` is a ``[N]`` tensor (self-influence), a ``[n_test, n_train]`` tensor (pairwise) or a
    `KnnScores` (``knn=k``); ``None`` while shards are missing (``max_shards`` stopped the run).
    """

    report: ShardReport
    scores: torch.Tensor | KnnScores | None


def sharded_method(method: str | Method) -> Method:
    """``method`` as a `Method` if sharded scoring supports it: one preconditioner serves every shard."""
    if method not in [m.value for m in SHARDED_METHODS]:  # a str-enum Method compares equal to its value
        raise InvalidInputError(
            f"Sharded scoring supports the methods {[m.value for m in SHARDED_METHODS]}, got {method!r}: exact, LiSSA "
            "and random projection rebuild their preconditioner for every shard. Use Influence.scores(...) in Python "
            "for those, or `hf-influence stest` for LiSSA."
        )
    return Method(method)


def check_sharded_method(method: str | Method, basis: ArnoldiBasis | None) -> Method:
    """:func:`sharded_method`, and Arnoldi only with a fitted basis."""
    method = sharded_method(method)
    if method is Method.ARNOLDI and basis is None:
        raise InvalidInputError("method='arnoldi' needs a fitted basis: fit one first (`hf-influence fit`, or trainer.fit_influence()).")
    return method


def scoring_request(inf: Influence, method: Method, basis: ArnoldiBasis | None, **data: Any) -> dict:
    """Everything sharded scores depend on: model weights, selection, method, basis and data contents."""
    if basis is not None:
        described = inf.selection.describe()
        basis.check_compatible(described["names"], described["shapes"], inf.selection.fingerprint(inf.model), type(inf.model).__name__)
    return {
        "method": method.value, "model_class": type(inf.model).__name__, "model_fingerprint": inf.selection.fingerprint(inf.model),
        "param_names": list(inf.selection.names), "basis": None if basis is None else basis_fingerprint(basis),
        **{f"{name}_data": None if value is None else dataset_fingerprint(value) for name, value in data.items()},
    }


def basis_fingerprint(basis: ArnoldiBasis) -> str:
    """SHA-256 over the eigenpairs and damping of ``basis``."""
    return tensors_checksum({"eigenvalues": basis.eigenvalues, "eigenvectors": basis.eigenvectors,
                             "damping": torch.tensor(float(basis.damping), dtype=torch.float64)})


def sharded_self_influence(
    inf: Influence,
    train_data: Any,
    root: str | os.PathLike,
    method: str | Method = Method.ARNOLDI,
    basis: ArnoldiBasis | None = None,
    shard_size: int = 256,
    accelerator: Any = None,
    max_shards: int | None = None,
    merge: bool = True,
    progress: bool = True,
) -> ShardedScores:
    """``inf.self_influence`` of ``train_data`` partition by partition, saved under ``root``, resumable.

    Args:
        inf (`Influence`): the facade; its own ``progress`` flag governs the per-batch bars inside a shard.
        train_data (`datasets.Dataset` or `DataLoader`): scored in row order.
        root (`str` or `os.PathLike`): folder that holds one sub-folder per request.
        method (`str`, defaults to `"arnoldi"`): ``"arnoldi"`` (needs ``basis``) or ``"tracin"``.
        shard_size (`int`, defaults to `256`): rows per partition.
        accelerator (`accelerate.Accelerator`, *optional*): spreads partitions over processes.
        max_shards (`int`, *optional*): stop after this many new partitions (all ranks together).
        merge (`bool`, defaults to `True`): merge the shards on this rank once all are saved.
        progress (`bool`, defaults to `True`): a bar over the shards, with ETA, on the main process.

    Returns:
        `ShardedScores` whose ``scores`` is ``[N]`` (fp32, fp64 for fp64 models; high = likely noisy).
    """
    method = check_sharded_method(method, basis)
    inf.check_data(**{"training data": train_data})
    plan = ShardPlan.create(root, "self_influence", scoring_request(inf, method, basis, train=train_data),
                            len(dataset_of(train_data)), shard_size, "training data")

    def compute(rows: range) -> dict[str, torch.Tensor]:
        return {"self_influence": inf.self_influence(select_rows(train_data, list(rows)), method=method, basis=basis)}

    report = compute_shards(plan, compute, accelerator, max_shards, progress)
    scores = merge_shards(plan)["self_influence"] if merge and report.complete else None
    return ShardedScores(report, scores)


def sharded_scores(
    inf: Influence,
    test_data: Any,
    train_data: Any,
    root: str | os.PathLike,
    method: str | Method = Method.ARNOLDI,
    basis: ArnoldiBasis | None = None,
    knn: int | None = None,
    shard_size: int = 256,
    accelerator: Any = None,
    max_shards: int | None = None,
    merge: bool = True,
    progress: bool = True,
    knn_embedding: str | None = None,
    knn_metric: str | None = None,
) -> ShardedScores:
    """``inf.scores(test_data, train_data, knn=knn)`` in partitions saved under ``root``, resumable.

    Without ``knn`` the training rows are partitioned and each shard holds ``[rows, n_test]``
    scores (the test features are recomputed for every shard: keep shards large next to the test
    set); with ``knn=k`` the test rows are partitioned (each shard holds the ``[rows, k]`` scores
    and candidate indices), and every rank builds the same exact kNN index once, over
    ``knn_embedding`` with ``knn_metric`` (see `hf_influence.knn.build_index`; defaults: FastIF's
    classifier input with L2). Other arguments as in :func:`sharded_self_influence`.

    Returns:
        `ShardedScores` whose ``scores`` is ``[n_test, n_train]`` (``g_testᵀ (H + λI)^-1 g_train``,
        positive = the training example helps) or a `KnnScores` with ``knn=k``.
    """
    method = check_sharded_method(method, basis)
    inf.check_data(**{"training data": train_data, "test data": test_data})
    if knn is not None:
        check_num_neighbors(knn, len(dataset_of(train_data)))
    request = {**scoring_request(inf, method, basis, train=train_data, test=test_data), "knn": knn}
    if knn is None:
        plan = ShardPlan.create(root, "scores", request, len(dataset_of(train_data)), shard_size, "training data")

        def compute(rows: range) -> dict[str, torch.Tensor]:
            return {"scores": inf.scores(test_data, select_rows(train_data, list(rows)), method=method, basis=basis).T}
    else:
        request.update(knn_embedding=knn_embedding, knn_metric=knn_metric)
        plan = ShardPlan.create(root, "knn_scores", request, len(dataset_of(test_data)), shard_size, "test data")

        @functools.cache
        def knn_index() -> Any:  # built on the first shard this rank computes, then reused
            return build_index(inf.model, train_data, knn_embedding, knn_metric, batch_size=inf.batch_size, progress=False)

        def compute(rows: range) -> dict[str, torch.Tensor]:
            found = inf.scores(select_rows(test_data, list(rows)), train_data, method=method, basis=basis, knn=knn, index=knn_index())
            return {"scores": found.scores, "indices": found.indices}

    report = compute_shards(plan, compute, accelerator, max_shards, progress)
    if not (merge and report.complete):
        return ShardedScores(report, None)
    merged = merge_shards(plan)
    return ShardedScores(report, merged["scores"].T if knn is None else KnnScores(merged["scores"], merged["indices"]))
