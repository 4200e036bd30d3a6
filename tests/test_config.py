"""One settings model: Python, the Trainer and the CLI build identical settings; damping belongs to the scorer."""

import dataclasses

import pytest
import torch
from transformers import HfArgumentParser

import hf_influence as hfi
from hf_influence._utils.errors import IncompatibleBasisError, InvalidInputError
from hf_influence.cli.arguments import InfluenceArguments
from hf_influence.cli.fit import FitArguments
from hf_influence.cli.score import ScoringArguments
from hf_influence.config import BasisConfig, InfluenceConfig, ScoringConfig, pick
from hf_influence.recipes.runner import RecipeArguments
from hf_influence.recipes.tasks import influence_settings
from tests import utils

RANK = 6
SETTINGS = {"last_n_layers": 1, "damping": 0.05, "batch_size": 4, "seed": 3, "projection": "grads", "random_projection": "kronecker",
            "memory_budget_gb": 1.5, "hessian_examples": 32}
BASIS = {"rank": 7, "iterations": 30, "curvature": "fisher"}
SCORING = {"method": "tracin", "shard_size": 64}


def cli_configs(settings: dict) -> tuple:
    argv = [token for key, value in settings.items() for token in (f"--{key}", str(value))]
    parser = HfArgumentParser((InfluenceArguments, FitArguments, ScoringArguments))
    inf_args, fit_args, scoring_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return pick(inf_args, InfluenceConfig), pick(fit_args, BasisConfig), pick(scoring_args, ScoringConfig)


def trainer_configs(settings: dict, tmp_path) -> tuple:
    args = hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), **{f"influence_{k}": v for k, v in settings.items()})
    return tuple(args.influence_config(config) for config in (InfluenceConfig, BasisConfig, ScoringConfig))


RECIPE_LACKS = ("projection", "random_projection", "memory_budget_gb", "curvature", "method")  # settings a recipe YAML does not expose
# (a recipe names the method at each ranking)


def recipe_configs(settings: dict, tmp_path) -> tuple:
    """The recipe's keys (its own names for two of them) through its one map, back into the config classes."""
    renamed = {"batch_size": "influence_batch_size"}
    given = {renamed.get(k, k): v for k, v in settings.items() if k != "rank"}
    recipe = RecipeArguments(**given, ranks=[settings.get("rank", BasisConfig.rank)], output_dir=str(tmp_path))
    trainer_args = hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), **influence_settings(recipe))
    return tuple(trainer_args.influence_config(config) for config in (InfluenceConfig, BasisConfig, ScoringConfig))


def python_configs(model, settings: dict) -> tuple:
    return (hfi.Influence(model, progress=False, **{k: v for k, v in settings.items() if k in SETTINGS}).config,
            BasisConfig(**{k: v for k, v in settings.items() if k in BASIS}),
            ScoringConfig(**{k: v for k, v in settings.items() if k in SCORING}))


@pytest.mark.parametrize("settings", [{}, {**SETTINGS, **BASIS, **SCORING}], ids=["defaults", "given"])
def test_python_trainer_cli_and_recipes_build_identical_settings(settings, tmp_path):
    model = utils.tiny_bert()
    python = python_configs(model, settings)
    assert cli_configs(settings) == python
    assert trainer_configs(settings, tmp_path) == python
    for_recipes = {k: v for k, v in settings.items() if k not in RECIPE_LACKS}
    assert recipe_configs(for_recipes, tmp_path) == python_configs(model, for_recipes)


@pytest.mark.parametrize("bad, message", [
    ({"damping": -0.1}, "damping must be a number >= 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"projection": "fast"}, "projection must be one of"),
    ({"random_projection": "sparse"}, "random_projection must be one of"),
    ({"params": ["classifier"], "last_n_layers": 1}, "params and last_n_layers are both set"),
    ({"hessian_examples": 0}, "hessian_examples must be an integer >= 1"),
])
def test_each_rule_is_stated_once_with_the_callers_spelling(bad, message, tmp_path):
    with pytest.raises(InvalidInputError, match=message):
        InfluenceConfig(**bad)
    with pytest.raises(InvalidInputError, match=f"influence_{message}"):
        hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), **{f"influence_{k}": v for k, v in bad.items()})
    with pytest.raises(InvalidInputError, match=f"--{message}"):
        InfluenceArguments(**bad)


def test_hessian_examples_is_one_seeded_subset(trained_bert):
    model, train, _ = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, hessian_examples=20, seed=5, progress=False)
    rows = inf.hessian_rows(train)
    expected = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(5))[:20].tolist())
    assert rows["input_ids"] == train.select(expected)["input_ids"]
    torch.testing.assert_close(inf.exact_hessian(train), inf.exact_hessian(train.select(expected)), atol=0, rtol=0)


def test_one_basis_scored_at_two_dampings_gives_both_closed_forms(trained_bert):
    model, train, _ = trained_bert
    fitter = hfi.Influence(model, last_n_layers=1, damping=123.0, batch_size=16, progress=False)  # fitting ignores damping
    basis = fitter.fit_arnoldi(train, rank=RANK, iterations=3 * RANK)
    g_train = utils.collect_grads(fitter, train)
    coordinates = g_train @ basis.eigenvectors.T  # [N, p̄]
    for damping in (1e-3, 0.5):
        scorer = hfi.Influence(model, last_n_layers=1, damping=damping, batch_size=16, progress=False)
        expected = (coordinates**2 / (basis.eigenvalues + damping)).sum(1)
        torch.testing.assert_close(scorer.self_influence(train, basis=basis), expected, rtol=utils.CLOSED_FORM_RTOL, atol=0)


def test_basis_reuse_rule(trained_bert, tmp_path):
    model, train, _ = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, batch_size=16, progress=False)
    basis = inf.fit_arnoldi(train, rank=RANK, iterations=3 * RANK)
    basis.save(tmp_path)
    loaded = hfi.ArnoldiBasis.load(tmp_path)
    assert inf.basis_mismatches(loaded) == [] and inf.basis_mismatches(loaded, rank=RANK, curvature="hessian") == []
    assert inf.basis_mismatches(loaded, rank=RANK + 1) == [f"rank: saved {RANK}, requested {RANK + 1}"]
    assert inf.basis_mismatches(loaded, curvature="fisher") == ["curvature: saved hessian, requested fisher"]
    other = hfi.Influence(model, params=["classifier"], progress=False)
    with pytest.raises(IncompatibleBasisError, match="parameter selection"):
        other.check_basis(loaded)
    changed = dataclasses.replace(loaded, fingerprint="0" * 64)
    with pytest.raises(IncompatibleBasisError, match="model weights"):
        inf.check_basis(changed)
    weight = next(iter(inf.selection.tensors(model).values()))  # a basis verified once is checked again after a weight changes
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    try:
        with pytest.raises(IncompatibleBasisError, match="model weights"):
            inf.check_basis(loaded)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert inf.basis_mismatches(loaded) == []
