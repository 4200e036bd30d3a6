"""Exact influence against closed forms: logistic and ridge regression as 1-layer models."""

import numpy as np
import pytest
import torch
from datasets import Dataset

import hf_influence as hfi
from hf_influence._utils.errors import SingularHessianError
from hf_influence.engine.ihvp.exact import ExactInverse
from tests import utils

N, D, DAMPING = 40, 4, 0.1


class LinearModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(D, 1).double()

    def forward(self, x):
        return self.linear(x.double())[:, 0]


class LogisticTask:
    def per_example_loss(self, model, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(model(batch["x"]), batch["labels"].double(), reduction="none")


class SquaredTask:
    def per_example_loss(self, model, batch):
        return 0.5 * (model(batch["x"]) - batch["labels"].double()) ** 2


def make_data(seed, n=N, binary=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32).astype(np.float64)  # the collator builds float32 inputs
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ np.array([1.0, -2.0, 0.5, 0.0])))).astype(float) if binary else x @ np.array([1.0, -2.0, 0.5, 0.3]) + 0.3 * rng.normal(size=n)
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}), x, y


def analytic_logistic(model, x_tr, y_tr, x_te, y_te):
    w = model.linear.weight.detach().numpy()[0]
    b = float(model.linear.bias.detach())
    design = lambda x: np.hstack([x, np.ones((len(x), 1))])  # noqa: E731  # param order: weight, bias
    p = lambda x: 1 / (1 + np.exp(-(x @ w + b)))  # noqa: E731
    a_tr, a_te = design(x_tr), design(x_te)
    g_tr, g_te = (p(x_tr) - y_tr)[:, None] * a_tr, (p(x_te) - y_te)[:, None] * a_te
    hessian = (a_tr * (p(x_tr) * (1 - p(x_tr)))[:, None]).T @ a_tr / len(x_tr)
    inverse = np.linalg.inv(hessian + DAMPING * np.eye(D + 1))
    return g_te @ inverse @ g_tr.T, np.einsum("ij,jk,ik->i", g_tr, inverse, g_tr)


@pytest.fixture
def logistic():
    torch.manual_seed(1)
    model = LinearModel()
    train, x_tr, y_tr = make_data(0)
    test, x_te, y_te = make_data(1, n=6)
    inf = hfi.Influence(model, task=LogisticTask(), damping=DAMPING, batch_size=7, progress=False)
    return inf, train, test, analytic_logistic(model, x_tr, y_tr, x_te, y_te)


def test_exact_equals_analytic_logistic_regression(logistic):
    inf, train, test, (pairwise, self_inf) = logistic
    np.testing.assert_allclose(inf.scores(test, train, method="exact").numpy(), pairwise, rtol=utils.CLOSED_FORM_RTOL, atol=1e-12)
    np.testing.assert_allclose(inf.self_influence(train, method="exact").numpy(), self_inf, rtol=utils.CLOSED_FORM_RTOL)


@pytest.mark.parametrize("method, kwargs", [("arnoldi", {"rank": D + 1}), ("randproj", {"rank": D + 1})])
def test_full_rank_subspace_methods_equal_exact(logistic, method, kwargs):
    """With p̄ = P both subspace methods span everything, so they must reproduce exact influence."""
    inf, train, test, (pairwise, _) = logistic
    np.testing.assert_allclose(inf.scores(test, train, method=method, **kwargs).numpy(), pairwise, rtol=1e-6, atol=1e-9)


def test_sign_convention_matches_leave_one_out_retraining():
    """Ridge regression at its optimum: score(test, z) / N predicts the test-loss rise when z is removed."""
    train, x, y = make_data(2, binary=False)
    test, x_te, y_te = make_data(3, n=1, binary=False)
    a, a_te = np.hstack([x, np.ones((N, 1))]), np.hstack([x_te, np.ones((1, 1))])

    def fit(rows):
        return np.linalg.solve(a[rows].T @ a[rows] / N + DAMPING * np.eye(D + 1), a[rows].T @ y[rows] / N)

    def test_loss(theta):
        return float((0.5 * (a_te @ theta - y_te) ** 2)[0])

    theta = fit(np.arange(N))
    model = LinearModel()
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(theta[:D])[None])
        model.linear.bias.fill_(theta[D])
    inf = hfi.Influence(model, task=SquaredTask(), damping=DAMPING, progress=False)
    predicted = inf.scores(test, train, method="exact")[0].numpy() / N
    actual = np.array([test_loss(fit(np.delete(np.arange(N), z))) - test_loss(theta) for z in range(N)])
    assert utils.pearson(torch.from_numpy(predicted), torch.from_numpy(actual)) > 0.99
    assert np.sign(predicted[np.abs(actual) > 1e-4]).tolist() == np.sign(actual[np.abs(actual) > 1e-4]).tolist()


def test_singular_hessian_is_refused():
    with pytest.raises(SingularHessianError, match="Increase damping"):
        ExactInverse(torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)), damping=0.0)
