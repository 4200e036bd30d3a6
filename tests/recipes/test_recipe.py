"""A tiny NLI recipe run on SICK end to end: recorded noise, detection table, filtering, cards with valid metadata."""

import json
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from huggingface_hub import DatasetCard, ModelCard

from hf_influence._utils.errors import InvalidInputError
from hf_influence.cli.main import main
from hf_influence.metrics import noise_detection_metrics
from hf_influence.recipes import NoiseRecord
from hf_influence.recipes.retraining import run_save_path
from hf_influence.recipes.runner import RecipeArguments, run_recipe
from hf_influence.recipes.statistics import CEILING_ARM, paired_test, recovered_share
from hf_influence.recipes.tasks import NliRecipeTask, with_overlap_hint

SICK = Path(__file__).resolve().parents[3] / "shared" / "data" / "sick"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not (SICK / "SICK.txt").is_file():
        pytest.skip("../shared/data/sick is absent")
    out = tmp_path_factory.mktemp("recipe")
    return run_recipe(_tiny_args(out)), out


def _tiny_args(out: Path) -> RecipeArguments:
    """2 rankings filter (Arnoldi and the loss), 2 seeds per arm, validation influence ranked beside them."""
    return RecipeArguments(task="nli", dataset="sick", data_dir=str(SICK), max_train=160, max_test=60, epochs=1, hidden_size=32, overlap_hint=True,
                           ranks=[3, 6], iterations=12, hessian_examples=48, last_n_layers=1, baselines=["random", "loss", "tracin", "val_influence"],
                           filter_methods=["arnoldi", "loss"], retrain_seeds=2, output_dir=str(out / "run"), card_dir=str(out / "cards"),
                           run_name="tiny-sick")


def test_the_run_records_its_noise_and_scores_every_ranking(tiny_run):
    run, out = tiny_run
    record = NoiseRecord.load(out / "run" / "noise.json")
    assert record.kind == "label_flip" and len(record.rows) == 16 and record.num_rows == 160
    assert json.loads((out / "run" / "results.json").read_text())["noise"]["rows"] == record.rows
    assert list(run["detection"]) == ["arnoldi p̄=3", "arnoldi p̄=6", "validation influence", "tracin", "loss", "random"]
    assert all(0.0 <= row["auc"] <= 1.0 and 0.0 < row["ap"] <= 1.0 for row in run["detection"].values())
    assert list(run["quality"]) == ["clean", "noisy", CEILING_ARM, "filtered by arnoldi p̄=6", "filtered by loss"]
    assert all(len(runs) == 2 for runs in run["quality"].values()) and run["seeds"] == [0, 1]


def test_each_filter_is_summarised_against_noisy_and_the_loss_filter(tiny_run):
    """The summary's figures are recomputable from the per-seed qualities and the detection table."""
    run, _ = tiny_run
    quality, arnoldi, loss = run["quality"], run["filtering"]["filtered by arnoldi p̄=6"], run["filtering"]["filtered by loss"]
    assert arnoldi["vs_noisy"] == paired_test(quality["filtered by arnoldi p̄=6"], quality["noisy"])
    assert arnoldi["vs_loss"] == paired_test(quality["filtered by arnoldi p̄=6"], quality["filtered by loss"]) and loss["vs_loss"] is None
    assert arnoldi["auc"] == run["detection"]["arnoldi p̄=6"]["auc"] and loss["ap"] == run["detection"]["loss"]["ap"]
    assert arnoldi["recovered"] == recovered_share(quality["clean"], quality["noisy"], quality["filtered by arnoldi p̄=6"])
    assert loss["removed"] == 16 and 0 <= loss["removed_noisy"] <= 16
    assert arnoldi["of_ceiling"] == recovered_share(quality[CEILING_ARM], quality["noisy"], quality["filtered by arnoldi p̄=6"])
    assert run["ceiling"]["recovered"] == recovered_share(quality["clean"], quality["noisy"], quality[CEILING_ARM])
    assert run["ceiling"]["vs_noisy"] == paired_test(quality[CEILING_ARM], quality["noisy"])


