"""The fixed-feature head of ``benchmarks/lds.py``: the tiny BERT's pooler + classifier refit alone on frozen [CLS] states.

Every function works in float64 on a dict of the head's four tensors, named as in ``BertForSequenceClassification``.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from datasets import Dataset

from hf_influence.data import make_loader


@torch.no_grad()
def cls_features(model, data: Dataset) -> torch.Tensor:
    """The frozen encoder's [CLS] states, what the pooler reads: [n, hidden], float64."""
    rows = [model.bert(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state[:, 0] for b in make_loader(data, 128)]
    return torch.cat(rows).double()


def head_init(model, seed: int) -> dict[str, torch.Tensor]:
    """The seeded starting point of every head fit: weights N(0, 1/fan_in), biases 0, float64."""
    generator = torch.Generator().manual_seed(seed + 1)
    return {name: (torch.randn(param.shape, generator=generator, dtype=torch.float64) / param.shape[1] ** 0.5 if param.dim() == 2
                   else torch.zeros(param.shape, dtype=torch.float64))
            for name, param in model.named_parameters() if name.startswith(("bert.pooler", "classifier"))}


def head_logits(head: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """BertForSequenceClassification's head in eval mode: classifier(tanh(pooler(h_cls)))."""
    pooled = torch.tanh(features @ head["bert.pooler.dense.weight"].T + head["bert.pooler.dense.bias"])
    return pooled @ head["classifier.weight"].T + head["classifier.bias"]


def fit_head(init: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, l2: float, iterations: int) -> dict[str, torch.Tensor]:
    """The head minimising mean cross-entropy + l2/2 ‖θ‖² on fixed features (L-BFGS, strong Wolfe), float64."""
    head = {k: v.detach().clone().double().requires_grad_(True) for k, v in init.items()}
    optimizer = torch.optim.LBFGS(list(head.values()), lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head_logits(head, features), labels) + 0.5 * l2 * sum((v**2).sum() for v in head.values())
        loss.backward()
        return loss

    optimizer.step(closure)
    return {k: v.detach() for k, v in head.items()}


def test_losses(head: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head_logits(head, features), labels, reduction="none")


def scored_model(model, head: dict[str, torch.Tensor]):
    """A copy of the tiny BERT whose head is the fixed-feature fit on every training pair (float32, eval mode)."""
    scored = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in scored.named_parameters():
            if name in head:
                param.copy_(head[name].float())
    return scored.eval()


def subset_train_fn(init, features, labels, test_features, test_labels, l2: float, iterations: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``run_subset_models``' train_fn: fit the head on the subset's features, return its per-example test losses."""

    def train_fn(index: int, subset: torch.Tensor) -> torch.Tensor:
        head = fit_head(init, features[subset], labels[subset], l2, iterations)
        return test_losses(head, test_features, test_labels)
    return train_fn
