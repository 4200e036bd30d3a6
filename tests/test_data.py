"""Batches cut to their longest row, and Hessian batches grouped by length: the same losses and the same Hessian."""

from __future__ import annotations

import torch
from datasets import Dataset

import hf_influence as hfi
from hf_influence.data import PaddingCollator, length_sorted_batches, trim_padding
from hf_influence.engine.grads import LossFunction, eval_mode
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils

LOSS_ATOL = 1e-10  # fp64 per-example losses, trimmed vs padded batch
HESSIAN_ATOL = 1e-10  # fp64 explicit Hessians from differently batched rows


def padded_to(dataset: Dataset, length: int, columns=("input_ids", "attention_mask")) -> Dataset:
    """Every row right-padded to ``length`` in ``columns`` (zeros), as `tokenizer(padding="max_length")` gives."""
    return dataset.map(lambda row: {c: row[c] + [0] * (length - len(row[c])) for c in columns})


def losses(model, batch) -> torch.Tensor:
    loss_fn = LossFunction(model, infer_task(model), select_parameters(model, None, None))
    with eval_mode(model), torch.no_grad():
        return loss_fn(loss_fn.selection.tensors(model), batch)


def test_trimming_keeps_every_loss_of_prepadded_rows():
    for model, data in ((utils.tiny_bert().double(), utils.classification_dataset(6)),
                        (utils.tiny_gpt2().double(), utils.lm_dataset(6)),
                        (utils.tiny_marian().double(), utils.seq2seq_dataset(6))):
        rows = [padded_to(data, 20)[i] for i in range(len(data))]
        full = {k: torch.tensor([row[k] for row in rows]) for k in ("input_ids", "attention_mask")}  # [6, 20], not trimmed
        if "labels" in rows[0]:
            full["labels"] = PaddingCollator()._stack("labels", [row["labels"] for row in rows])
        cut = PaddingCollator()(rows)
        longest = max(len(data[i]["input_ids"]) for i in range(len(data)))
        assert cut["input_ids"].shape[1] == longest < 20
        torch.testing.assert_close(losses(model, cut), losses(model, full), rtol=0, atol=LOSS_ATOL)


def test_trimming_leaves_batches_it_cannot_read():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    unknown = {"input_ids": mask.clone(), "attention_mask": mask, "pixel_mask": mask.clone()}
    assert trim_padding(unknown) is unknown  # a [B, T] column of unknown meaning
    four_d = {"input_ids": mask.clone(), "attention_mask": mask[:, None, None, :].float()}
    assert trim_padding(four_d) is four_d
    targets = {"input_ids": mask.clone(), "attention_mask": mask, "labels": torch.tensor([[5, 6, 7, -100], [5, -100, -100, -100]])}
    assert trim_padding(targets)["labels"].tolist() == [[5, 6, 7], [5, -100, -100]]  # a target past the mask is kept


def test_length_sorted_batches_cover_every_row_once_within_the_caps():
    data = padded_to(utils.classification_dataset(23, seed=3), 16)
    lengths = [sum(m) for m in data["attention_mask"]]
    batches = length_sorted_batches(data, batch_size=100, rows_of_longest=4)
    seen = sorted(tuple(ids[: int(n)].tolist()) for b in batches for ids, n in zip(b["input_ids"], b["attention_mask"].sum(1)))
    assert seen == sorted(tuple(ids[:n]) for ids, n in zip(data["input_ids"], lengths))
    for batch in batches:
        rows, width = batch["input_ids"].shape
        assert width == int(batch["attention_mask"].sum(1).max())  # cut to its longest row
        assert rows == 1 or rows * width <= 4 * max(lengths)
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths) and len(batches) > 1
    assert [b["input_ids"].shape[0] for b in length_sorted_batches(data, batch_size=5)] == [5, 5, 5, 5, 3]


def test_hessian_is_the_same_however_the_rows_are_batched_or_padded():
    model = utils.tiny_bert().double()
    data = utils.classification_dataset(13, seed=1)
    reference = hfi.Influence(model, params=[r"^classifier\.", r"^bert\.pooler\."], batch_size=13, progress=False).exact_hessian(data)
    for settings, rows in (({"batch_size": 2}, data), ({"batch_size": 4}, padded_to(data, 16)),
                           ({"batch_size": 4, "hessian_batch_size": 3}, padded_to(data, 16))):
        inf = hfi.Influence(model, params=[r"^classifier\.", r"^bert\.pooler\."], progress=False, **settings)
        torch.testing.assert_close(inf.exact_hessian(rows), reference, rtol=0, atol=HESSIAN_ATOL)
