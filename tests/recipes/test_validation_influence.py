"""Validation influence (the recipe's ranking no loss can give) against exact influence from an explicit fp64 Hessian."""

import torch

import hf_influence as hfi
from hf_influence.recipes.rankings import validation_influence
from tests import utils

EXACT_RTOL = 1e-8  # the facade's exact method vs an explicit solve, fp64
ARNOLDI_RTOL = 1e-6  # a full-rank Arnoldi basis (iterations = P) vs an explicit solve, fp64


def _oracle(trained_bert) -> tuple:
    """``Σ_v g_vᵀ (H + λI)^-1 g_i`` for every training row i, from the explicit Hessian of the classifier (51 parameters)."""
    model, train, validation = trained_bert
    inf = hfi.Influence(model, params=["classifier"], damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    hessian = inf.exact_hessian(train)  # [P, P]
    g_train, g_validation = utils.collect_grads(inf, train), utils.collect_grads(inf, validation)  # [N, P], [V, P]
    damped = hessian + utils.BERT_DAMPING * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    return inf, train, validation, torch.linalg.solve(damped, g_validation.sum(0)) @ g_train.T  # [N]


def test_validation_influence_is_the_sum_of_exact_influences(trained_bert):
    inf, train, validation, expected = _oracle(trained_bert)
    assert expected.dtype == torch.float64 and expected.shape == (len(train),)
    torch.testing.assert_close(validation_influence(inf, validation, train, method="exact"), expected, rtol=EXACT_RTOL, atol=1e-12)
    parameters = sum(p.numel() for n, p in inf.model.named_parameters() if "classifier" in n)
    basis = inf.fit_arnoldi(train, rank=parameters, iterations=parameters)
    torch.testing.assert_close(validation_influence(inf, validation, train, basis=basis), expected, rtol=ARNOLDI_RTOL, atol=1e-10)


def test_the_rows_that_hurt_validation_rank_first(trained_bert):
    """The recipe ranks by the negative (higher = more suspect): most negative total influence first, in the oracle's order."""
    inf, train, validation, expected = _oracle(trained_bert)
    suspect = -validation_influence(inf, validation, train, method="exact")
    assert torch.equal(torch.argsort(suspect, descending=True), torch.argsort(expected))
