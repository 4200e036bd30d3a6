"""The peer comparison is apples to apples: on a tiny model, each library's exact / naive influence
equals ours once its damping and score scale are converted (``benchmarks/_peers/adapters.py``).

Slow, and skipped unless captum, dattri and kronfluence are installed (``.venv-peers``, see
``benchmarks/peers.py``): ``.venv-peers/bin/python -m pytest -m slow tests/test_peers.py``.
"""

import pytest
import torch

from tests import utils

pytestmark = pytest.mark.slow

PEARSON_FLOOR = 0.999  # the bar: each library's exact/naive influence vs ours
SCALE_RTOL = 1e-3  # converted scales agree too (least-squares slope of theirs on ours within 1 ± this)
EKFAC_SIGN_FLOOR = 0.5  # EK-FAC (true Fisher, Kronecker-factored) is not exact influence, but with our sign it tracks it
HEAD = [r"^bert\.pooler\.", r"^classifier\."]  # whole nn.Linear modules: every library can restrict to them


@pytest.fixture(scope="module")
def problem():
    pytest.importorskip("captum")
    pytest.importorskip("dattri")
    pytest.importorskip("kronfluence")
    from benchmarks._peers.common import Problem, pad_to_length, select_names

    model, train, test = utils.train_tiny_bert()
    model.set_attn_implementation("eager")  # captum's double backward and dattri's forward mode avoid the SDPA kernel
    names = select_names(model, HEAD)
    return Problem(model, names, damping=utils.BERT_DAMPING, batch_size=16), pad_to_length(train, 16), pad_to_length(test, 16)


@pytest.fixture(scope="module")
def ours(problem):
    problem, train, test = problem
    inf = problem.influence()
    return {"exact": inf.scores(test, train, method="exact"), "exact_self": inf.self_influence(train, method="exact"),
            "tracin": inf.scores(test, train, method="tracin")}


def assert_same(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    from benchmarks._peers.common import pearson

    theirs, ours = theirs.double().flatten(), ours.double().flatten()
    assert pearson(theirs, ours) >= PEARSON_FLOOR
    slope = float(theirs @ ours / (ours @ ours))
    assert abs(slope - 1) <= SCALE_RTOL, f"scale differs: theirs ≈ {slope:.6f} × ours"


def test_captum_naive_matches_exact(problem, ours):
    from benchmarks._peers import adapters

    problem, train, test = problem
    naive = adapters.captum_naive(problem, train, train)
    assert_same(adapters.captum_scores(naive, test, train), ours["exact"])
    assert_same(adapters.captum_self_influence(naive, train), ours["exact_self"])


def test_dattri_explicit_matches_exact(problem, ours):
    from benchmarks._peers import adapters

    problem, train, test = problem
    explicit = adapters.dattri_explicit(problem, train)  # it rebuilds the explicit Hessian per batch pair: one batch each
    assert_same(adapters.dattri_scores(explicit, test, train, len(train)), ours["exact"])
    assert_same(adapters.dattri_self_influence(explicit, train, len(train)), ours["exact_self"])


def test_kronfluence_identity_matches_gradient_products(problem, ours):
    """kronfluence has no exact Hessian; its "identity" strategy is the plain gradient product (our TracIn)."""
    from benchmarks._peers import adapters

    problem, train, test = problem
    kron = adapters.Kronfluence(problem, strategy="identity", damping=0.0)
    try:
        kron.fit(train)
        assert_same(kron.scores(test, train), ours["tracin"])
    finally:
        kron.close()


def test_ekfac_sweep_is_kronfluence_at_each_damping_with_our_sign(problem, ours):
    """``benchmarks/lds.py``'s EK-FAC arm: one factor fit scored at several dampings gives, at each, what a fresh
    kronfluence fitted with that damping gives (the same seeded Fisher samples), and the scores carry our sign
    (positive = helps): Pearson with our exact influence >= 0.5 (0.98 here, where the damping dominates the head's
    small curvature; a flipped sign gives about -0.98)."""
    from benchmarks._peers import adapters
    from benchmarks._peers.common import pearson
    from benchmarks._peers.ekfac_sweep import ekfac_sweep

    problem, train, test = problem
    sweep, _ = ekfac_sweep(problem.model, problem.param_names, [problem.damping, None], test, train, problem.batch_size, seed=0)
    kron = adapters.Kronfluence(problem, strategy="ekfac", damping=problem.damping)
    try:
        torch.manual_seed(0)
        kron.fit(train)
        fresh = kron.scores(test, train)
    finally:
        kron.close()
    torch.testing.assert_close(sweep[problem.damping][0], fresh.float(), rtol=1e-4, atol=1e-6 * float(fresh.abs().max()))
    assert not torch.allclose(sweep[None][0], sweep[problem.damping][0])  # the heuristic damping really is another one
    assert pearson(sweep[problem.damping][0], ours["exact"]) >= EKFAC_SIGN_FLOOR


def test_ekfac_sweep_empirical_fisher_uses_the_true_labels(problem):
    """With ``empirical_fisher`` the factors come from the true labels: no sampling, so the seed changes nothing,
    while the default (labels sampled from the model) changes with it."""
    from benchmarks._peers.ekfac_sweep import ekfac_sweep

    problem, train, test = problem

    def scores(seed: int, empirical: bool) -> torch.Tensor:
        sweep, _ = ekfac_sweep(problem.model, problem.param_names, [1e-4], test, train, problem.batch_size, seed, empirical)
        return sweep[1e-4][0]

    torch.testing.assert_close(scores(0, True), scores(1, True), rtol=1e-5, atol=0.0)
    assert not torch.allclose(scores(0, False), scores(1, False))
