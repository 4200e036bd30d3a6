"""Memory of the other batched-HVP paths (block Krylov fits, the spectrum's trace probes, dense random projection): the
estimate counts what the call really allocates (``torch.profiler`` memory events, as in ``test_hvp_memory.py``), a small
``memory_budget_gb`` makes the passes take fewer vectors per batched backward with the same fp64 numbers, a fixed
``block_size`` is the width every pass runs, and a budget below one vector is refused with the ways out."""

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import MemoryBudgetError
from hf_influence.data import PaddingCollator
from hf_influence.engine import hvp as hvp_module
from hf_influence.engine import hvp_memory
from hf_influence.engine.ihvp.block import block_steps, krylov_bytes
from tests import utils
from tests.engine.test_hvp_memory import peak_allocated

ABOVE_MEASURED = 2.0  # the estimate is an upper bound, at most this many times the measured peak
SAME_RTOL = 1e-10  # fp64: chunked backwards give the same products to round-off
RANK, ITERATIONS, BLOCK = 4, 24, 8


@pytest.fixture(scope="module")
def model():
    return utils.memory_bert()


@pytest.fixture(scope="module")
def data():
    return utils.classification_dataset(16, seed=3)


@pytest.fixture
def widths(monkeypatch):
    """The vectors of every batched backward (``batch_hvp``'s ``per_backward`` chunks) and of every pass."""
    seen = {"backward": [], "pass": []}
    original_rows, original_pass = hvp_module._product_rows, hvp_module.dataset_hvp

    def rows(loss_fn, linked, leaves, columns):
        seen["backward"].append(columns.shape[0])
        return original_rows(loss_fn, linked, leaves, columns)

    def passes(loss_fn, params, batches, vectors, *args, **kwargs):
        seen["pass"].append(vectors.shape[1])
        return original_pass(loss_fn, params, batches, vectors, *args, **kwargs)

    monkeypatch.setattr(hvp_module, "_product_rows", rows)
    for module in (hvp_module, hfi.engine.prefix, hfi.wiring):
        monkeypatch.setattr(module, "dataset_hvp", passes)
    return seen


def influence(model, budget_gb: float = 4.0) -> hfi.Influence:
    return hfi.Influence(model, memory_budget_gb=budget_gb, batch_size=16, progress=False)


def block_fit(inf, data):
    return inf.fit_arnoldi(data, rank=RANK, iterations=ITERATIONS, algorithm="block", block_size=BLOCK, tol=0)


def activations(inf, data) -> int:
    return inf._hvp_activation_bytes(inf._hessian_batches(data))


def test_a_fixed_block_size_is_the_width_of_every_pass(model, data, widths):
    inf = influence(model)
    estimate = inf.estimate_cost("fit_arnoldi", data, rank=RANK, iterations=ITERATIONS, algorithm="block", block_size=BLOCK, tol=0)
    basis = block_fit(inf, data)
    steps = block_steps(ITERATIONS, BLOCK)
    assert widths["pass"] == [BLOCK] * steps and widths["backward"] == [BLOCK] * steps  # no timed passes, one backward each
    assert basis.iterations == estimate.products == BLOCK * steps and estimate.passes == steps


def test_the_block_fit_estimate_counts_what_the_fit_allocates(model, data):
    inf = influence(model)
    estimate = inf.estimate_cost("fit_arnoldi", data, rank=RANK, iterations=ITERATIONS, algorithm="block", block_size=BLOCK, tol=0)
    _, measured = peak_allocated(lambda: block_fit(inf, data))
    assert measured <= estimate.peak_bytes <= ABOVE_MEASURED * measured, (measured, estimate.peak_bytes)


def test_a_small_budget_chunks_the_block_passes_within_it_with_the_same_basis(model, data, widths):
    whole = influence(model)
    expected = block_fit(whole, data)
    num, graph = whole.selection.num_params, activations(whole, data)
    budget = (RANK * num * 8 + krylov_bytes(BLOCK, ITERATIONS, num, 8)
              + hvp_memory.pass_bytes(BLOCK, num, 8, graph, per_backward=3))  # the basis, the Krylov vectors, a pass of 3 per backward
    small = influence(model, budget / 2**30)
    assert small.estimate_cost("fit_arnoldi", data, rank=RANK, iterations=ITERATIONS, algorithm="block", block_size=BLOCK, tol=0).fits
    widths["backward"].clear()
    chunked, measured = peak_allocated(lambda: block_fit(small, data))
    assert set(widths["backward"]) == {3, 2} and measured <= budget  # 8 vectors per pass as 3 + 3 + 2
    torch.testing.assert_close(chunked.eigenvalues, expected.eigenvalues, rtol=SAME_RTOL, atol=0)
    torch.testing.assert_close(chunked.eigenvectors.abs(), expected.eigenvectors.abs(), rtol=0, atol=1e-8)