def test_the_ceiling_arm_trains_on_exactly_the_uncorrupted_rows(tiny_run, monkeypatch):
    """The ceiling (the perfect filter) drops the recorded corrupted rows and nothing else."""
    run, out = tiny_run
    trained = []
    original = NliRecipeTask.trainer
    monkeypatch.setattr(NliRecipeTask, "trainer", lambda self, *a: trained.append(a[0]) or original(self, *a))
    run_save_path(out / "run", CEILING_ARM, 0).unlink()
    assert run_recipe(_tiny_args(out))["quality"][CEILING_ARM] == run["quality"][CEILING_ARM]  # retrained, seeded: same figure
    assert len(trained) == 1 and sorted(trained[0]["row_index"]) == sorted(set(range(160)) - set(run["noise"]["rows"]))


def test_a_rerun_reads_every_result_back_and_retrains_only_what_is_missing(tiny_run, monkeypatch):
    """A killed run continues: the rankings and each (arm, seed) quality are read back; a deleted result is trained again."""
    run, out = tiny_run
    trained = []
    original = NliRecipeTask.trainer
    monkeypatch.setattr(NliRecipeTask, "trainer", lambda self, *a: trained.append(a[1:]) or original(self, *a))
    again = run_recipe(_tiny_args(out))
    assert trained == [] and again["quality"] == run["quality"] and again["detection"] == run["detection"]
    run_save_path(out / "run", "filtered by loss", 1).unlink()
    assert run_recipe(_tiny_args(out))["quality"] == run["quality"]  # seeded: the retrained run gives the same figure
    assert len(trained) == 1 and trained[0][-1] == 1


def test_the_filtered_set_drops_exactly_the_top_self_influence_rows(tiny_run):
    run, out = tiny_run
    kept = load_from_disk(str(out / "run" / "filtered_dataset"))
    assert len(kept) == run["kept"] == 160 - 16 == 160 - run["removed"]
    dropped = sorted(set(range(160)) - set(kept["row_index"]))
    assert run["removed_noisy"] == len(set(dropped) & set(run["noise"]["rows"]))


def test_the_model_card_metadata_is_valid_model_index(tiny_run):
    """huggingface_hub parses the card back: its model-index results equal the run's figures."""
    run, out = tiny_run
    card = ModelCard.load(out / "cards" / "tiny-sick.md")
    assert card.data.model_name == "tiny-sick" and "hf-influence" in card.data.tags
    results = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    for training, runs in run["quality"].items():
        assert results[("accuracy", f"accuracy after training on the {training} data (mean of 2 runs)")] == pytest.approx(sum(runs) / len(runs), abs=1e-4)
    for ranking, row in run["detection"].items():
        assert results[("noise_detection_auc", f"{ranking} AUC")] == pytest.approx(row["auc"], abs=1e-4)
    assert run["command"].startswith("hf-influence") and run["command"] in card.text
    assert DatasetCard.load(out / "cards" / "tiny-sick.dataset.md").data.pretty_name == "sick filtered by arnoldi p̄=6"
    assert "| loss |" in card.text and "Filtering by each ranking, then retraining" in card.text


def test_detection_figures_are_recomputable_from_the_record(tiny_run):
    """The random ranking is seeded: AUC/AP recomputed from its scores and the recorded rows agree."""
    run, _ = tiny_run
    noisy = [i in set(run["noise"]["rows"]) for i in range(160)]
    scores = torch.rand(160, generator=torch.Generator().manual_seed(0))
    expected = noise_detection_metrics(scores, noisy)
    assert run["detection"]["random"]["auc"] == pytest.approx(expected["auc"]) and run["detection"]["random"]["ap"] == pytest.approx(expected["ap"])


