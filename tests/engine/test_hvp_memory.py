"""Memory of the Kronecker random projection's subspace Hessian (batched HVPs over map rows): the estimate counts what
the pass really allocates (the allocator's own records, ``torch.profiler`` memory events), and a small
``memory_budget_gb`` makes the pass take fewer rows at a time, staying within it, with the same ``ΦHΦᵀ``."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import hf_influence as hfi
from hf_influence._utils.errors import MemoryBudgetError
from hf_influence.engine import hvp_memory
from tests import utils

RANK = 48  # at least one feature for each of the 41 tensors
ABOVE_MEASURED = 2.0  # the estimate is an upper bound, at most this many times the measured peak
SAME_RTOL = 1e-10  # fp64: chunked passes give the same subspace Hessian to round-off


def peak_allocated(fn) -> tuple[object, int]:
    """``fn()`` and the most bytes its CPU tensors held at once (allocations minus frees, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return result, peak


@pytest.fixture(scope="module")
def model():
    return utils.memory_bert()


def influence(model, budget_gb: float = 4.0) -> hfi.Influence:
    return hfi.Influence(model, random_projection="kronecker", memory_budget_gb=budget_gb, batch_size=16, progress=False)


def kronecker_bytes(estimate) -> int:
    """The estimate's parts for the subspace passes (the batched HVP graph and the map rows)."""
    return sum(part.nbytes for part in estimate.memory if "Kronecker" in part.what or "batched HVP graph" in part.what)


@pytest.mark.parametrize("rows", [8, 32])
def test_the_estimate_counts_what_the_subspace_pass_allocates(model, rows):
    data = utils.classification_dataset(rows, seed=3)
    inf = influence(model)
    estimate = inf.estimate_cost("self_influence", data, method="randproj", rank=RANK)
    kmap = inf._random_directions(RANK)
    _, measured = peak_allocated(lambda: inf._subspace_hessian(data, kmap))
    held = kronecker_bytes(estimate)
    assert measured <= held <= ABOVE_MEASURED * measured, (measured, held)
    assert estimate.passes == 1  # the whole map in one pass at 4 GiB


def test_a_small_budget_takes_fewer_rows_per_pass_within_it_and_the_same_numbers(model):
    data = utils.classification_dataset(16, seed=3)
    whole = influence(model)
    kmap = whole._random_directions(RANK)
    activations = whole._hvp_activation_bytes(whole._hessian_batches(data))
    budget = hvp_memory.pass_bytes(3, whole.selection.num_params, 8, activations)  # three rows per pass
    small = influence(model, budget / 2**30)
    estimate = small.estimate_cost("self_influence", data, method="randproj", rank=RANK)
    assert estimate.passes == RANK // 3 and estimate.fits
    chunked, measured = peak_allocated(lambda: small._subspace_hessian(data, kmap))
    assert measured <= budget
    expected = whole._subspace_hessian(data, kmap)
    torch.testing.assert_close(chunked, expected, rtol=SAME_RTOL, atol=SAME_RTOL * float(expected.abs().max()))


def test_a_budget_below_one_row_per_pass_is_refused_with_the_ways_out(model):
    data = utils.classification_dataset(16, seed=3)
    probe = influence(model)
    one_row = hvp_memory.pass_bytes(1, probe.selection.num_params, 8, probe._hvp_activation_bytes(probe._hessian_batches(data)))
    with pytest.raises(MemoryBudgetError, match="smaller hessian_batch_size") as refused:
        influence(model, 0.9 * one_row / 2**30).self_influence(data, method="randproj", rank=RANK)
    assert "batched HVP graph" in str(refused.value)
