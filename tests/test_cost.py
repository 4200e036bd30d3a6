"""Cost estimates (issue 18 section 3): the figures equal what a call holds and runs on a tiny model, a call over the
memory budget is refused before any HVP with the ways out, and every estimated call logs its estimate."""

from __future__ import annotations

import inspect
import logging
import types

import pytest
import torch

import hf_influence as hfi
from hf_influence import cost
from hf_influence._utils.errors import InvalidInputError, MemoryBudgetError
from hf_influence.engine import hvp as hvp_module
from hf_influence.engine import hvp_memory
from hf_influence.engine import prefix as prefix_module
from hf_influence.engine.ihvp import block as block_module

from .utils import classification_dataset, tiny_bert


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_bert()


@pytest.fixture(scope="module")
def data():
    return classification_dataset(20)


@pytest.fixture
def counted(monkeypatch):
    """Counts passes over the Hessian rows, HVP calls on a Hessian batch, and LiSSA minibatch HVP calls."""
    counts = {"passes": 0, "batch_hvps": 0, "lissa_hvps": 0}

    def counting(function, key):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapped

    passes = counting(hvp_module.dataset_hvp, "passes")
    for module in (prefix_module, hvp_module, hfi.wiring):  # fits, the explicit Hessian, random projection's subspace
        monkeypatch.setattr(module, "dataset_hvp", passes)
    monkeypatch.setattr(hvp_module, "batch_hvp", counting(hvp_module.batch_hvp, "batch_hvps"))
    monkeypatch.setattr(hfi.curvature, "batch_hvp", counting(hfi.curvature.batch_hvp, "lissa_hvps"))
    return counts


def test_every_estimator_takes_its_method_arguments():
    for action, estimator in cost.ESTIMATORS.items():
        method = inspect.signature(getattr(hfi.Influence, action))
        ours = inspect.signature(estimator)
        expected = [(p.name, p.default) for p in method.parameters.values() if p.name != "self"]
        assert [(p.name, p.default) for p in ours.parameters.values() if p.kind != p.KEYWORD_ONLY][1:] == expected, action


def test_parameters_and_basis_bytes_are_those_of_the_fitted_basis(model, data, counted):
    inf = hfi.Influence(model, last_n_layers=1, progress=False)
    estimate = inf.estimate_cost("fit_arnoldi", data, rank=4, iterations=8)
    assert counted == {"passes": 0, "batch_hvps": 0, "lissa_hvps": 0}  # estimating runs nothing
    basis = inf.fit_arnoldi(data, rank=4, iterations=8)
    assert estimate.num_params == inf.selection.num_params == basis.eigenvectors.shape[1]
    assert estimate.basis_bytes == basis.eigenvectors.nbytes
    assert estimate.passes == counted["passes"] == 8
    assert (estimate.hessian_rows, estimate.hessian_batches) == (len(data), len(inf._materialize(data)))


def test_arnoldi_hvp_calls_equal_the_estimate(model, data, counted):
    inf = hfi.Influence(model, progress=False, batch_size=6)  # all parameters: the frozen-prefix replay is off
    estimate = inf.estimate_cost("fit_arnoldi", data, rank=3, iterations=7)
    inf.fit_arnoldi(data, rank=3, iterations=7)
    assert (counted["passes"], counted["batch_hvps"]) == (estimate.passes, estimate.batch_hvps) == (7, 7 * len(inf._materialize(data)))
    assert estimate.products == 7


