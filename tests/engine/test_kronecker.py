"""Kronecker-structured random projections: the hooked projection equals vmap's gradients times the explicit map
``blockdiag(R_r ⊗ R_c)`` (built here with ``torch.kron``), inner products are preserved in expectation, random
projection in that subspace equals its closed form from the explicit fp64 Hessian, and the index's TracIn equals a scan.
"""

import math

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import InvalidInputError
from hf_influence.data import PaddingCollator
from hf_influence.engine import hooks
from hf_influence.engine.grads import LossFunction, eval_mode, per_example_grad_tensors
from hf_influence.engine.kronecker import KroneckerMap, hook_kronecker, project_kronecker, split_width
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils

KRON_RTOL = 1e-10  # fp64, relative to the largest projected entry
CLOSED_FORM_RTOL = 1e-8  # random projection vs its closed form from the explicit fp64 Hessian, relative to the largest |score|
SEEDS = 2000  # draws of the map for the expectation test
SIGMAS = 5.0  # |mean − target| <= SIGMAS standard errors, entry by entry (a chance failure per entry ~6e-7)

CASES = {  # name: (builder, data, selection kwargs)
    "bert": (utils.tiny_bert, utils.classification_dataset, {}),  # Linear, Embedding (padding_idx), LayerNorm
    "gpt2": (utils.tiny_gpt2, utils.lm_dataset, {}),  # Conv1D, tied wte / lm_head (a parameter reached twice)
    "marian": (utils.tiny_marian, utils.seq2seq_dataset, {}),
}


def explicit_map(kmap: KroneckerMap) -> torch.Tensor:
    """``Φ`` ``[p̄, P]`` from the factors: block diagonal, each block the first ``p_b`` rows of ``R_r ⊗ R_c`` (or ``R``)."""
    blocks = []
    for b in kmap.blocks:
        if b.width == 0:
            blocks.append(torch.zeros(0, b.numel, dtype=torch.float64))
        else:
            blocks.append(b.rows if b.cols is None else torch.kron(b.rows, b.cols)[: b.width])
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("width", ["one per tensor", "400"])
def test_hooked_projection_equals_gradients_times_the_explicit_map(name, width):
    build, make_data, selecting = CASES[name]
    torch.manual_seed(0)
    model = build().double().eval()
    dataset, selection = make_data(6), select_parameters(model, **selecting)
    rank = len(selection.names) if width == "one per tensor" else int(width)
    batch = PaddingCollator()([dataset[i] for i in range(6)])
    assert (batch["attention_mask"] == 0).any()  # padding in play
    loss_fn, params = LossFunction(model, infer_task(model), selection), selection.tensors(model)
    kmap = KroneckerMap.draw(selection.names, selection.shapes, rank, torch.Generator().manual_seed(1), torch.float64)
    phi = explicit_map(kmap)
    assert phi.shape == (rank, selection.num_params) == kmap.shape
    with eval_mode(model):
        reference = selection.flatten(per_example_grad_tensors(loss_fn, params, batch, mode="vmap"), batch_dims=1) @ phi.T
        hooked = hook_kronecker(loss_fn, batch, hooks.hook_plan(loss_fn, params), kmap)
        auto = project_kronecker(loss_fn, params, batch, kmap)  # first use: checks hooks against vmap, then projects by hooks
    scale = float(reference.abs().max())
    assert scale > 0
    assert float((hooked - reference).abs().max()) <= KRON_RTOL * scale
    assert float((auto - reference).abs().max()) <= KRON_RTOL * scale and loss_fn.hooks_ok
    # the operator's other products against the explicit matrix
    x = torch.randn(selection.num_params, 3, dtype=torch.float64)
    y = torch.randn(2, rank, dtype=torch.float64)
    torch.testing.assert_close(kmap @ x, phi @ x, rtol=0, atol=1e-12)
    torch.testing.assert_close(y @ kmap, y @ phi, rtol=0, atol=1e-12)
    torch.testing.assert_close(kmap.dense_rows(0, rank), phi, rtol=0, atol=1e-14)


