"""Noisy-pair filtering recipes (NLI, translation): noise injection, offline metrics, cards, the pipeline.

The pipeline is ``hf_influence.recipes.runner`` (``RecipeArguments``, ``run_recipe``; ``hf-influence recipe``).
"""

from .noise import NoiseRecord, flip_labels, permute_references

__all__ = ["NoiseRecord", "flip_labels", "permute_references"]
