"""``hf-influence`` entry point: one subcommand per job, each with its own dataclass arguments.

Every subcommand takes ``--config file.yaml`` (flat ``key: value`` lines; command-line options
override it) and ``--help``. Launch under ``torchrun`` or ``accelerate launch`` to use several
processes (see README).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .._utils.errors import HfInfluenceError


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its argument dataclasses, and the function they are passed to."""

    help: str
    load: Callable[[], tuple[tuple[type, ...], Callable[..., Any]]]  # imported lazily: `--help` stays fast


def _demo():
    from .demo import DemoArguments, run_demo

    return (DemoArguments,), run_demo


def _stest():
    from .arguments import DataArguments, InfluenceArguments, ModelArguments
    from .stest import StestArguments, run_stest

    return (ModelArguments, DataArguments, InfluenceArguments, StestArguments), run_stest


def _fit():
    from .arguments import DataArguments, InfluenceArguments, ModelArguments
    from .fit import FitArguments, run_fit

    return (ModelArguments, DataArguments, InfluenceArguments, FitArguments), run_fit


def _score():
    from .arguments import DataArguments, InfluenceArguments, ModelArguments
    from .score import ScoreArguments, ScoringArguments, run_score

    return (ModelArguments, DataArguments, InfluenceArguments, ScoringArguments, ScoreArguments), run_score


def _filter():
    from .arguments import DataArguments, InfluenceArguments, ModelArguments
    from .filter import FilterArguments, run_filter
    from .score import ScoringArguments

    return (ModelArguments, DataArguments, InfluenceArguments, ScoringArguments, FilterArguments), run_filter


def _index():
    from .arguments import DataArguments, InfluenceArguments, ModelArguments
    from .index import IndexArguments, run_index

    return (ModelArguments, DataArguments, InfluenceArguments, IndexArguments), run_index


def _query():
    from .arguments import DataArguments, InfluenceArguments, ModelArguments
    from .query import QueryArguments, run_query

    return (ModelArguments, DataArguments, InfluenceArguments, QueryArguments), run_query


def _recipe():
    from ..recipes.runner import RecipeArguments, run_recipe

    return (RecipeArguments,), run_recipe


COMMANDS = {
    "demo": Command("Embedded default: synthetic NLI task, 10% flipped labels, InfluenceTrainer: Arnoldi self-influence, "
                    "filter, retrain.", _demo),
    "fit": Command("Hessian spectrum + Arnoldi eigenbasis of the training loss, fitted once and saved.", _fit),
    "score": Command("Self-influence of every training row, or test-vs-train scores (--knn k: FastIF); sharded over "
                     "processes, resumable.", _score),
    "stest": Command("s_test = (H + λI)^-1 ∇L(test) by LiSSA (auto settings, FastIF or Koh & Liang presets), one "
                     "safetensors file per test point, resumable.", _stest),
    "filter": Command("Drop the most self-influential training rows (likely mislabelled); save the rest with a dataset card.", _filter),
    "index": Command("Store every training row's influence features once (Arnoldi, randproj, projected TracIn); sharded, "
                     "resumable; for exact top-k `query` runs.", _index),
    "query": Command("Top-k most influential training rows of each test row from an index, exact, with their text, to parquet.", _query),
    "recipe": Command("Noisy-pair filtering recipe (NLI or translation): inject noise, rank by self-influence and baselines, "
                      "filter, retrain, evaluate, write cards.", _recipe),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the command's description as written; show each option's default."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:8s}{command.help}" for name, command in COMMANDS.items())
        print(f"usage: hf-influence <command> [--config file.yaml] [options]\n\ncommands:\n{lines}\n\n"
              "`hf-influence <command> --help` lists a command's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import HfArgumentParser

    from .config import parse_command_args

    name = argv[0]
    dataclass_types, run = COMMANDS[name].load()
    description = inspect.getdoc(sys.modules[run.__module__]) or COMMANDS[name].help  # the command module's docstring
    parser = HfArgumentParser(dataclass_types, prog=f"hf-influence {name}", description=description, formatter_class=_HelpFormatter)
    _show_info_logs()
    try:
        run(*parse_command_args(parser, argv[1:]))
    except HfInfluenceError as err:
        print(f"hf-influence {name}: error: {err}", file=sys.stderr)
        return 1
    return 0


def _show_info_logs() -> None:
    """Print hf_influence's INFO messages (chosen settings and why) on the main process only."""
    logger = logging.getLogger("hf_influence")
    if os.environ.get("RANK", "0") == "0" and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[hf_influence] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