def test_vmap_fallback_projects_the_same():
    """Where hooks do not apply (T5's RMS norm), per-example gradients from vmap are projected block by block."""
    torch.manual_seed(0)
    model = utils.tiny_t5().double().eval()
    dataset, selection = utils.seq2seq_dataset(4), select_parameters(model)
    batch = PaddingCollator()([dataset[i] for i in range(4)])
    loss_fn, params = LossFunction(model, infer_task(model), selection), selection.tensors(model)
    kmap = KroneckerMap.draw(selection.names, selection.shapes, 90, torch.Generator().manual_seed(2), torch.float64)
    with eval_mode(model):
        ours = project_kronecker(loss_fn, params, batch, kmap)
        reference = selection.flatten(per_example_grad_tensors(loss_fn, params, batch, mode="vmap"), batch_dims=1) @ explicit_map(kmap).T
    assert hooks.hook_plan(loss_fn, params) is None
    assert float((ours - reference).abs().max()) <= KRON_RTOL * float(reference.abs().max())


def test_widths_follow_the_sqrt_rule_and_full_width_is_orthogonal():
    assert split_width([100, 400, 10], 30) == [9, 17, 4]  # 1 each, then 27 ∝ sqrt (10, 20, 3.16): 8.14, 16.28, 2.57
    assert split_width([4, 100], 30) == [4, 26]  # the small one's 1 + 28 · 2/12 exceeds its size: capped, the rest to the other
    assert split_width([3, 5, 7], 15) == [3, 5, 7] and split_width([7, 9, 1000, 3], 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="at least one feature per parameter"):
        split_width([7, 9, 1000, 3], 3)
    shapes = [(5, 4), (4,), (3, 2, 2)]
    kmap = KroneckerMap.draw(["a", "b", "c"], shapes, 36, torch.Generator().manual_seed(0), torch.float64)
    phi = explicit_map(kmap)
    torch.testing.assert_close(phi @ phi.T, torch.eye(36, dtype=torch.float64), rtol=0, atol=1e-12)  # orthogonal at p̄ = P


def test_same_seed_same_map_and_factors_round_trip():
    names, shapes = ["w", "b", "e"], [(12, 7), (12,), (30, 5)]
    draw = lambda seed: KroneckerMap.draw(names, shapes, 25, torch.Generator().manual_seed(seed), torch.float64)  # noqa: E731
    assert torch.equal(explicit_map(draw(3)), explicit_map(draw(3)))
    assert not torch.allclose(explicit_map(draw(3)), explicit_map(draw(4)))
    again = KroneckerMap.from_factors(names, shapes, 25, draw(3).factors())
    assert torch.equal(explicit_map(again), explicit_map(draw(3)))
    with pytest.raises(ValueError, match="factor values"):
        KroneckerMap.from_factors(names, shapes, 26, draw(3).factors())


def test_weighted_inner_products_are_unbiased():
    """``E[Φᵀ diag(w) Φ] = I`` entry by entry over SEEDS draws, within SIGMAS standard errors; the unweighted map is
    visibly biased (so the bound can fail)."""
    names, shapes, rank = ["w", "b", "c"], [(6, 5), (4,), (3, 7)], 12
    total = total_sq = unweighted = 0
    for seed in range(SEEDS):
        kmap = KroneckerMap.draw(names, shapes, rank, torch.Generator().manual_seed(seed), torch.float64)
        phi = explicit_map(kmap)
        m = phi.T @ (kmap.weights.unsqueeze(1) * phi)  # [P, P]
        total, total_sq, unweighted = total + m, total_sq + m * m, unweighted + phi.T @ phi
    mean = total / SEEDS
    stderr = ((total_sq / SEEDS - mean ** 2).clamp(min=0) / SEEDS).sqrt()
    eye = torch.eye(mean.shape[0], dtype=torch.float64)
    assert bool(((mean - eye).abs() <= SIGMAS * stderr + 1e-12).all()), float(((mean - eye).abs() / (stderr + 1e-12)).max())
    assert float((unweighted / SEEDS - eye).abs().max()) > 0.5  # without weights: rank / P on the diagonal, not 1


@pytest.fixture(scope="module")
def kron(bert_oracle):
    oracle = bert_oracle
    model = oracle["inf"].model
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, random_projection="kronecker", progress=False)
    return inf, oracle


def test_kronecker_rank_below_the_tensor_count_is_refused(kron):
    inf, _ = kron
    with pytest.raises(InvalidInputError, match=f"rank must be >= {len(inf.selection.names)}"):
        inf._random_directions(len(inf.selection.names) - 1)


