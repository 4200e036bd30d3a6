"""Parameter selection, flatten/unflatten order, fingerprints."""

import pytest
import torch

from hf_influence._utils.errors import ParameterSelectionError
from hf_influence.params import select_parameters
from tests import utils


def test_all_trainable_in_named_parameters_order():
    model = utils.tiny_bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    selection = select_parameters(model)
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(selection.names) == expected
    assert selection.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_regex_selection_and_empty_selection_error():
    model = utils.tiny_bert()
    assert select_parameters(model, params=["^classifier"]).names == ("classifier.weight", "classifier.bias")
    with pytest.raises(ParameterSelectionError, match="matches no trainable parameter"):
        select_parameters(model, params=["no_such_layer"])


@pytest.mark.parametrize(
    "build, inside, outside",
    [
        (utils.tiny_bert, ["bert.encoder.layer.1.output.dense.weight", "classifier.weight", "bert.pooler.dense.weight"],
         ["bert.encoder.layer.0.output.dense.weight", "bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight"]),
        (utils.tiny_gpt2, ["transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"],
         ["transformer.h.0.mlp.c_fc.weight", "transformer.wte.weight", "transformer.wpe.weight"]),
        (utils.tiny_marian, ["model.decoder.layers.0.fc1.weight", "model.encoder.layers.0.fc1.weight"],
         ["model.shared.weight"]),
    ],
)
def test_last_n_layers(build, inside, outside):
    names = set(select_parameters(build(), last_n_layers=1).names)
    assert set(inside) <= names
    assert not set(outside) & names


def test_flatten_unflatten_roundtrip_and_order():
    model = utils.tiny_bert()
    selection = select_parameters(model, params=["classifier", "pooler"])
    tensors = selection.tensors(model)
    flat = selection.flatten(tensors)
    assert flat[: tensors["bert.pooler.dense.weight"].numel()].equal(tensors["bert.pooler.dense.weight"].reshape(-1))
    for name, value in selection.unflatten(flat).items():
        assert value.equal(tensors[name])
    batched = torch.stack([flat, 2 * flat])
    assert selection.flatten(selection.unflatten(batched), batch_dims=1).equal(batched)


def test_fingerprint_tracks_weights_and_selection():
    model = utils.tiny_bert()
    selection = select_parameters(model, params=["classifier"])
    before = selection.fingerprint(model)
    assert before == selection.fingerprint(model)
    with torch.no_grad():
        model.classifier.bias.add_(1e-3)
    assert selection.fingerprint(model) != before
