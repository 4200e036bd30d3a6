"""Per-example gradients (vmap and loop) equal a plain per-example autograd loop, with padding."""

import pytest
import torch

from hf_influence.data import PaddingCollator
from hf_influence.engine.grads import LossFunction, eval_mode, per_example_grads
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils

CASES = {
    "bert": (utils.tiny_bert, utils.classification_dataset),
    "marian": (utils.tiny_marian, utils.seq2seq_dataset),
    "t5": (utils.tiny_t5, utils.seq2seq_dataset),
    "gpt2": (utils.tiny_gpt2, utils.lm_dataset),
    "gpt2-classifier": (utils.tiny_gpt2_classifier, utils.classification_dataset),  # causal attention under a classifier head
}


def autograd_reference(model, task, selection, dataset) -> torch.Tensor:
    """One plain backward per example, each example alone (no padding at all)."""
    named = dict(model.named_parameters())
    rows = []
    for i in range(len(dataset)):
        model.zero_grad()
        task.per_example_loss(model, PaddingCollator()([dataset[i]]))[0].backward()
        rows.append(torch.cat([named[n].grad.reshape(-1) for n in selection.names]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_per_example_grads_match_autograd(name, mode):
    build, make_data = CASES[name]
    model = build().eval()
    dataset = make_data(6)
    task = infer_task(model)
    selection = select_parameters(model)
    batch = PaddingCollator()([dataset[i] for i in range(len(dataset))])  # padded: lengths differ
    assert (batch["attention_mask"] == 0).any()
    loss_fn = LossFunction(model, task, selection)
    with eval_mode(model):
        ours = per_example_grads(loss_fn, selection.tensors(model), batch, mode=mode)
    reference = autograd_reference(model, task, selection, dataset)
    assert ours.shape == (len(dataset), selection.num_params)
    torch.testing.assert_close(ours, reference, atol=utils.GRAD_ATOL, rtol=1e-4)


def test_vmap_chunks_do_not_change_results():
    model = utils.tiny_bert().eval()
    dataset = utils.classification_dataset(7)
    selection = select_parameters(model, params=["classifier", "layer.1"])
    batch = PaddingCollator()([dataset[i] for i in range(len(dataset))])
    loss_fn = LossFunction(model, infer_task(model), selection)
    with eval_mode(model):
        whole = per_example_grads(loss_fn, selection.tensors(model), batch, mode="vmap")
        chunked = per_example_grads(loss_fn, selection.tensors(model), batch, chunk_size=2, mode="vmap")
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=0)


def test_auto_falls_back_to_loop_when_vmap_cannot_trace():
    """A task without mask_kind keeps the 2-D mask, which BERT's mask code cannot vmap: auto loops."""

    class PlainTask:
        def per_example_loss(self, model, batch):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"], reduction="none")

    model = utils.tiny_bert().eval()
    dataset = utils.classification_dataset(5)
    selection = select_parameters(model, params=["classifier"])
    batch = PaddingCollator()([dataset[i] for i in range(len(dataset))])
    loss_fn = LossFunction(model, PlainTask(), selection)
    with eval_mode(model):
        ours = per_example_grads(loss_fn, selection.tensors(model), batch)
    assert loss_fn.vmap_ok is False
    torch.testing.assert_close(ours, autograd_reference(model, PlainTask(), selection, dataset), atol=utils.GRAD_ATOL, rtol=1e-4)
