"""Half-precision models score without conversion: bfloat16 against the same weights in float32, and float16's
overflow refused with the way out."""

import copy

import pytest
import torch
from scipy.stats import spearmanr

import hf_influence as hfi
from hf_influence._utils.errors import NonFiniteError
from tests import utils

SPEARMAN_FLOOR = 0.95  # bf16 vs fp32 self-influence ranks (kronfluence reports 0.96 for its bf16 mode)
EIGENVALUE_RTOL = 0.05  # bf16 vs fp32 top Arnoldi eigenvalues, relative
RANK, ITERATIONS = 8, 20


@pytest.fixture(scope="module")
def rounded(trained_bert):
    """The trained tiny BERT rounded to bfloat16, and the same weights in float32, with the training data."""
    model, train, _ = trained_bert
    low = copy.deepcopy(model).to(torch.bfloat16)
    return low, copy.deepcopy(low).float(), train


def fitted(model, train):
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    basis = inf.fit_arnoldi(train, rank=RANK, iterations=ITERATIONS)
    return inf, basis


def test_bfloat16_self_influence_ranks_and_eigenvalues_match_float32(rounded):
    low, high, train = rounded
    (low_inf, low_basis), (high_inf, high_basis) = fitted(low, train), fitted(high, train)
    assert low_basis.eigenvalues.dtype == torch.float32 and low_basis.eigenvectors.dtype == torch.float32  # accumulated in fp32
    torch.testing.assert_close(low_basis.eigenvalues, high_basis.eigenvalues, rtol=EIGENVALUE_RTOL, atol=0)
    low_scores, high_scores = low_inf.self_influence(train, basis=low_basis), high_inf.self_influence(train, basis=high_basis)
    assert low_scores.dtype == torch.float32 and torch.isfinite(low_scores).all()
    assert spearmanr(low_scores.numpy(), high_scores.numpy()).statistic >= SPEARMAN_FLOOR


def test_float16_first_order_scores_match_float32(rounded):
    _, high, train = rounded
    half = copy.deepcopy(high).half()
    scores = [hfi.Influence(m, last_n_layers=1, batch_size=16, progress=False).self_influence(train, method="tracin") for m in (half, high)]
    assert spearmanr(scores[0].numpy(), scores[1].numpy()).statistic >= SPEARMAN_FLOOR


def test_float16_overflow_is_refused_naming_bfloat16():
    model = utils.tiny_bert().half().eval()
    with torch.no_grad():
        model.classifier.bias.fill_(6e4).add_(6e4)  # the logits overflow float16 (largest value 65504) to inf
    inf = hfi.Influence(model, params=["classifier"], batch_size=4, progress=False)
    with pytest.raises(NonFiniteError, match="load it in bfloat16"):
        inf.self_influence(utils.classification_dataset(4), method="tracin")


@pytest.mark.parametrize("dtype, advice, not_advice", [
    (torch.float16, "load it in bfloat16", "rarely overflow"),
    (torch.bfloat16, "bfloat16 model has float32's range", "float16 model overflows"),
    (torch.float32, "The model is float32, so overflow is unlikely", "float16 model overflows"),
])
def test_nonfinite_advice_follows_the_model_dtype(dtype, advice, not_advice):
    """NaN weights give NaN scores in every dtype; the refusal's advice is the one for the model's dtype."""
    model = utils.tiny_bert().to(dtype).eval()
    with torch.no_grad():
        model.classifier.bias[0] = float("nan")
    inf = hfi.Influence(model, params=["classifier"], batch_size=4, progress=False)
    with pytest.raises(NonFiniteError, match=advice) as refused:
        inf.self_influence(utils.classification_dataset(4), method="tracin")
    assert not_advice not in str(refused.value)