def test_block_widths_count_the_graph_and_a_budget_below_one_vector_is_refused(model, data):
    probe = influence(model)
    num, graph = probe.selection.num_params, activations(probe, data)
    least = RANK * num * 8 + krylov_bytes(1, ITERATIONS, num, 8) + hvp_memory.pass_bytes(1, num, 8, graph)
    with pytest.raises(MemoryBudgetError, match="smaller hessian_batch_size") as refused:
        block_fit(influence(model, 0.9 * least / 2**30), data)
    assert "graph of the largest Hessian batch" in str(refused.value)
    assert influence(model, 1.01 * least / 2**30).estimate_cost("fit_arnoldi", data, rank=RANK, iterations=ITERATIONS,
                                                                 algorithm="block", tol=0).fits


def spectrum(inf, data):
    return inf.spectrum(data, iterations=4, trace_matvecs=30)


def test_the_spectrum_estimate_counts_what_it_allocates(model, data):
    inf = influence(model)
    estimate = inf.estimate_cost("spectrum", data, iterations=4, trace_matvecs=30)
    _, measured = peak_allocated(lambda: spectrum(inf, data))
    assert measured <= estimate.peak_bytes <= ABOVE_MEASURED * measured, (measured, estimate.peak_bytes)


def test_a_small_budget_chunks_the_trace_probes_with_the_same_trace(model, data, widths):
    whole = influence(model)
    expected = spectrum(whole, data)
    assert max(widths["backward"]) == 10  # Hutch++'s three blocks of 10 probes
    num, graph = whole.selection.num_params, activations(whole, data)
    budget = 40 * num * 8 + hvp_memory.pass_bytes(10, num, 8, graph, per_backward=4)  # probes and products, 4 per backward
    small = influence(model, budget / 2**30)
    assert small.estimate_cost("spectrum", data, iterations=4, trace_matvecs=30).fits
    widths["backward"].clear()
    chunked, measured = peak_allocated(lambda: spectrum(small, data))
    assert max(widths["backward"]) == 4 and measured <= budget
    for name in ("trace", "trace_stderr", "lambda_max", "lambda_min"):
        assert getattr(chunked, name) == pytest.approx(getattr(expected, name), rel=SAME_RTOL), name


def test_dense_random_projection_chunks_within_a_small_budget_with_the_same_subspace_hessian(model, data, widths):
    rank = 12
    whole = influence(model)
    directions = whole._random_directions(rank)
    expected = whole._subspace_hessian(data, directions)
    num, graph = whole.selection.num_params, activations(whole, data)
    budget = rank * num * 8 + hvp_memory.pass_bytes(rank, num, 8, graph, per_backward=5)  # the directions and a pass of 5 per backward
    small = influence(model, budget / 2**30)
    estimate = small.estimate_cost("self_influence", data, method="randproj", rank=rank)
    counted = sum(part.nbytes for part in estimate.memory if "random subspace" in part.what)  # the directions and their pass
    widths["backward"].clear()
    chunked, measured = peak_allocated(lambda: small._subspace_hessian(data, directions))
    assert widths["backward"] == [5, 5, 2] and measured <= counted <= budget
    torch.testing.assert_close(chunked, expected, rtol=SAME_RTOL, atol=SAME_RTOL * float(expected.abs().max()))


def test_the_trainer_fits_with_its_block_size(trained_bert, tmp_path, widths):
    model, train, _ = trained_bert
    args = hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                          influence_last_n_layers=1, influence_rank=2, influence_iterations=12, influence_tol=0,
                                          influence_algorithm="block", influence_block_size=3, influence_hessian_examples=8)
    trainer = hfi.InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=PaddingCollator())
    basis = trainer.fit_influence()
    assert widths["pass"] == [3] * block_steps(12, 3) and basis.iterations == 3 * block_steps(12, 3)
