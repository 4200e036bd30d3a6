"""JVP and per-example-gradient projections give the same numbers; the automatic choice."""

import pytest
import torch

from hf_influence.data import PaddingCollator
from hf_influence.engine.grads import LossFunction, eval_mode, per_example_grad_tensors
from hf_influence.engine.projection import choose_projection, project_by_grads, project_by_jvp
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils


@pytest.mark.parametrize("build, make_data", [(utils.tiny_bert, utils.classification_dataset), (utils.tiny_t5, utils.seq2seq_dataset), (utils.tiny_gpt2, utils.lm_dataset)])
def test_jvp_and_grads_projections_agree(build, make_data):
    model = build().eval()
    dataset = make_data(6)
    selection = select_parameters(model, last_n_layers=1)
    batch = PaddingCollator()([dataset[i] for i in range(len(dataset))])
    loss_fn = LossFunction(model, infer_task(model), selection)
    directions = torch.nn.functional.normalize(torch.randn(5, selection.num_params), dim=1)
    with eval_mode(model):
        by_jvp = project_by_jvp(loss_fn, selection.tensors(model), batch, directions)
        by_grads = project_by_grads(loss_fn, selection.tensors(model), batch, directions)
    assert by_jvp.shape == (6, 5)
    torch.testing.assert_close(by_jvp, by_grads, rtol=utils.PROJ_RTOL, atol=1e-6)


def test_automatic_choice():
    gib = 2**30
    assert choose_projection(num_params=10_000, rank=20, batch_size=8, memory_budget_bytes=gib) == "grads"
    assert choose_projection(num_params=10_000, rank=1, batch_size=8, memory_budget_bytes=gib) == "jvp"
    assert choose_projection(num_params=10**9, rank=20, batch_size=8, memory_budget_bytes=gib) == "jvp"


def test_facade_projection_modes_give_same_self_influence(bert_oracle):
    import hf_influence as hfi

    inf = bert_oracle["inf"]
    basis = inf.fit_arnoldi(bert_oracle["train"], rank=10, iterations=20)
    jvp_inf = hfi.Influence(inf.model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, projection="jvp", progress=False)
    torch.testing.assert_close(
        jvp_inf.self_influence(bert_oracle["train"], basis=basis), inf.self_influence(bert_oracle["train"], basis=basis), rtol=utils.PROJ_RTOL, atol=1e-10
    )


HOOKS_RTOL = 1e-10  # fp64, relative to the largest projected entry


def _padded_setup(build, make_data, n=6):
    torch.manual_seed(0)
    model = build().double().eval()
    dataset, selection = make_data(n), select_parameters(model)
    batch = PaddingCollator()([dataset[i] for i in range(n)])
    return model, selection, LossFunction(model, infer_task(model), selection), batch


@pytest.mark.parametrize("build, make_data", [(utils.tiny_bert, utils.classification_dataset), (utils.tiny_gpt2, utils.lm_dataset)])
def test_hooked_projection_within_a_small_budget_reads_the_basis_in_place(build, make_data):
    """The hooked projection reads the basis through views of itself; the embedding tables also through a transposed
    copy when it fits the budget (``embedding_bag``), else one direction at a time: the same numbers as vmap's gradients
    times the basis either way."""
    model, selection, loss_fn, batch = _padded_setup(build, make_data)
    params = selection.tensors(model)
    directions = torch.randn(7, selection.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tables = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)]
    with eval_mode(model):
        reference = selection.flatten(per_example_grad_tensors(loss_fn, params, batch, mode="vmap"), batch_dims=1) @ directions.T
        project_by_grads(loss_fn, params, batch, directions)  # first use: the hooks' check
        assert loss_fn.hooks_ok
        copied = project_by_grads(loss_fn, params, batch, directions, memory_budget_bytes=directions.numel() * 8)
        views, copies = loss_fn.projection_columns[2]
        in_place = project_by_grads(loss_fn, params, batch, directions, memory_budget_bytes=0)
        assert loss_fn.projection_columns[2][1] == {}  # no copy within a budget of 0
    base = directions.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in views.values())  # views of the basis
    assert sorted(copies) == sorted(f"{name}.weight" for name in tables) and tables
    assert all(p.untyped_storage().data_ptr() != base for p in copies.values())  # the tables' copy
    scale = float(reference.abs().max())
    assert float((copied - reference).abs().max()) <= HOOKS_RTOL * scale
    assert float((in_place - reference).abs().max()) <= HOOKS_RTOL * scale


def test_vmap_projection_holds_at_most_chunk_size_gradients(monkeypatch):
    """Where hooks do not apply (all of T5), gradients are taken ``chunk_size`` examples at a time, same numbers."""
    from hf_influence.engine import projection

    model, selection, loss_fn, batch = _padded_setup(utils.tiny_t5, utils.seq2seq_dataset, n=5)
    params = selection.tensors(model)
    directions = torch.randn(4, selection.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen, real = [], projection.per_example_grad_tensors

    def recording(loss_fn, params, batch, **kwargs):
        seen.append(batch["input_ids"].shape[0])
        return real(loss_fn, params, batch, **kwargs)

    with eval_mode(model):
        whole = project_by_grads(loss_fn, params, batch, directions)
        monkeypatch.setattr(projection, "per_example_grad_tensors", recording)
        sliced = project_by_grads(loss_fn, params, batch, directions, chunk_size=2)
    assert projection.hook_plan(loss_fn, params) is None and seen == [2, 2, 1]
    assert float((sliced - whole).abs().max()) <= HOOKS_RTOL * float(whole.abs().max())
