"""`trainer.build_influence_index()` + `trainer.influence(test, index=..., k=...)` equal the trainer's full scan's top-k."""

import torch

import hf_influence as hfi
from hf_influence.data import PaddingCollator
from tests import utils
from tests.index.test_index import assert_exact

K = 5


def test_trainer_index_equals_the_trainer_full_scan(trained_bert, tmp_path):
    model, train, test = trained_bert
    args = hfi.InfluenceTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, influence_last_n_layers=1,
        influence_rank=4, influence_iterations=8, influence_shard_size=20, influence_batch_size=16, influence_damping=utils.BERT_DAMPING,
        influence_hessian_examples=16,
    )
    trainer = hfi.InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=PaddingCollator())
    store = trainer.build_influence_index()  # arnoldi: fits and saves the basis first
    assert store.size == len(train) and store.rank == 4
    assert hfi.InfluenceIndex.exists(tmp_path / "influence" / "index")
    full = trainer.influence(test)  # [n_test, n_train], same basis
    for direction in ("helpful", "harmful", "abs"):
        assert_exact(trainer.influence(test, index=store, k=K, direction=direction), full, direction)
    again = trainer.build_influence_index()  # every shard already saved: nothing recomputed
    assert torch.equal(again.features, store.features)
    assert [e["influence/shards_computed"] for e in trainer.state.log_history if "influence/shards_computed" in e][-1] == 0
