"""JVP and per-example-gradient projections give the same numbers; the automatic choice."""

import pytest
import torch

from hf_influence.data import PaddingCollator
from hf_influence.engine.grads import LossFunction, eval_mode
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
