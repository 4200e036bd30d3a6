"""InfluenceTrainer / InfluenceSeq2SeqTrainer: scores equal the formulas on the trainer's own model and data."""

import dataclasses

import pytest
import torch
from transformers import BatchEncoding, HfArgumentParser, Trainer, TrainingArguments

import hf_influence as hfi
from hf_influence._utils.errors import InvalidInputError, TrainerMixinError
from hf_influence.data import PaddingCollator
from hf_influence.trainer.mixin import TensorBatches
from tests import utils

RANK, ITERATIONS, HESSIAN_EXAMPLES = 4, 8, 16
FORMULA_ATOL = 1e-10  # float64 model: trainer scores vs the closed forms on per-example gradients
API_ATOL = 1e-5  # float32 models: trainer vs Influence facade (same maths, batches built by another collator)


def influence_args(tmp_path, seq2seq=False, **overrides):
    cls = hfi.InfluenceSeq2SeqTrainingArguments if seq2seq else hfi.InfluenceTrainingArguments
    settings = {"influence_last_n_layers": 1, "influence_rank": RANK, "influence_iterations": ITERATIONS,
                "influence_shard_size": 10, "influence_batch_size": 16, **overrides}
    return cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, **settings)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.fixture(scope="module")
def loaded(trained_bert, tmp_path_factory):
    """An InfluenceTrainer around the already trained float64 BERT (no train() call), and the exact gradients."""
    model, train, test = trained_bert
    trainer = hfi.InfluenceTrainer(model=model, args=influence_args(tmp_path_factory.mktemp("loaded"), influence_damping=utils.BERT_DAMPING,
                                                                    influence_hessian_examples=HESSIAN_EXAMPLES),
                                   train_dataset=train, data_collator=PaddingCollator())
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    return trainer, inf, utils.collect_grads(inf, train), utils.collect_grads(inf, test)


def test_scores_on_a_loaded_model_equal_the_formulas(loaded, trained_bert):
    trainer, inf, g_train, g_test = loaded
    _, train, test = trained_bert
    torch.testing.assert_close(trainer.self_influence(method="tracin"), (g_train**2).sum(1), atol=FORMULA_ATOL, rtol=0)
    torch.testing.assert_close(trainer.influence(test, method="tracin"), g_test @ g_train.T, atol=FORMULA_ATOL, rtol=0)

    basis = trainer.fit_influence()  # Hessian over a seeded random subset (seed influence_seed=0), in row order
    subset = sorted(torch.randperm(48, generator=torch.Generator().manual_seed(0))[:HESSIAN_EXAMPLES].tolist())
    expected = inf.fit_arnoldi(train.select(subset), rank=RANK, iterations=ITERATIONS)
    torch.testing.assert_close(basis.eigenvalues, expected.eigenvalues, atol=FORMULA_ATOL, rtol=0)
    inverse = basis.inverse_eigenvalues(utils.BERT_DAMPING)  # damping is the scorer's setting
    coordinates = g_train @ basis.eigenvectors.T  # [N, p̄]
    torch.testing.assert_close(trainer.self_influence(), (coordinates**2 * inverse).sum(1), atol=FORMULA_ATOL, rtol=0)
    pairwise = (g_test @ basis.eigenvectors.T) * inverse @ coordinates.T  # [n_test, N]
    torch.testing.assert_close(trainer.influence(test), pairwise, atol=FORMULA_ATOL, rtol=0)
    nearest = trainer.influence(test, knn=5)
    torch.testing.assert_close(nearest.scores, pairwise.gather(1, nearest.indices), atol=FORMULA_ATOL, rtol=0)
    assert torch.equal(nearest.indices, inf.scores(test, train, basis=basis, knn=5).indices)
    assert logged(trainer, "influence/basis_rank")[-1] == RANK


def test_filter_noisy_drops_the_top_scores_and_resumes_from_shards(loaded, trained_bert):
    trainer, _, g_train, _ = loaded
    _, train, _ = trained_bert
    scores = trainer.self_influence(method="tracin")
    assert logged(trainer, "influence/shards_computed")[-1] == 0 and logged(trainer, "influence/shards_skipped")[-1] == 5
    kept = trainer.filter_noisy(fraction=0.25, method="tracin")
    dropped = set(scores.argsort(descending=True)[:12].tolist())
    assert kept["input_ids"] == [train[i]["input_ids"] for i in range(48) if i not in dropped]
    assert logged(trainer, "influence/removed")[-1] == 12
    threshold = float(scores.median())
    kept = trainer.filter_noisy(threshold=threshold, method="tracin")
    assert len(kept) == int((scores <= threshold).sum())
    with pytest.raises(InvalidInputError, match="exactly one of fraction= or threshold="):
        trainer.filter_noisy(fraction=0.1, threshold=1.0)


def test_after_train_the_basis_follows_the_new_weights(tmp_path):
    torch.manual_seed(0)
    model, train = utils.tiny_bert(), utils.classification_dataset(24, seed=1)
    trainer = hfi.InfluenceTrainer(model=model, args=influence_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=8,
                                                                    influence_damping=0.1),
                                   train_dataset=train, data_collator=PaddingCollator())
    before = trainer.fit_influence()
    trainer.train()
    scores = trainer.self_influence()  # the saved basis belongs to the old weights: refitted first
    basis = hfi.ArnoldiBasis.load(tmp_path / "influence")
    inf = hfi.Influence(model, last_n_layers=1, damping=0.1, batch_size=16, progress=False)
    assert basis.fingerprint == inf.selection.fingerprint(model) != before.fingerprint
    assert len(logged(trainer, "influence/basis_rank")) == 1  # train() starts a fresh log: this is the refit
    torch.testing.assert_close(scores, inf.self_influence(train, basis=basis), atol=API_ATOL, rtol=1e-4)


