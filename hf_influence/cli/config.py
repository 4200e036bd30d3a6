"""Dataclass arguments from the command line plus ``--config file.yaml`` (command-line values win).

An unknown key in the YAML file stops the run before anything is loaded, with the closest valid
names offered.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser

from .._utils.errors import InvalidInputError


def parse_command_args(parser: HfArgumentParser, argv: Sequence[str]) -> tuple[Any, ...]:
    """Parse ``argv`` into the parser's dataclasses; ``--config path.yaml`` supplies defaults."""
    argv = list(argv)
    config_path = _pop_option(argv, "--config")
    if config_path is not None:
        values = read_config(config_path, parser)
        parser.set_defaults(**values)
        for action in parser._actions:  # a key given by the file is no longer required on the command line
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def read_config(path: str, parser: HfArgumentParser) -> dict[str, Any]:
    """The flat mapping in a YAML config, checked against the parser's dataclass fields."""
    file = Path(path)
    if not file.is_file():
        raise InvalidInputError(f"--config {path}: no such file. Pass the path of a YAML file of `key: value` lines.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InvalidInputError(f"--config {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise InvalidInputError(f"--config {path} must hold a mapping of `key: value` lines, got {type(values).__name__}.")
    known = [f.name for dc in parser.dataclass_types for f in fields(dc)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [f"{key!r} (did you mean {difflib.get_close_matches(key, known, n=1)[0]!r}?)"
                 if difflib.get_close_matches(key, known, n=1) else repr(key) for key in unknown]
        raise InvalidInputError(
            f"--config {path}: unknown key(s) {', '.join(hints)}. Remove or rename them; valid keys: {', '.join(sorted(known))}."
        )
    return values


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``name value`` or ``name=value`` from ``argv`` and return the value."""
    for i, token in enumerate(argv):
        if token == name:
            if i + 1 >= len(argv):
                raise InvalidInputError(f"{name} needs a value (a YAML file path).")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if token.startswith(name + "="):
            del argv[i]
            return token.split("=", 1)[1]
    return None
