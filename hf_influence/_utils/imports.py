"""Optional dependencies: a cheap ``is_x_available()`` probe and an import with a remedy."""

from __future__ import annotations

import importlib.util
from types import ModuleType


def is_faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def require_faiss() -> ModuleType:
    """Import ``faiss`` or raise an ``ImportError`` that says how to install it."""
    if not is_faiss_available():
        raise ImportError(
            "The kNN restriction needs FAISS, which is not installed. Install the CPU build with "
            "`pip install faiss-cpu` (or `faiss-gpu-cu12` for CUDA), or call scores() without knn=."
        )
    import faiss

    return faiss


def is_matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib() -> ModuleType:
    """Import ``matplotlib`` or raise an ``ImportError`` that says how to install it or skip the plots."""
    if not is_matplotlib_available():
        raise ImportError("Plots need matplotlib, which is not installed: `pip install matplotlib`, or pass --plots false.")
    import matplotlib

    return matplotlib