def test_random_projection_equals_its_closed_form(kron):
    inf, oracle = kron
    rank = 60
    ours = inf.scores(oracle["test"], oracle["train"], method="randproj", rank=rank)
    phi = explicit_map(inf._random_directions(rank).to(torch.float64))
    sub = phi @ oracle["hessian"] @ phi.T
    inverse = torch.linalg.inv((sub + sub.T) / 2 + utils.BERT_DAMPING * torch.eye(rank, dtype=torch.float64))
    closed = (oracle["g_test"] @ phi.T) @ inverse @ (oracle["g_train"] @ phi.T).T
    assert float((ours - closed).abs().max()) <= CLOSED_FORM_RTOL * float(closed.abs().max())


def test_random_projection_at_full_width_is_exact(kron):
    """At p̄ = P the map is orthogonal: random projection gives the exact influence (the head: P = 51)."""
    inf, oracle = kron
    head = hfi.Influence(inf.model, params=["classifier"], damping=utils.BERT_DAMPING, random_projection="kronecker", progress=False)
    train, test = oracle["train"], oracle["test"]
    ours = head.scores(test, train, method="randproj", rank=head.selection.num_params)
    exact = head.scores(test, train, method="exact")
    assert float((ours - exact).abs().max()) <= CLOSED_FORM_RTOL * float(exact.abs().max())


def test_subspace_hessian_within_a_small_budget_is_the_same(kron):
    """A budget that holds one row of Φ at a time: one HVP pass per row, the same ``ΦHΦᵀ``."""
    inf, oracle = kron
    kmap = inf._random_directions(len(inf.selection.names) + 5)
    small = hfi.Influence(inf.model, last_n_layers=1, damping=utils.BERT_DAMPING, random_projection="kronecker",
                          memory_budget_gb=4.5 * inf.selection.num_params * 8 / 2**30, progress=False)
    phi = explicit_map(kmap.to(torch.float64))
    for wiring in (inf, small):
        torch.testing.assert_close(wiring._subspace_hessian(oracle["train"], kmap), phi @ oracle["hessian"] @ phi.T, rtol=0,
                                   atol=1e-10 * float(oracle["hessian"].abs().max()))


def test_index_tracin_with_the_kronecker_map_equals_a_full_scan(kron, tmp_path):
    """Full width: the weighted projected dot product is the gradient dot product; partial width: the weighted
    projected dot product computed here; both through a saved and reloaded index."""
    inf, oracle = kron
    train, test = oracle["train"], oracle["test"]
    full = inf.scores(test, train, method="tracin")
    for rank in (inf.selection.num_params, 40):
        inf.build_index(train, method="tracin", rank=rank).save(tmp_path / str(rank))
        store = hfi.InfluenceIndex.load(tmp_path / str(rank))
        assert store.directions.dim() == 1 and store.request["random_projection"] == "kronecker"
        kmap = inf._random_directions(rank).to(torch.float64)
        phi = explicit_map(kmap)
        expected = full if rank == inf.selection.num_params else \
            (oracle["g_test"] @ phi.T) @ (kmap.weights.unsqueeze(1) * (phi @ oracle["g_train"].T))
        top = inf.query(store, test, k=5, direction="abs")
        key = expected.abs().topk(5, dim=1).indices
        assert torch.equal(top.indices, key)
        torch.testing.assert_close(top.scores.double(), expected.gather(1, key), rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_randproj_index_with_the_kronecker_map_equals_scores(kron):
    inf, oracle = kron
    store = inf.build_index(oracle["train"], method="randproj", rank=30)
    full = inf.scores(oracle["test"], oracle["train"], method="randproj", rank=30)
    top = inf.query(store, oracle["test"], k=5)
    assert torch.equal(top.indices, full.topk(5, dim=1).indices)
    assert math.isclose(float(top.scores.max()), float(full.max()), rel_tol=1e-5)


def test_knn_restriction_with_the_kronecker_map(kron):
    """FastIF's kNN restriction lifts the preconditioned test features back to parameter space (``Y Φ``) for its
    head-gradient queries; the candidates' scores are the full scan's at those rows."""
    inf, oracle = kron
    train, test = oracle["train"], oracle["test"]
    full = inf.scores(test, train, method="randproj", rank=30)
    restricted = inf.scores(test, train, method="randproj", rank=30, knn=7)
    assert restricted.indices.shape == (len(test), 7)
    torch.testing.assert_close(restricted.scores, full.gather(1, restricted.indices), rtol=0, atol=1e-10 * float(full.abs().max()))
