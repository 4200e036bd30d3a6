"""Per-example loss gradients of a classifier's head, the kNN embedding that follows influence.

Influence is ``g_testᵀ (H + λI)^-1 g_train``: it is carried by training gradients, which feature
distance does not see. The head's gradients are cheap (one forward pass and a backward through the
head only) and exact for its parameters: the classification layer, plus the pooled dense layer
feeding it where the model has one (BERT's pooler, RoBERTa's and DistilBERT's pre-classifier). Each
layer's gradient is ``δ ⊗ [a, 1]`` (output gradient times input, the 1 for the bias), summed over
positions when the layer runs at every token (GPT-2's score layer).

A training row is searched with a *query* built from the test side of the same estimator:
the head block of ``(H + λI)^-1 g_test`` (see :func:`head_queries`), so that the inner product of
query and row is exactly the head parameters' share of the influence score.

Sides wider than ``MAX_SIDE`` are compressed by fixed, seeded Gaussian maps (``δ ⊗ a`` becomes
``Rδ ⊗ Sa``, which keeps inner products in expectation), so a 768-wide pooler indexes 128 × 128
numbers per example, not 590k.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._utils.errors import InvalidInputError
from ..data import Batch

MAX_SIDE = 128  # a layer side (outputs, or inputs + bias) wider than this is projected down to it
_PROJECTION_SEED = 20210  # fixed: training rows and queries must see the same maps, in any process


def classifier_output_layer(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` with ``config.num_labels`` outputs: the layer that writes the logits."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise InvalidInputError(
            f"Cannot find the classification head of {type(model).__name__} (a Linear layer with num_labels="
            f"{num_labels} outputs). Pass embed_fn=<(model, batch) -> Tensor[B, d]>."
        )
    return heads[-1]


def head_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """``{module name: layer}`` of the head, in module order: the ``nn.Linear`` just before the
    classification layer when it feeds it (its outputs = the classifier's inputs), then the classifier."""
    output = classifier_output_layer(model)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    position = next(i for i, (_, m) in enumerate(linears) if m is output)
    layers = dict(linears[position:position + 1])
    if position > 0 and linears[position - 1][1].out_features == output.in_features:
        layers = {**dict(linears[position - 1:position]), **layers}
    return layers


def head_parameter_names(model: nn.Module) -> list[str]:
    """The head's parameter names (``<layer>.weight``, ``<layer>.bias``) in ``named_parameters()`` order."""
    return [f"{name}.{kind}" for name, layer in head_layers(model).items() for kind in ("weight", "bias")
            if getattr(layer, kind) is not None]


def _side_map(size: int, device: torch.device) -> torch.Tensor | None:
    """``[MAX_SIDE, size]`` Gaussian map with ``E[MᵀM] = I`` for sides wider than ``MAX_SIDE``, else ``None``."""
    if size <= MAX_SIDE:
        return None
    generator = torch.Generator().manual_seed(_PROJECTION_SEED + size)
    return (torch.randn(MAX_SIDE, size, generator=generator) / math.sqrt(MAX_SIDE)).to(device)


def _compress(block: torch.Tensor) -> torch.Tensor:
    """``[n, out, in]`` layer gradients (or queries) to ``[n, d]`` rows, projecting wide sides."""
    out_map, in_map = _side_map(block.shape[1], block.device), _side_map(block.shape[2], block.device)
    if out_map is not None:
        block = torch.einsum("po,noi->npi", out_map.to(block.dtype), block)
    if in_map is not None:
        block = torch.einsum("noi,qi->noq", block, in_map.to(block.dtype))
    return block.flatten(1)


def _with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[n, out, in]`` weight block and ``[n, out]`` bias as one ``[n, out, in (+1)]`` block."""
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)


def embed_head_gradient(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Each example's cross-entropy gradient w.r.t. the head's parameters, ``[B, d]`` (see the module doc).

    The inner product of two rows is TracIn over the head (exact below ``MAX_SIDE`` per side).
    Search it with ``metric="abs_ip"`` for the largest |influence|. Needs ``labels`` in every batch.
    """
    if "labels" not in batch:
        raise InvalidInputError("The 'head_gradient' embedding needs labels in every batch, test data included (it is the "
                                "gradient of the example's loss). Add a labels column, or use embed_fn='classifier_input'.")
    layers = head_layers(model)
    first = next(iter(layers))
    inputs, outputs = {}, {}

    def capture(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            if name == first:  # differentiate from here on only: the body's graph is never built
                output = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            outputs[name] = output
            return output
        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    grad_mode = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(False)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss = nn.functional.cross_entropy(logits, batch["labels"].long(), reduction="sum")  # rows are independent
        deltas = torch.autograd.grad(loss, [outputs[name] for name in layers])
    finally:
        torch.set_grad_enabled(grad_mode)
        for handle in handles:
            handle.remove()
    blocks = []
    for (name, layer), delta in zip(layers.items(), deltas):
        delta, activation = delta.float(), inputs[name].float()
        if delta.dim() == 3:  # applied at every position: sum the positions' contributions
            weight, bias = torch.einsum("bto,bti->boi", delta, activation), delta.sum(dim=1)
        else:
            weight, bias = delta.unsqueeze(-1) * activation.unsqueeze(1), delta
        blocks.append(_compress(_with_bias(weight, bias if layer.bias is not None else None)))
    return torch.cat(blocks, dim=-1)


def head_queries(model: nn.Module, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Search vectors ``[n, d]`` from parameter-space test vectors, in :func:`embed_head_gradient`'s layout.

    Args:
        model (`nn.Module`): the model the index was built on.
        vectors (`dict[str, torch.Tensor]`): ``{parameter name: [n, *shape]}``, covering
            :func:`head_parameter_names`; typically the preconditioned test gradient
            ``(H + λI)^-1 g_test`` split by parameter, so that ``query · row`` is the head's share of the score.
    """
    blocks = []
    for name, layer in head_layers(model).items():
        bias = vectors[f"{name}.bias"] if layer.bias is not None else None
        blocks.append(_compress(_with_bias(vectors[f"{name}.weight"].float(), None if bias is None else bias.float())))
    return torch.cat(blocks, dim=-1)
