"""What the library does with a damaged file it wrote itself: a job's own pieces (s_test files, the Trainer's
cached basis) are reported and computed again, and nothing else is touched. The command-line cases (a damaged
basis, request.json or influence_config.json refused with the way out) are in `tests/test_bad_input.py`."""

from __future__ import annotations

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import DamagedArtifactError
from hf_influence.data import PaddingCollator
from hf_influence.jobs.stest import _unfinished_groups, load_stest, save_stest, stest_save_path
from tests import utils

API_ATOL = 1e-5  # float32 tiny BERT: trainer vs the facade


def test_a_damaged_s_test_file_is_solved_again_with_its_group_only(tmp_path):
    rows = [f"{i:016x}" for i in range(6)]
    for index, row in enumerate(rows):
        save_stest(tmp_path, index, torch.full((3,), float(index)), {"request_hash": "r", "row_hash": row})
    path = stest_save_path(tmp_path, 3)
    path.write_bytes(path.read_bytes()[:-5])
    assert _unfinished_groups(tmp_path, rows, 2, "r") == [[2, 3]]  # groups of 2: only the one holding point 3
    with pytest.raises(DamagedArtifactError, match="s_test_0000003.safetensors is damaged .* Delete it and rerun the same"):
        load_stest(tmp_path, 3)


def test_the_trainer_refits_a_damaged_cached_basis(tmp_path):
    torch.manual_seed(0)
    model, train = utils.tiny_bert(), utils.classification_dataset(16, seed=1)
    args = hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, influence_last_n_layers=1, influence_rank=2, influence_iterations=4,
                                          influence_shard_size=8, influence_damping=0.1)
    trainer = hfi.InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=PaddingCollator())
    fitted = trainer.fit_influence()
    path = tmp_path / "influence" / "arnoldi_basis.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\xff" * 8)
    scores = trainer.self_influence()  # the damaged basis is reported, fitted again and saved over the damaged file
    basis = hfi.ArnoldiBasis.load(path)
    torch.testing.assert_close(basis.eigenvalues, fitted.eigenvalues, atol=0, rtol=0)  # same weights, same seeded fit
    inf = hfi.Influence(model, last_n_layers=1, damping=0.1, batch_size=16, progress=False)
    torch.testing.assert_close(scores, inf.self_influence(train, basis=basis), atol=API_ATOL, rtol=1e-4)
