"""Atomic file writes (a temporary file in the target folder, then a rename), and the one reading path for
every artifact read back.

Disks, copies, sync tools and people damage files. Every safetensors file we write carries a SHA-256
over its metadata and tensors (``hf_influence_sha256`` beside the ``hf_influence`` metadata), every
JSON artifact a SHA-256 over its content (``_sha256``, with ``_written_by``), and the readers
(:func:`read_tensors_artifact`, :func:`read_json_artifact`) turn any parse or integrity failure into a
`DamagedArtifactError` that names the file, says what is wrong and gives the way out. Files written
before the checksums existed still load (unverified).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import safe_open, save_file

from .errors import DamagedArtifactError, InvalidInputError

TENSORS_CHECKSUM_KEY = "hf_influence_sha256"  # safetensors header metadata, beside "hf_influence"
JSON_FORMAT_KEY, JSON_CHECKSUM_KEY = "_written_by", "_sha256"  # two marks, so one damaged key name is still caught


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


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _file_checksum(raw_metadata: str, tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(raw_metadata.encode() + tensors_checksum(tensors).encode()).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` as safetensors with ``metadata`` stored as one JSON string and a checksum of both, atomically."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    raw = json.dumps(metadata)
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={"hf_influence": raw, TENSORS_CHECKSUM_KEY: _file_checksum(raw, contiguous)})


def damaged_artifact(path: str | os.PathLike, what: str, problem: str, remedy: str) -> DamagedArtifactError:
    """The one message for a damaged file: which file, what it should hold, what is wrong, the way out."""
    return DamagedArtifactError(f"{path} is damaged and cannot be read as {what}: {problem}. {remedy}", path=path)


def read_tensors_artifact(path: str | os.PathLike, what: str, remedy: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`: its tensors and metadata dict, checksum verified when it has one.

    Args:
        path (`str` or `os.PathLike`): the file (`FileNotFoundError` if absent).
        what (`str`): what it holds, for the message (``"an Arnoldi basis"``).
        remedy (`str`): the way out, for the message (``"Delete it and fit the basis again: ..."``).

    Raises:
        `DamagedArtifactError`: the file is cut short, is not safetensors, was not written by hf_influence or
        fails its checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except PermissionError:
        raise
    except Exception as err:  # safetensors raises SafetensorError (or others) for any cut or garbled header
        raise damaged_artifact(path, what, f"it is cut short or not a safetensors file ({_first_line(err)})", remedy) from None
    raw = header.get("hf_influence")
    if raw is None:
        raise damaged_artifact(path, what, "its header lacks the 'hf_influence' metadata every file we write carries", remedy)
    expected = header.get(TENSORS_CHECKSUM_KEY)
    if expected is not None and expected != _file_checksum(raw, tensors):
        raise damaged_artifact(path, what, "it fails its checksum: its contents changed after it was written", remedy)
    try:
        metadata = json.loads(raw)
    except ValueError as err:
        raise damaged_artifact(path, what, f"its metadata is not valid JSON ({err})", remedy) from None
    if not isinstance(metadata, dict):
        raise damaged_artifact(path, what, f"its metadata is a JSON {type(metadata).__name__}, not an object", remedy)
    return tensors, metadata


def write_json_artifact(path: str | os.PathLike, payload: dict, indent: int | None = 2) -> Path:
    """Write ``payload`` as JSON (values JSON cannot hold become strings) with a checksum of its content, atomically."""
    stamped = {**json.loads(json.dumps(payload, default=str)), JSON_FORMAT_KEY: "hf_influence"}
    stamped[JSON_CHECKSUM_KEY] = _json_checksum(stamped)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stamped, indent=indent))
    return Path(path)


def read_json_artifact(path: str | os.PathLike, what: str, remedy: str, keys: tuple[str, ...] = ()) -> dict:
    """Read a JSON object written by :func:`write_json_artifact` (or an older unchecksummed one), without its marks.

    Args:
        path (`str` or `os.PathLike`): the file (`FileNotFoundError` if absent).
        what (`str`), remedy (`str`): what it holds and the way out, for the message.
        keys (`tuple[str, ...]`): keys it must have.

    Raises:
        `DamagedArtifactError`: not UTF-8, not JSON, not an object, a failed checksum, or a key missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {path}.")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise damaged_artifact(path, what, f"it is not UTF-8 text (byte {err.start})", remedy) from None
    except json.JSONDecodeError as err:
        raise damaged_artifact(path, what, f"it is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})", remedy) from None
    except ValueError as err:  # e.g. an integer too long to convert
        raise damaged_artifact(path, what, f"it is not valid JSON ({err})", remedy) from None
    if not isinstance(data, dict):
        raise damaged_artifact(path, what, f"it holds a JSON {type(data).__name__}, not an object", remedy)
    if JSON_FORMAT_KEY in data or JSON_CHECKSUM_KEY in data:
        expected = data.pop(JSON_CHECKSUM_KEY, None)
        if expected != _json_checksum(data):
            raise damaged_artifact(path, what, "it fails its checksum: its contents changed after it was written", remedy)
        data.pop(JSON_FORMAT_KEY, None)
    missing = [key for key in keys if key not in data]
    if missing:
        raise damaged_artifact(path, what, f"it lacks {', '.join(map(repr, missing))}", remedy)
    return data


def _json_checksum(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


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
