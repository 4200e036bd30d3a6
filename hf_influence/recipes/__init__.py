"""Noisy-pair filtering recipes (NLI, translation): noise injection, offline metrics, cards, the pipeline."""

from .noise import NoiseRecord, flip_labels, permute_references
from .runner import RecipeArguments, run_recipe

__all__ = ["NoiseRecord", "RecipeArguments", "flip_labels", "permute_references", "run_recipe"]