@pytest.mark.parametrize("options, message", [
    (["--task", "vision"], "task must be one of"),
    (["--noise_fraction", "0"], "noise_fraction must be in"),
    (["--ranks", "90", "--iterations", "80"], "ranks must be"),
    (["--baselines", "kfac"], "Unknown baselines"),
    (["--filter_methods", "lissa"], "Unknown filter_methods"),
    (["--filter_methods", "tracin", "--baselines", "loss"], "are not computed"),
    (["--task", "translation", "--dataset", "multi30k", "--baselines", "val_influence"], "val_influence needs a clean validation split"),
    (["--params", "classifier", "--last_n_layers", "1"], "params and last_n_layers are both set"),
    (["--task", "translation", "--overlap_hint", "true"], "overlap_hint is an NLI setting"),
])
def test_bad_settings_stop_before_any_work(options, message, capsys):
    assert main(["recipe", *options]) == 1
    assert message in capsys.readouterr().err


def test_a_local_dataset_without_its_folder_says_where_to_point():
    with pytest.raises(InvalidInputError, match="data_dir"):
        run_recipe(RecipeArguments(task="nli", dataset="sick"))


def test_the_overlap_hint_lists_the_words_each_side_lacks_in_order():
    hinted = with_overlap_hint("A man is playing a guitar", "The man is not playing the Guitar", "[SEP]")
    assert hinted == "The man is not playing the Guitar [SEP] The not the [SEP] A a"
    assert with_overlap_hint("Two dogs run", "two dogs run", "</s>") == "two dogs run </s>  </s> "


def test_an_fsdp_launch_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # set by `accelerate launch` with distributed_type FSDP
    with pytest.raises(InvalidInputError, match="not under FSDP"):
        run_recipe(RecipeArguments(task="nli", dataset="sick", data_dir=str(SICK), output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_the_loss_ranking_is_in_row_order_when_training_groups_rows_by_length(tmp_path):
    """Under group_by_length the Trainer's prediction loop reorders rows; the loss ranking must not: each row's
    cross-entropy equals that row's loss computed alone."""
    import random

    from datasets import ClassLabel, Dataset

    from hf_influence.corpora import NLI_LABELS
    from hf_influence.recipes.presets import make_pair

    rng = random.Random(0)
    pairs = [make_pair(rng) for _ in range(40)]
    raw = Dataset.from_dict({"premise": [p for p, _, _ in pairs], "hypothesis": [h + " very" * (i % 7) for i, (_, h, _) in enumerate(pairs)],
                             "label": [lab for _, _, lab in pairs]}).cast_column("label", ClassLabel(names=list(NLI_LABELS)))
    args = RecipeArguments(task="nli", hidden_size=16, num_layers=1, group_by_length=True, output_dir=str(tmp_path))
    recipe = NliRecipeTask(args, raw)
    data = recipe.encode(raw).add_column("row_index", list(range(40)))
    trainer = recipe.trainer(data, tmp_path / "run", seed=0)
    model = trainer.model.eval()
    with torch.no_grad():
        alone = torch.stack([torch.nn.functional.cross_entropy(model(**{k: torch.tensor([data[i][k]]) for k in ("input_ids", "attention_mask",
                             "token_type_ids")}).logits, torch.tensor([data[i]["labels"]])) for i in range(40)])
    torch.testing.assert_close(recipe.loss(trainer, data), alone, rtol=1e-4, atol=1e-5)


def test_a_saved_run_is_reused_whatever_the_influence_settings():
    """A training result is keyed by the training settings only: changing an influence setting (the memory budget, the
    damping, the ranks) or the number of seeds reuses it; changing the learning rate trains again."""
    import dataclasses

    from datasets import Dataset

    from hf_influence.recipes.retraining import ROW_INDEX, training_request

    data = Dataset.from_dict({ROW_INDEX: [0, 1, 2], "labels": [0, 1, 2]})
    base = RecipeArguments(task="nli", dataset="sick")
    same = dataclasses.replace(base, memory_budget_gb=16.0, damping=0.1, ranks=[5], retrain_seeds=5)
    assert training_request(same, data, 0) == training_request(base, data, 0)
    assert training_request(dataclasses.replace(base, learning_rate=base.learning_rate / 2), data, 0) != training_request(base, data, 0)
