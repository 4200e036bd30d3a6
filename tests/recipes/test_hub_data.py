"""The Hub configs (glue/mnli, hub/snli, wmt16) without a network: a stand-in ``load_dataset`` returns
splits with the Hub copies' schema, and the recipe runs on them, from a local checkpoint like the
``mnli.yaml`` / ``wmt16.yaml`` configs."""

import random

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Translation, Value
from huggingface_hub import ModelCard
from transformers import BertConfig, BertForSequenceClassification, MarianConfig, MarianMTModel

from hf_influence._utils.errors import InvalidInputError
from hf_influence.recipes.presets import build_tokenizer, fast_tokenizer
from hf_influence.corpora import NLI_LABELS
from hf_influence.recipes import data
from hf_influence.recipes.runner import RecipeArguments, run_recipe

WORDS = "a man woman dog child is are playing running eating the guitar ball food in park not on beach two people".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))


def _nli_split(rows: int, names: list[str], seed: int, unlabelled: int = 0) -> Dataset:
    rng = random.Random(seed)
    labels = [rng.randrange(len(names)) for _ in range(rows)] + [-1] * unlabelled
    features = Features({"premise": Value("string"), "hypothesis": Value("string"), "label": ClassLabel(names=names), "idx": Value("int32")})
    return Dataset.from_dict({"premise": [_sentence(rng) for _ in labels], "hypothesis": [_sentence(rng) for _ in labels],
                              "label": labels, "idx": list(range(len(labels)))}, features=features)


def _wmt_split(rows: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    pairs = [{"de": _sentence(rng).upper(), "en": _sentence(rng)} for _ in range(rows)]
    return Dataset.from_dict({"translation": pairs}, features=Features({"translation": Translation(languages=["de", "en"])}))


@pytest.fixture
def hub(monkeypatch):
    """Replaces ``load_dataset``; ``hub.splits`` is what it returns, ``hub.calls`` what it was asked for."""
    class Hub:
        splits: DatasetDict = DatasetDict()
        calls: list = []

    def load_dataset(repo, config=None):
        Hub.calls.append((repo, config))
        return Hub.splits

    monkeypatch.setattr(data, "load_dataset", load_dataset)
    return Hub


def test_glue_mnli_reads_train_and_validation_matched_with_its_labels(hub):
    hub.splits = DatasetDict({"train": _nli_split(30, list(NLI_LABELS), 0), "validation_matched": _nli_split(10, list(NLI_LABELS), 1),
                              "test_matched": _nli_split(10, list(NLI_LABELS), 2)})
    train, test = data.load_nli("glue/mnli", None)
    assert hub.calls == [("nyu-mll/glue", "mnli")]
    assert train.column_names == ["premise", "hypothesis", "label"] and train.features["label"].names == list(NLI_LABELS)
    assert train["label"] == hub.splits["train"]["label"] and test["premise"] == hub.splits["validation_matched"]["premise"]


def test_hub_labels_are_mapped_by_name_and_unlabelled_pairs_dropped(hub):
    names = ["contradiction", "entailment", "neutral"]  # another order than NLI_LABELS
    split = _nli_split(40, names, 0, unlabelled=5)
    hub.splits = DatasetDict({"train": split, "test": split})
    train, _ = data.load_nli("hub/snli", None)
    assert hub.calls == [("stanfordnlp/snli", None)] and len(train) == 40
    assert [NLI_LABELS[y] for y in train["label"]] == [names[y] for y in split["label"][:40]]


def test_a_hub_copy_with_other_labels_is_refused(hub):
    hub.splits = DatasetDict({"train": _nli_split(5, ["yes", "no", "maybe"], 0), "validation_matched": _nli_split(5, ["yes", "no", "maybe"], 1)})
    with pytest.raises(InvalidInputError, match="expected a ClassLabel over"):
        data.load_nli("glue/mnli", None)


@pytest.mark.parametrize("source, target", [("en", "de"), ("de", "en")])
def test_wmt16_pairs_become_source_and_target(hub, source, target):
    hub.splits = DatasetDict({"train": _wmt_split(6, 0), "test": _wmt_split(3, 1)})
    train, test = data.load_translation("wmt16", None, source, target)
    assert hub.calls == [("wmt/wmt16", "de-en")] and train.column_names == ["source", "target"] and len(test) == 3
    assert train["source"] == [p[source] for p in hub.splits["train"]["translation"]]
    assert train["target"] == [p[target] for p in hub.splits["train"]["translation"]]


def test_the_mnli_recipe_runs_from_a_checkpoint_and_cards_name_the_hub_dataset(hub, tmp_path):
    """``mnli.yaml``'s path at toy size: Hub splits, a saved checkpoint (model + tokenizer), the card's dataset metadata."""
    hub.splits = DatasetDict({"train": _nli_split(80, list(NLI_LABELS), 0), "validation_matched": _nli_split(20, list(NLI_LABELS), 1)})
    tokenizer = fast_tokenizer(build_tokenizer(WORDS))
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, max_position_embeddings=32, num_labels=3, pad_token_id=0))
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    run = run_recipe(RecipeArguments(task="nli", dataset="glue/mnli", model_name_or_path=str(tmp_path / "checkpoint"), max_length=32, epochs=1,
                                     ranks=[2], iterations=4, hessian_examples=16, baselines=["random"], output_dir=str(tmp_path / "run")))
    assert run["num_train"] == 80 and run["removed"] == 8 and set(run["detection"]) == {"arnoldi p̄=2", "random"}
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.datasets == ["nyu-mll/glue"]
    assert {(r.dataset_type, r.dataset_config) for r in card.data.eval_results} == {("nyu-mll/glue", "mnli")}


def test_the_wmt16_recipe_runs_from_a_checkpoint(hub, tmp_path):
    """``wmt16.yaml``'s path at toy size: Hub pairs, a saved Marian checkpoint, BLEU on the test split."""
    hub.splits = DatasetDict({"train": _wmt_split(60, 0), "test": _wmt_split(10, 1)})
    tokenizer = fast_tokenizer(build_tokenizer([w.upper() for w in WORDS] + WORDS))
    tokenizer.add_special_tokens({"eos_token": "[SEP]"})
    model = MarianMTModel(MarianConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                       pad_token_id=0, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0, forced_eos_token_id=None))
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")
    run = run_recipe(RecipeArguments(task="translation", dataset="wmt16", source_lang="en", target_lang="de", model_name_or_path=str(tmp_path / "checkpoint"),
                                     noise_fraction=0.1, max_length=16, epochs=1, ranks=[2], iterations=4, hessian_examples=16,
                                     baselines=["random", "loss"], output_dir=str(tmp_path / "run")))
    assert run["num_train"] == 60 and run["removed"] == 6 and run["noise"]["kind"] == "permuted_references"
    assert run["dataset_id"] == "wmt/wmt16" and all(0.0 <= q <= 100.0 for runs in run["quality"].values() for q in runs)
