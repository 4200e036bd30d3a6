"""Fuzzing every artifact the library reads back: each file is cut at a random offset or has one random
byte changed, and its reader must either return exactly what was written (a change to whitespace, say)
or raise `DamagedArtifactError`, never another exception and never different content. The checksums
make the second half hold: no single changed byte goes unnoticed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_influence._utils.errors import DamagedArtifactError
from hf_influence.cli.outputs import RUN_CONFIG, read_run_config, update_run_config
from hf_influence.engine.ihvp.arnoldi import ArnoldiBasis, basis_save_path, load_basis
from hf_influence.engine.ihvp.lissa import LissaConfig
from hf_influence.jobs.shards import REQUEST_FILE, ShardPlan, _write_request, load_shard, read_request, save_shard, shard_save_path
from hf_influence.jobs.stest import CONFIG_FILE, STEST_DIR, load_stest, read_stest_config, save_stest, stest_save_path
from hf_influence._utils.io import write_json_artifact
from hf_influence.recipes.noise import NoiseRecord

faiss = pytest.importorskip("faiss")
from hf_influence.knn.index import KnnIndex, index_embeddings, index_save_path, load_index  # noqa: E402

EXAMPLES = 30  # per artifact kind (a flip of the lowest bit is also tried at every offset)


@dataclasses.dataclass
class Artifact:
    """A file as written, the function that reads it back, and what that function returned before any damage."""

    path: Path
    read: Callable[[], Any]
    original: bytes = b""
    content: Any = None


def _basis(root: Path) -> Artifact:
    basis = ArnoldiBasis(torch.randn(3, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64), ["w", "b"], [[2, 4], [2]], 6,
                         "f" * 64, "TinyModel", "fisher")
    basis.save(root)
    return Artifact(basis_save_path(root), lambda: dataclasses.asdict(load_basis(root)))


def _knn_index(root: Path) -> Artifact:
    index, index_type, probes = index_embeddings(torch.randn(12, 4), "l2")
    KnnIndex(index, "l2", index_type, "classifier_input", "a" * 64, "TinyModel", "d" * 16, probes).save(root)

    def read() -> dict:
        loaded = load_index(root)
        fields = {f.name: getattr(loaded, f.name) for f in dataclasses.fields(loaded) if f.name not in ("index", "embed_fn")}
        return {**fields, "faiss": bytes(faiss.serialize_index(loaded.index))}
    return Artifact(index_save_path(root), read)


def _plan(root: Path) -> ShardPlan:
    return ShardPlan.create(root, "self_influence", {"model_fingerprint": "e" * 64, "damping": 1e-3}, num_rows=7, shard_size=3)


def _shard(root: Path) -> Artifact:
    plan = _plan(root)
    save_shard(plan, 1, {"value": torch.arange(3, dtype=torch.float64) / 7, "pair": torch.ones(3, 2, dtype=torch.bfloat16)})
    return Artifact(shard_save_path(plan, 1), lambda: load_shard(plan, 1))


def _request(root: Path) -> Artifact:
    plan = _plan(root)
    _write_request(plan)
    return Artifact(plan.folder / REQUEST_FILE, lambda: read_request(plan.folder / REQUEST_FILE))


def _stest(root: Path) -> Artifact:
    save_stest(root, 4, torch.randn(9), {"request_hash": "c" * 64, "row_hash": "0123456789abcdef"})
    return Artifact(stest_save_path(root, 4), lambda: load_stest(root, 4))


def _stest_config(root: Path) -> Artifact:
    lissa = dataclasses.asdict(LissaConfig(scale=12.5, steps=100, repeats=2))
    write_json_artifact(root / STEST_DIR / CONFIG_FILE, {"request": {"seed": 0, "hash": "9" * 64}, "lissa": lissa, "spectrum": None})
    return Artifact(root / STEST_DIR / CONFIG_FILE, lambda: read_stest_config(root))


def _run_config(root: Path) -> Artifact:
    update_run_config(root, "score", {"fingerprint": "7" * 64, "class": "TinyModel"}, [], {"top_k": [3, 1], "spearman": 0.25})
    return Artifact(root / RUN_CONFIG, lambda: read_run_config(root))


def _noise(root: Path) -> Artifact:
    NoiseRecord("label_flip", "label", 0.25, 3, 8, [1, 5]).save(root / "noise.json")
    return Artifact(root / "noise.json", lambda: NoiseRecord.load(root / "noise.json"))


KINDS = {"arnoldi_basis": _basis, "knn_index": _knn_index, "score_shard": _shard, "request_json": _request, "s_test": _stest,
         "stest_config_json": _stest_config, "influence_config_json": _run_config, "noise_record": _noise}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Artifact]:
    made = {}
    for kind, make in KINDS.items():
        artifact = make(tmp_path_factory.mktemp(kind))
        artifact.original, artifact.content = artifact.path.read_bytes(), artifact.read()
        made[kind] = artifact
    return made


def _same(a: Any, b: Any) -> bool:
    """Exact equality, tensors included (dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return type(a) is type(b) and _same(dataclasses.asdict(a), dataclasses.asdict(b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@st.composite
def damages(draw, size: int) -> bytes | tuple[int, int]:
    """A cut (keep the first ``n < size`` bytes) or one byte XORed with a non-zero value."""
    if draw(st.booleans()):
        return draw(st.integers(0, size - 1)), 0
    return draw(st.integers(0, size - 1)), draw(st.integers(1, 255))


def _damage(original: bytes, damage: tuple[int, int]) -> bytes:
    offset, xor = damage
    if xor == 0:
        return original[:offset]
    data = bytearray(original)
    data[offset] ^= xor
    return bytes(data)


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_a_damaged_artifact_reads_back_intact_or_raises_the_typed_error(artifacts, kind, data):
    artifact = artifacts[kind]
    damage = data.draw(damages(len(artifact.original)))
    artifact.path.write_bytes(_damage(artifact.original, damage))
    try:
        content = artifact.read()
    except DamagedArtifactError as err:
        assert str(artifact.path) in str(err) and err.path == artifact.path
    else:
        assert _same(content, artifact.content), f"{kind}: damage {damage} went unnoticed"
    finally:
        artifact.path.write_bytes(artifact.original)



@pytest.mark.parametrize("kind", list(KINDS))
def test_every_byte_with_its_lowest_bit_flipped_is_caught_or_harmless(artifacts, kind):
    """Exhaustive where the search samples: each byte of the file in turn, lowest bit flipped (the marks' own key
    names included, which would otherwise make a file look like one written before checksums existed)."""
    artifact = artifacts[kind]
    unnoticed, caught = [], 0
    try:
        for offset in range(len(artifact.original)):
            artifact.path.write_bytes(_damage(artifact.original, (offset, 0x01)))
            try:
                content = artifact.read()
            except DamagedArtifactError:
                caught += 1
                continue
            if not _same(content, artifact.content):
                unnoticed.append(offset)
    finally:
        artifact.path.write_bytes(artifact.original)
    assert unnoticed == [] and caught > 0.9 * len(artifact.original)
