"""Built-in tasks: inferred from the model class, losses summed over target tokens."""

import pytest
import torch

from hf_influence._utils.errors import TaskInferenceError
from hf_influence.data import PaddingCollator
from hf_influence.tasks import CausalLMTask, Seq2SeqTask, SequenceClassificationTask, infer_task
from tests import utils


@pytest.mark.parametrize(
    "build, kind",
    [(utils.tiny_bert, SequenceClassificationTask), (utils.tiny_marian, Seq2SeqTask), (utils.tiny_t5, Seq2SeqTask), (utils.tiny_gpt2, CausalLMTask)],
)
def test_inferred_task(build, kind):
    assert isinstance(infer_task(build()), kind)


def test_unknown_model_asks_for_a_task():
    with pytest.raises(TaskInferenceError, match="Pass task="):
        infer_task(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("build, make_data", [(utils.tiny_marian, utils.seq2seq_dataset), (utils.tiny_t5, utils.seq2seq_dataset), (utils.tiny_gpt2, utils.lm_dataset)])
def test_sequence_loss_is_sum_over_target_tokens(build, make_data):
    """Per example: HF's mean token loss (computed alone) times its number of target tokens."""
    model = build().eval()
    dataset = make_data(4)
    batch = PaddingCollator()([dataset[i] for i in range(4)])
    ours = infer_task(model).per_example_loss(model, batch)
    for i in range(4):
        alone = PaddingCollator()([dataset[i]])
        if "labels" not in alone:
            alone["labels"] = alone["input_ids"]
            tokens = alone["input_ids"].shape[1] - 1
        else:
            tokens = alone["labels"].shape[1]
        torch.testing.assert_close(ours[i], model(**alone).loss * tokens, rtol=1e-5, atol=1e-5)


def test_classification_loss_matches_hf_mean():
    model = utils.tiny_bert().eval()
    dataset = utils.classification_dataset(5)
    batch = PaddingCollator()([dataset[i] for i in range(5)])
    ours = SequenceClassificationTask().per_example_loss(model, batch)
    torch.testing.assert_close(ours.mean(), model(**batch).loss)


def test_classifier_mask_follows_the_backbone():
    """A GPT-2 classifier attends causally; a 4-D bidirectional mask there would let tokens see the future."""
    assert infer_task(utils.tiny_gpt2_classifier()).mask_kind == "causal"
    assert infer_task(utils.tiny_bert()).mask_kind == "bidirectional"
