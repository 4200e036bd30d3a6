"""Replaying the frozen prefix leaves every HVP as it was, and turns itself off when it would not."""

import pytest
import torch
from torch import nn

from hf_influence.data import PaddingCollator
from hf_influence.engine.grads import LossFunction, eval_mode
from hf_influence.engine.hvp import dataset_hvp
from hf_influence.engine.prefix import PrefixReplay
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils


def batches_of(dataset, size: int) -> list[dict]:
    collate = PaddingCollator()
    return [collate([dataset[i] for i in range(start, min(start + size, len(dataset)))]) for start in range(0, len(dataset), size)]


def replay(model, batches, budget: float = 2**30, **selection):
    loss_fn = LossFunction(model, infer_task(model), select_parameters(model, **selection))
    params = loss_fn.selection.tensors(model)
    vectors = torch.randn(loss_fn.selection.num_params, 2, dtype=torch.float64)
    with eval_mode(model):
        prefix = PrefixReplay(loss_fn, params, batches, budget)
        return prefix, prefix.hvp(vectors), prefix.hvp(vectors), dataset_hvp(loss_fn, params, batches, vectors)


@pytest.mark.parametrize("selection, expected, kept", [
    ({"last_n_layers": 1}, ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"], [False, False, True]),  # layer 2 + head selected
    ({"params": [r"classifier", r"pooler"]}, ["bert.embeddings", "bert.encoder"], [False, True]),
])
def test_bert_replays_the_layers_below_the_selection(selection, expected, kept):
    model = utils.tiny_bert(layers=3).double().eval()
    batches = batches_of(utils.classification_dataset(10), 4)  # unequal last batch, its own padding
    prefix, first, second, full = replay(model, batches, **selection)
    names = {module: name for name, module in model.named_modules()}
    assert [names[m] for m in prefix.modules] == expected
    assert prefix.read_later == kept  # only the hidden states entering the selection are held
    assert prefix.active
    torch.testing.assert_close(first, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, full, rtol=1e-10, atol=1e-12)


def test_seq2seq_replays_the_encoder_below_the_selection():
    model = utils.tiny_marian().double().eval()
    batches = batches_of(utils.seq2seq_dataset(6), 3)
    prefix, first, _, full = replay(model, batches, params=[r"model\.decoder\.layers"])
    assert prefix.active and any(isinstance(m, nn.Embedding) or "Encoder" in type(m).__name__ for m in prefix.modules)
    torch.testing.assert_close(first, full, rtol=1e-10, atol=1e-12)


def test_nothing_to_replay_when_the_embeddings_are_selected():
    model = utils.tiny_bert().double().eval()
    prefix, first, _, full = replay(model, batches_of(utils.classification_dataset(6), 3), params=[r"word_embeddings"])
    assert prefix.modules == [] and not prefix.active
    torch.testing.assert_close(first, full)


def test_over_the_memory_budget_every_pass_runs_the_whole_model():
    model = utils.tiny_bert().double().eval()
    prefix, first, _, full = replay(model, batches_of(utils.classification_dataset(6), 3), budget=64, params=[r"classifier"])
    assert prefix.modules and not prefix.active
    torch.testing.assert_close(first, full)


def test_a_prefix_output_changed_in_place_turns_replay_off():
    model = utils.tiny_bert().double().eval()

    def pool_in_place(module, args):
        args[0].mul_(1.5)  # scales the encoder output it was given, i.e. the kept tensor (torch.func refuses)

    model.bert.pooler.register_forward_pre_hook(pool_in_place)
    prefix, first, _, full = replay(model, batches_of(utils.classification_dataset(6), 3), params=[r"classifier", r"pooler"])
    assert prefix.modules and not prefix.active
    torch.testing.assert_close(first, full)