def test_mixed_precision_training_scores_in_the_models_dtype(tmp_path):
    """bf16=True leaves Accelerate's autocast wrapper on model.forward: the trainer removes it, and the facade refuses it."""
    torch.manual_seed(0)
    model, train = utils.tiny_bert(), utils.classification_dataset(24, seed=1)
    trainer = hfi.InfluenceTrainer(model=model, args=influence_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=8,
                                                                    influence_damping=0.1, bf16=True),
                                   train_dataset=train, data_collator=PaddingCollator())
    trainer.train()
    assert "_original_forward" in vars(model)  # what Accelerate leaves behind after mixed-precision training
    with pytest.raises(InvalidInputError, match="keep_fp32_wrapper=False"):
        hfi.Influence(model, last_n_layers=1, progress=False).self_influence(train, method="tracin")
    scores = trainer.self_influence(method="tracin")
    assert "_original_forward" not in vars(model)
    inf = hfi.Influence(model, last_n_layers=1, batch_size=16, progress=False)  # float32 throughout
    torch.testing.assert_close(scores, inf.self_influence(train, method="tracin"), atol=API_ATOL, rtol=1e-4)


@pytest.mark.parametrize("build", [utils.tiny_marian, utils.tiny_t5])
def test_seq2seq_trainer_equals_the_facade(build, tmp_path):
    torch.manual_seed(0)
    model, train = build(), utils.seq2seq_dataset(20)
    trainer = hfi.InfluenceSeq2SeqTrainer(model=model, args=influence_args(tmp_path, seq2seq=True, influence_damping=0.1),
                                          train_dataset=train, data_collator=PaddingCollator())
    inf = hfi.Influence(model, last_n_layers=1, damping=0.1, batch_size=16, progress=False)
    torch.testing.assert_close(trainer.self_influence(method="tracin"), (inf.gradients(train) ** 2).sum(1), atol=API_ATOL, rtol=1e-4)
    scores = trainer.self_influence()
    torch.testing.assert_close(scores, inf.self_influence(train, basis=hfi.ArnoldiBasis.load(tmp_path / "influence")),
                               atol=API_ATOL, rtol=1e-4)


def test_collator_output_is_reduced_to_tensors():
    collate = TensorBatches(lambda rows: BatchEncoding({"input_ids": torch.ones(len(rows), 3), "note": "text"}))
    assert list(collate([{}, {}])) == ["input_ids"]
    with pytest.raises(TrainerMixinError, match="returned a tuple"):
        TensorBatches(lambda rows: (torch.ones(1),))([{}])


def test_mixing_into_a_non_trainer_fails_at_class_creation():
    with pytest.raises(TrainerMixinError, match="not a transformers.Trainer"):
        type("NotATrainer", (hfi.InfluenceTrainerMixin, object), {})


def test_plain_training_arguments_are_refused_before_work(tmp_path):
    trainer_cls = type("MyTrainer", (hfi.InfluenceTrainerMixin, Trainer), {})
    trainer = trainer_cls(model=utils.tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                          train_dataset=utils.classification_dataset(4), data_collator=PaddingCollator())
    with pytest.raises(TrainerMixinError, match="needs InfluenceTrainingArguments"):
        trainer.self_influence()
    assert not (tmp_path / "influence").exists()


def test_arguments_are_prefixed_defaulted_documented_and_checked():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = [f for f in dataclasses.fields(hfi.InfluenceTrainingArguments) if f.name not in base]
    assert added and all(f.name.startswith("influence_") and f.metadata.get("help") for f in added)
    assert all(f.default is not dataclasses.MISSING for f in added)
    (args,) = HfArgumentParser(hfi.InfluenceTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--influence_rank", "5", "--influence_params", "classifier", "pooler", "--report_to", "none"])
    assert (args.influence_rank, args.influence_params) == (5, ["classifier", "pooler"])
    with pytest.raises(InvalidInputError, match="influence_rank must be <= iterations"):
        hfi.InfluenceTrainingArguments(output_dir="x", influence_rank=50, influence_iterations=20, report_to="none")
    with pytest.raises(InvalidInputError, match="influence_method must be one of"):
        hfi.InfluenceSeq2SeqTrainingArguments(output_dir="x", influence_method="lissa", report_to="none")


def test_sharded_parameters_are_refused_with_the_way_out(tmp_path):
    """Under FSDP (or ZeRO-3) each process holds a shard of every parameter: refused before any work, naming what to do."""
    trainer = hfi.InfluenceTrainer(model=utils.tiny_bert(), args=influence_args(tmp_path), train_dataset=utils.classification_dataset(4),
                                   data_collator=PaddingCollator())
    trainer.is_fsdp_enabled = True  # what Trainer sets when Accelerate runs with distributed_type FSDP
    with pytest.raises(TrainerMixinError, match=r"shards them \(FSDP\).*score the saved model"):
        trainer.self_influence()
    assert not (tmp_path / "influence").exists()
