"""Which parameters influence is taken over, their flattened order, and a model fingerprint.

A flattened vector (a gradient, an s_test, an eigenvector) follows the ``named_parameters()``
order of the selected parameters.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ._utils.adapters import adapter_parameter_filter, adapter_signature, is_peft_model
from ._utils.errors import ParameterSelectionError

logger = logging.get_logger(__name__)

_LAYER_STACK = re.compile(r"(^|\.)(layer|layers|h|block|blocks)$")


@dataclass(frozen=True)
class ParamSelection:
    """Names and shapes of the selected parameters, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The selected parameters of ``model``, detached (the point derivatives are taken at)."""
        named = dict(model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``tensors`` into ``[*batch, P]``, keeping ``batch_dims`` leading dims."""
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``vector`` (``[*batch, P]``) back into named tensors of shape ``[*batch, *shape]``."""
        lead = vector.shape[:-1]
        pieces = torch.split(vector, self.numels, dim=-1)
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def fingerprint(self, model: nn.Module) -> str:
        """SHA-256 over the selected names, shapes, dtypes and values, plus the model class; for a PEFT
        model also the base model class and the active adapters' configs (rank, alpha, targets)."""
        digest = hashlib.sha256(type(model).__name__.encode())
        digest.update(adapter_signature(model).encode())
        for name, tensor in self.tensors(model).items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        """JSON-ready description used in saved metadata."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}


def select_parameters(
    model: nn.Module, params: Sequence[str] | str | None = None, last_n_layers: int | None = None
) -> ParamSelection:
    """Select parameters by regexes (``re.search`` on the name), by layer depth, or all trainable.

    On a PEFT model the trainable parameters are its active adapter's (LoRA A/B, and the head where
    PEFT keeps it trainable through ``modules_to_save``). An adapter loaded for inference
    (``PeftModel.from_pretrained(...)`` without ``is_trainable=True``) has none trainable: then the
    active adapter's own parameters take their place, so the selection is the same either way.

    Args:
        model (`nn.Module`): the model.
        params (`list[str]`, *optional*): name regexes; a parameter is kept if any matches.
            ``None`` keeps every trainable parameter.
        last_n_layers (`int`, *optional*): keep the last ``k`` blocks of each transformer layer
            stack plus every parameter outside the stacks that is not an embedding (the head,
            pooler and final norms). Cannot be combined with ``params``.
    """
    if params is not None and last_n_layers is not None:
        raise ParameterSelectionError("Pass either params=[regexes] or last_n_layers=k, not both.")
    trainable = _candidates(model)
    if last_n_layers is not None:
        keep = _last_layers_filter(model, last_n_layers)
    elif params is not None:
        patterns = _compile_patterns([params] if isinstance(params, str) else list(params))
        keep = lambda name: any(p.search(name) for p in patterns)  # noqa: E731
    else:
        keep = lambda name: True  # noqa: E731
    chosen = [(n, p) for n, p in trainable if keep(n)]
    if not chosen:
        sample = ", ".join(n for n, _ in trainable[:8])
        raise ParameterSelectionError(
            f"The parameter selection params={params!r} last_n_layers={last_n_layers!r} matches no trainable "
            f"parameter. Names look like: {sample}, ... Fix the regexes (matched with re.search)."
        )
    return ParamSelection(tuple(n for n, _ in chosen), tuple(tuple(p.shape) for _, p in chosen))


def _candidates(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters; on a PEFT model with none trainable, its active adapter's parameters."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable and is_peft_model(model):
        in_adapter = adapter_parameter_filter(model)
        trainable = [(n, p) for n, p in model.named_parameters() if in_adapter(n)]
        logger.info(f"The PEFT model has no trainable parameter (an adapter loaded for inference): selecting from "
                    f"its active adapter's {len(trainable)} tensors.")
    if not trainable:
        raise ParameterSelectionError(
            "The model has no trainable parameters (all requires_grad=False): unfreeze the ones to take influence "
            "over (parameter.requires_grad_(True))."
        )
    return trainable


def _compile_patterns(patterns: list[str]) -> list[re.Pattern]:
    """The name regexes, compiled; a malformed one is refused with the regex error."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise ParameterSelectionError(
                f"params entry {pattern!r} is not a valid regular expression ({err}). Escape special characters "
                r"(e.g. 'classifier\.weight') or pass a list of strings."
            ) from None
    return compiled


def _last_layers_filter(model: nn.Module, k: int):
    """Predicate for ``last_n_layers=k``: last k blocks of each layer stack, plus non-embedding rest."""
    if k < 1:
        raise ParameterSelectionError(f"last_n_layers must be >= 1, got {k}.")
    stacks = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and _LAYER_STACK.search(name)]
    if not stacks:
        raise ParameterSelectionError(
            f"last_n_layers={k}: found no transformer layer stack (a ModuleList named layer/layers/h/block) "
            f"in {type(model).__name__}. Select parameters with params=[regexes] instead."
        )
    kept_blocks: list[str] = []
    for stack in stacks:
        size = len(model.get_submodule(stack))
        kept_blocks += [f"{stack}.{i}." for i in range(max(0, size - k), size)]
    embeddings = [name + "." for name, mod in model.named_modules() if isinstance(mod, nn.Embedding) or "embed" in name.split(".")[-1]]

    def keep(name: str) -> bool:
        if any(name.startswith(s + ".") for s in stacks):
            return any(name.startswith(b) for b in kept_blocks)
        return not any(name.startswith(e) for e in embeddings)

    return keep


def weights_version(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple:
    """Name, identity and in-place version counter of each tensor: changes whenever one is replaced or changed in place,
    so a check that hashed the weights once (an index's compatibility) is redone only when they change."""
    return tuple((name, id(tensor), tensor._version) for name, tensor in named_tensors)
