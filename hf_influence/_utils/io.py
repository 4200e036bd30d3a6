"""Atomic file writes: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, safe_open, save_file

from .errors import InvalidInputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # unlike mkstemp's 0600, honours the umask
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; if the block succeeds it takes the place of ``path``
    (a folder already there is moved aside by a rename, then deleted)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    tmp.mkdir()  # unlike mkdtemp's 0700, honours the umask
    try:
        yield tmp
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temporary_sibling(target: Path) -> Path:
    """A fresh hidden name beside ``target`` (``.name.<random>.tmp``)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` as safetensors with ``metadata`` stored as one JSON string, atomically."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"hf_influence": json.dumps(metadata)})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`: the tensors and the metadata dict."""
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get("hf_influence")
    if raw is None:
        raise ValueError(f"{path} was not written by hf_influence (no 'hf_influence' metadata).")
    return load_file(str(path)), json.loads(raw)


def check_writable_dir(path: str | os.PathLike, option: str = "output_dir") -> Path:
    """Create ``path`` if needed and prove a file can be written there, before any expensive work."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InvalidInputError(f"{option} {folder} is not writable ({err.strerror}). Pick a folder you can write to.") from None
    return folder
