"""Tests stay offline: HF_HUB_OFFLINE is set before transformers is imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import utils  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_bert():
    """A tiny BERT classifier trained briefly on a synthetic task, in float64, with its data."""
    return utils.train_tiny_bert()


@pytest.fixture(scope="session")
def bert_oracle(trained_bert):
    """Exact influence on the tiny trained BERT (last layer + head, ~2.5k params), float64.

    Built from engine pieces each checked against autograd elsewhere: the explicit Hessian
    (test_hvp) and per-example gradients (test_grads), combined in float64 by eigendecomposition.
    """
    import hf_influence as hfi
    from hf_influence.engine.ihvp.exact import ExactInverse

    model, train, test = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    hessian = inf.exact_hessian(train)
    grads = lambda data: utils.collect_grads(inf, data)  # noqa: E731
    g_test, g_train = grads(test), grads(train)
    inverse = ExactInverse(hessian, utils.BERT_DAMPING)
    return {
        "inf": inf, "train": train, "test": test, "hessian": hessian,
        "pairwise": inverse(g_test) @ g_train.T,  # [n_test, n_train]
        "self": (inverse(g_train) * g_train).sum(1),  # [n_train]
        "g_test": g_test, "g_train": g_train,
    }
