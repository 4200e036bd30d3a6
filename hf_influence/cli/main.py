"""``hf-influence`` entry point: one subcommand per job, each with its own dataclass arguments.

Every subcommand takes ``--config file.yaml`` (flat ``key: value`` lines; command-line options
override it) and ``--help``. Launch under ``torchrun`` or ``accelerate launch`` to use several
processes (see README).
"""

from __future__ import annotations

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


COMMANDS = {
    "demo": Command("Embedded default: synthetic NLI task, 10% flipped labels, Arnoldi self-influence, filter, retrain.", _demo),
    "stest": Command("s_test = (H + λI)^-1 ∇L(test) by LiSSA (auto settings, FastIF or Koh & Liang presets), one "
                     "safetensors file per test point, resumable.", _stest),
}


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
    parser = HfArgumentParser(dataclass_types, prog=f"hf-influence {name}", description=COMMANDS[name].help)
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
