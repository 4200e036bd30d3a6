"""The influence index answers exactly what a full scan answers: same top-k rows, same scores (float32 storage).

Oracle: `Influence.scores` over every training row (itself checked against the explicit fp64 Hessian in
tests/engine), on the trained float64 tiny BERT; TracIn on a projected gradient against the projected
gradient dot product computed here from per-example gradients.
"""

import copy

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import DamagedArtifactError, InvalidInputError, StaleIndexError
from hf_influence.index import InfluenceIndex, TopInfluences, search
from hf_influence.index.store import INDEX_FILE
from tests import utils

FEATURE_RTOL = 1e-5  # float32 storage and FAISS's float32 inner products vs the fp64 scan, relative to the largest |score|
FP16_RTOL = 2e-3  # float16 storage: about 3 significant digits
K = 6
RANK = 8
DIRECTIONS = ("helpful", "harmful", "abs")


def full_topk(full: torch.Tensor, k: int, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    key = {"helpful": full, "harmful": -full, "abs": full.abs()}[direction]
    indices = key.topk(k, dim=1).indices
    return full.gather(1, indices), indices


def assert_exact(top: TopInfluences, full: torch.Tensor, direction: str, rtol: float = FEATURE_RTOL) -> None:
    scores, indices = full_topk(full, top.indices.shape[1], direction)
    assert torch.equal(top.indices, indices), f"{direction}: index rows {top.indices.tolist()} vs full scan {indices.tolist()}"
    torch.testing.assert_close(top.scores.double(), scores, rtol=0, atol=rtol * float(full.abs().max()))


@pytest.fixture(scope="module")
def setup(trained_bert):
    model, train, test = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    bases = {"hessian": inf.fit_arnoldi(train, rank=RANK, iterations=30), "fisher": inf.fit_fisher(train, rank=RANK)}
    return {"inf": inf, "model": model, "train": train, "test": test, "bases": bases}


@pytest.mark.parametrize("method,curvature", [("arnoldi", "hessian"), ("arnoldi", "fisher"), ("randproj", None)])
def test_query_equals_full_scan_topk(setup, method, curvature):
    inf, train, test = setup["inf"], setup["train"], setup["test"]
    basis = setup["bases"].get(curvature)
    store = inf.build_index(train, method=method, basis=basis, rank=RANK)
    assert store.features.dtype == torch.float32 and store.memory_bytes == len(train) * RANK * 4
    full = inf.scores(test, train, method=method, basis=basis, rank=RANK)  # [n_test, n_train]
    for direction in DIRECTIONS:
        assert_exact(inf.query(store, test, k=K, direction=direction), full, direction)


def test_damping_is_applied_at_query_time(setup):
    """One index serves any damping: built under one Influence, queried under another, equal to the latter's full scan."""
    train, test, basis = setup["train"], setup["test"], setup["bases"]["hessian"]
    damped = hfi.Influence(setup["model"], last_n_layers=1, damping=1.0, batch_size=16, progress=False)
    for method, options in (("arnoldi", {"basis": basis}), ("randproj", {"rank": RANK})):
        store = setup["inf"].build_index(train, method=method, **options)
        assert_exact(damped.query(store, test, k=K), damped.scores(test, train, method=method, **options), "helpful")


def test_tracin_is_the_projected_gradient_dot_product(setup):
    inf, train, test = setup["inf"], setup["train"], setup["test"]
    store = inf.build_index(train, method="tracin", rank=RANK)
    q = store.directions.to(torch.float64)  # [p̄, P], orthonormal rows
    g_test, g_train = utils.collect_grads(inf, test), utils.collect_grads(inf, train)
    projected = (inf.selection.num_params / RANK) * (g_test @ q.T) @ (g_train @ q.T).T  # unbiased for g_testᵀ g_train
    assert torch.allclose(q @ q.T, torch.eye(RANK, dtype=torch.float64), atol=1e-10)
    for direction in DIRECTIONS:
        assert_exact(inf.query(store, test, k=K, direction=direction), projected, direction)


def test_tracin_with_a_full_rank_projection_is_tracin(setup):
    """With p̄ = P the projection is a rotation, so the index gives exactly `scores(method="tracin")`."""
    inf = hfi.Influence(setup["model"], params=["classifier"], batch_size=16, progress=False)
    train, test = setup["train"], setup["test"]
    store = inf.build_index(train, method="tracin", rank=inf.selection.num_params)
    assert_exact(inf.query(store, test, k=K, direction="abs"), inf.scores(test, train, method="tracin"), "abs")


def test_float16_storage_keeps_the_ranking(setup, capsys):
    inf, train, test, basis = setup["inf"], setup["train"], setup["test"], setup["bases"]["hessian"]
    store = inf.build_index(train, basis=basis, dtype="float16")
    assert store.features.dtype == torch.float16 and store.memory_bytes == len(train) * RANK * 2
    full = inf.scores(test, train, basis=basis)
    top = inf.query(store, test, k=K)
    true_scores, true_indices = full_topk(full, K, "helpful")
    overlap = (top.indices.unsqueeze(2) == true_indices.unsqueeze(1)).any(2).double().mean()
    with capsys.disabled():
        print(f"\nfloat16 index: top-{K} overlap with the full scan {overlap:.3f}")
    # the scores it reports are the rows' true scores up to float16 rounding, and no better row was missed by more than that
    torch.testing.assert_close(top.scores.double(), full.gather(1, top.indices), rtol=0, atol=FP16_RTOL * float(full.abs().max()))
    assert (true_scores[:, -1] - top.scores[:, -1].double() <= FP16_RTOL * float(full.abs().max())).all()


def test_save_load_round_trip_and_resume(setup, tmp_path):
    """A build stopped after one shard resumes to the same index as a fresh in-memory build; load verifies every shard."""
    from hf_influence.index import build_index

    inf, train, test, basis = setup["inf"], setup["train"], setup["test"], setup["bases"]["hessian"]
    fresh = inf.build_index(train, basis=basis)
    folder = tmp_path / "index"
    first = build_index(inf, train, basis=basis, output_dir=folder, shard_size=16, max_shards=1, progress=False)
    assert first.index is None and first.report.remaining == 2 and len(first.report.computed) == 1
    with pytest.raises(FileNotFoundError, match="build was stopped"):
        InfluenceIndex.load(folder)
    second = build_index(inf, train, basis=basis, output_dir=folder, shard_size=16, progress=False)
    assert second.report.skipped == 1 and len(second.report.computed) == 2
    loaded = InfluenceIndex.load(folder)
    assert torch.equal(loaded.features, fresh.features) and loaded.request == fresh.request
    assert torch.equal(inf.query(loaded, test, k=K).indices, inf.query(fresh, test, k=K).indices)
    fresh.save(tmp_path / "saved", shard_size=10)
    assert torch.equal(InfluenceIndex.load(tmp_path / "saved").features, fresh.features)
    build_index(inf, train, method="tracin", rank=RANK, output_dir=folder, shard_size=16, progress=False)  # replaces it
    assert InfluenceIndex.load(folder).method.value == "tracin" and len(list(folder.glob("index_features-*"))) == 1


def test_stale_or_foreign_index_is_refused(setup, tmp_path):
    inf, train, test, basis = setup["inf"], setup["train"], setup["test"], setup["bases"]["hessian"]
    store = inf.build_index(train, basis=basis)
    changed = copy.deepcopy(setup["model"])
    with torch.no_grad():
        changed.classifier.bias.add_(0.1)
    stale = hfi.Influence(changed, last_n_layers=1, progress=False)
    with pytest.raises(StaleIndexError, match="model weights"):
        stale.query(store, test, k=K)
    changed_later = copy.deepcopy(setup["model"])  # passes once, then its weights change in place: refused
    later = hfi.Influence(changed_later, last_n_layers=1, damping=utils.BERT_DAMPING, progress=False)
    later.query(store, test, k=K)
    with torch.no_grad():
        changed_later.classifier.weight.mul_(1.01)
    with pytest.raises(StaleIndexError, match="model weights"):
        later.query(store, test, k=K)
    other_selection = hfi.Influence(setup["model"], params=["classifier"], progress=False)
    with pytest.raises(StaleIndexError, match="parameter selection"):
        other_selection.query(store, test, k=K)
    with pytest.raises(StaleIndexError, match="training data"):
        inf.query(store, test, k=K, train_data=train.select(range(40)))
    with pytest.raises(InvalidInputError, match="k must be"):
        inf.query(store, test, k=len(train) + 1)
    with pytest.raises(InvalidInputError, match="needs a fitted basis"):
        inf.build_index(train, method="arnoldi")
    store.save(tmp_path / "index")
    manifest = tmp_path / "index" / INDEX_FILE
    manifest.write_text(manifest.read_text().replace('"arnoldi"', '"tracin"'))
    with pytest.raises(DamagedArtifactError, match="checksum"):
        InfluenceIndex.load(tmp_path / "index")


def synthetic_index(rows: int, dim: int, seed: int = 0) -> InfluenceIndex:
    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return InfluenceIndex(features, torch.zeros(0), torch.zeros(0), {"method": "tracin"})


@pytest.mark.parametrize("k", [1, 5, 40])
def test_search_directions_match_brute_force(k):
    """Including k = N, where "abs" merges two full lists holding every row twice."""
    store, queries = synthetic_index(40, 6), torch.randn(7, 6)
    full = queries @ store.features.T
    for direction in DIRECTIONS:
        assert_exact(search(store, queries, k, direction), full.double(), direction)


def test_approximate_search_recall():
    store, queries = synthetic_index(3000, 16), torch.randn(20, 16)
    exact = search(store, queries, 10).indices
    approximate = search(store, queries, 10, approximate=True, threshold=1000).indices
    recall = (approximate.unsqueeze(2) == exact.unsqueeze(1)).any(2).double().mean()
    assert "hnsw" in store._searchers and recall >= 0.9


def test_a_killed_build_resumes_and_a_damaged_shard_is_recomputed(setup, tmp_path):
    """What a SIGKILL can leave (a half-written temporary file, no manifest) and a shard damaged since: the rerun
    recomputes only the damaged shard and gives the same index; loading a damaged complete index names the file."""
    from hf_influence.index import build_index

    inf, train, basis = setup["inf"], setup["train"], setup["bases"]["hessian"]
    folder = tmp_path / "index"
    build_index(inf, train, basis=basis, output_dir=folder, shard_size=16, progress=False)
    reference = InfluenceIndex.load(folder).features
    shards = sorted(folder.glob("index_features-*/shard_*.safetensors"))
    shards[1].write_bytes(shards[1].read_bytes()[:-40])  # cut short
    with pytest.raises(DamagedArtifactError, match="shard_00001"):
        InfluenceIndex.load(folder)
    (folder / INDEX_FILE).unlink()
    (shards[2].parent / f".{shards[2].name}.0123456789ab.tmp").write_bytes(b"half a file")  # a write killed mid-way
    kept = {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]}
    rerun = build_index(inf, train, basis=basis, output_dir=folder, shard_size=16, progress=False)
    assert rerun.report.computed == [1] and torch.equal(rerun.index.features, reference)
    assert kept == {p.name: p.stat().st_mtime_ns for p in shards if p != shards[1]}
