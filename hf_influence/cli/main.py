"""``hf-influence`` entry point: one subcommand per job, each with its own dataclass arguments."""

from __future__ import annotations

import os
import sys

from transformers import HfArgumentParser

COMMANDS = {
    "demo": "Embedded default: synthetic NLI task, 10% flipped labels, Arnoldi self-influence, filter, retrain.",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:8s}{text}" for name, text in COMMANDS.items())
        print(f"usage: hf-influence <command> [--help] [options]\n\ncommands:\n{lines}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .demo import DemoArguments, run_demo

    parser = HfArgumentParser(DemoArguments, prog="hf-influence demo", description=COMMANDS["demo"])
    (args,) = parser.parse_args_into_dataclasses(args=argv[1:])
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
