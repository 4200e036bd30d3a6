"""HVPs equal the explicit Hessian (torch.autograd.functional.hessian) times vectors; a block equals its columns."""

from unittest import mock

import torch
from torch.func import functional_call

from hf_influence.data import PaddingCollator
from hf_influence.engine.grads import LossFunction, eval_mode
from hf_influence.engine.hvp import batch_hvp, dataset_hvp, explicit_hessian
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils


def setup():
    model = utils.tiny_bert().double().eval()
    dataset = utils.classification_dataset(10)
    selection = select_parameters(model, params=[r"classifier", r"pooler"])
    batch = PaddingCollator()([dataset[i] for i in range(len(dataset))])
    return model, selection, batch, LossFunction(model, infer_task(model), selection)


def autograd_hessian(model, selection, batch) -> torch.Tensor:
    """Independent oracle: Hessian of the mean loss as a function of the flat parameter vector."""
    flat = selection.flatten(selection.tensors(model)).clone()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def mean_loss(vector):
        logits = functional_call(model, selection.unflatten(vector), kwargs=inputs, strict=False).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    return torch.autograd.functional.hessian(mean_loss, flat)


def test_hvp_equals_explicit_hessian_times_vector():
    model, selection, batch, loss_fn = setup()
    hessian = autograd_hessian(model, selection, batch)
    vectors = torch.randn(selection.num_params, 3, dtype=torch.float64)
    with eval_mode(model):
        ours = batch_hvp(loss_fn, selection.tensors(model), batch, vectors)
    torch.testing.assert_close(ours, hessian @ vectors, rtol=utils.HVP_RTOL, atol=1e-10)


def test_explicit_hessian_and_dataset_mean():
    model, selection, batch, loss_fn = setup()
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]  # unequal sizes 4 and 6
    with eval_mode(model):
        ours = explicit_hessian(loss_fn, selection.tensors(model), halves, chunk_size=50, progress=False)
        vectors = torch.randn(selection.num_params, 2, dtype=torch.float64)
        streamed = dataset_hvp(loss_fn, selection.tensors(model), halves, vectors)
    reference = autograd_hessian(model, selection, batch)
    torch.testing.assert_close(ours, reference, rtol=utils.HVP_RTOL, atol=1e-10)
    torch.testing.assert_close(streamed, reference @ vectors, rtol=utils.HVP_RTOL, atol=1e-10)


def test_a_block_of_vectors_equals_one_vector_at_a_time():
    """The batched second backward (is_grads_batched) and its one-backward-per-column fallback give
    the single-vector products, for the head and for a transformer layer (fp64)."""
    model = utils.tiny_bert().double().eval()
    dataset = utils.classification_dataset(10)
    batch = PaddingCollator()([dataset[i] for i in range(len(dataset))])
    for selection in (select_parameters(model, params=[r"classifier", r"pooler"]), select_parameters(model, last_n_layers=1)):
        loss_fn, params = LossFunction(model, infer_task(model), selection), selection.tensors(model)
        vectors = torch.randn(selection.num_params, 5, dtype=torch.float64)
        with eval_mode(model):
            block = batch_hvp(loss_fn, params, batch, vectors)
            singles = torch.cat([batch_hvp(loss_fn, params, batch, vectors[:, [k]]) for k in range(5)], dim=1)
            with mock.patch("torch.autograd.grad", side_effect=_refusing_batched(torch.autograd.grad)):
                fallback = batch_hvp(loss_fn, params, batch, vectors)
        torch.testing.assert_close(block, singles, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fallback, singles, rtol=1e-10, atol=1e-12)


def _refusing_batched(grad):
    """``torch.autograd.grad`` as for a model whose ops have no batching rule."""

    def refusing(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for this op")
        return grad(*args, **kwargs)

    return refusing