def test_block_hvp_calls_equal_the_estimate(model, data, counted, monkeypatch):
    ticks = iter(range(10**6))  # every timed pass takes one "second" at any width: the planner takes the fewest passes
    monkeypatch.setattr(block_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    inf = hfi.Influence(model, progress=False)
    estimate = inf.estimate_cost("fit_arnoldi", data, rank=3, iterations=40, algorithm="block")
    basis = inf.fit_arnoldi(data, rank=3, iterations=40, algorithm="block")
    assert (counted["passes"], counted["batch_hvps"]) == (estimate.passes, estimate.batch_hvps)
    assert estimate.passes == 2 + block_module.block_steps(40, 64)  # two timed passes, then blocks of 64
    assert basis.iterations == estimate.products - 1 - 8  # the products of the fit itself, without the timed passes


def test_lissa_hvp_calls_equal_the_estimate(model, data, counted):
    inf = hfi.Influence(model, last_n_layers=1, progress=False)
    config = hfi.LissaConfig(scale=1e4, steps=6, repeats=3, batch_size=4)
    estimate = inf.estimate_cost("s_test", data.select(range(3)), data, lissa=config)
    inf.s_test(data.select(range(3)), data, lissa=config)
    assert counted["lissa_hvps"] == estimate.lissa_hvps == 18 and estimate.lissa_rows == 4
    assert counted["passes"] == estimate.passes == 0


def test_per_example_gradient_bytes_are_those_of_a_batch(model, data):
    inf = hfi.Influence(model, batch_size=5, progress=False)
    estimate = inf.estimate_cost("gradients", data)
    assert estimate.grad_batch_bytes == inf.gradients(data.select(range(5))).nbytes
    jvp = hfi.Influence(model, batch_size=5, projection="jvp", progress=False)
    assert jvp.estimate_cost("self_influence", data, rank=3).grad_batch_bytes == 0  # projected by JVPs: never [B, P]


def test_exact_hessian_bytes_and_passes(model, data, counted):
    inf = hfi.Influence(model, params=[r"classifier"], progress=False)
    estimate = inf.estimate_cost("exact_hessian", data)
    hessian = inf.exact_hessian(data)
    assert estimate.hessian_bytes == hessian.nbytes
    assert (counted["passes"], counted["batch_hvps"]) == (estimate.passes, estimate.batch_hvps) == (1, len(inf._materialize(data)))


def test_over_the_budget_refused_before_any_hvp_with_the_ways_out(model, data, counted):
    inf = hfi.Influence(model, memory_budget_gb=0.01, progress=False)  # P ≈ 6k: the [P, P] Hessian is ~0.13 GiB
    with pytest.raises(MemoryBudgetError) as refused:
        inf.exact_hessian(data)
    assert counted == {"passes": 0, "batch_hvps": 0, "lissa_hvps": 0}
    message = str(refused.value)
    for way_out in ("method='arnoldi' or 'lissa'", "last_n_layers", "raise memory_budget_gb"):
        assert way_out in message
    assert refused.value.estimate.hessian_bytes == inf.selection.num_params**2 * 4
    assert "explicit Hessian [P, P]" in message and f"{inf.selection.num_params:,}" in message
    with pytest.raises(MemoryBudgetError, match="fewer iterations"):  # the Krylov vectors of a long fit
        hfi.Influence(model, memory_budget_gb=1e-3, progress=False).fit_arnoldi(data, rank=3, iterations=20_000)
    with pytest.raises(MemoryBudgetError, match="smaller batch_size"):  # a batch of per-example gradients
        hfi.Influence(model, memory_budget_gb=1e-4, batch_size=8, progress=False).scores(data, data, method="tracin")
    assert counted == {"passes": 0, "batch_hvps": 0, "lissa_hvps": 0}


def test_each_call_logs_its_estimate_once(model, data, caplog):
    inf = hfi.Influence(model, progress=False)
    with caplog.at_level(logging.INFO, logger="hf_influence"):
        inf.self_influence(data, method="arnoldi", rank=3)  # fits a basis inside: counted by the outer call only
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_influence.cost_estimate"]
    assert lines == [str(inf.estimate_cost("self_influence", data, method="arnoldi", rank=3))]
    assert lines[0].startswith(f"self_influence: 6.0k parameters selected, basis") and "budget 2 GiB" in lines[0]


def test_unknown_action_is_refused(model):
    with pytest.raises(InvalidInputError, match="fit_arnoldi"):
        hfi.Influence(model, progress=False).estimate_cost("fit")


def test_spectrum_and_random_projection_passes_equal_the_estimate(model, data, counted):
    inf = hfi.Influence(model, last_n_layers=1, progress=False)
    estimate = inf.estimate_cost("spectrum", data, iterations=5, trace_matvecs=6)
    inf.spectrum(data, iterations=5, trace_matvecs=6)
    assert counted["passes"] == estimate.passes == 5 + 3  # Lanczos, then Hutch++'s three blocks
    selection = {"params": [r"classifier", r"pooler"]}
    probe = hfi.Influence(model, **selection, progress=False)
    pass_of_two = hvp_memory.pass_bytes(2, probe.selection.num_params, 4, probe._hvp_activation_bytes(probe._hessian_batches(data)))
    for kind, budget in (("dense", 2.0), ("kronecker", pass_of_two / 2**30)):  # the Kronecker map's rows two at a time
        counted["passes"] = 0
        inf = hfi.Influence(model, **selection, random_projection=kind, memory_budget_gb=budget, progress=False)
        estimate = inf.estimate_cost("self_influence", data, method="randproj", rank=6)
        inf.self_influence(data, method="randproj", rank=6)
        assert counted["passes"] == estimate.passes == (1 if kind == "dense" else 3), kind
