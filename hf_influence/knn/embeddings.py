"""Embedding strategies for the kNN index: how each example becomes the vector its neighbours are found by.

A strategy is an `Embedding`: ``embed(model, batch) -> Tensor[B, d]`` for the training rows (and,
by default, the test rows too), the index metric it is searched with, and optionally ``queries``,
which turns the test side's preconditioned features into search vectors instead. Built-ins, by
name in ``EMBEDDINGS``:

- ``"head_gradient"`` (the default for sequence classifiers): each example's loss gradient w.r.t. the
  classification head, searched by |inner product| with the head block of ``(H + λI)^-1 g_test``
  (see `hf_influence.knn.head_gradient`);
- ``"classifier_input"`` (FastIF's features): the vector the head's output layer reads, L2;
- ``"encoder_mean"`` (seq2seq, the default there) and ``"last_hidden_mean"`` (causal LMs, the
  default there): hidden states averaged over real tokens, L2.

A plain function ``(model, batch) -> Tensor[B, d]`` is wrapped as a custom strategy searched by L2.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .._utils.errors import InvalidInputError
from ..data import Batch, make_loader, to_device
from ..engine.grads import eval_mode
from ..params import ParamSelection
from .head_gradient import classifier_output_layer, embed_head_gradient, head_parameter_names, head_queries

logger = logging.get_logger(__name__)

EmbedFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> [B, d]


class Embedding:
    """Base of the kNN embedding strategies; subclass it to plug in a new one (``build_index(..., embed_fn=MyEmbedding())``).

    Attributes:
        name (`str`): saved with the index; a built-in is restored from it on load, a custom one is given again.
        metric (`str`): the index metric used when ``build_index`` is given none (``"l2"``, ``"ip"``,
            ``"cosine"`` or ``"abs_ip"``).
    """

    name: str = "custom"
    metric: str = "l2"

    def embed(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``[B, d]`` rows of ``batch`` (any float dtype), computed in eval mode without gradients."""
        raise NotImplementedError(f"{type(self).__name__} must define embed(model, batch) -> Tensor[B, d].")

    def queries(
        self, model: nn.Module, selection: ParamSelection, preconditioned: torch.Tensor, directions: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Search vectors ``[n_test, d]`` from the test side of the estimator, or ``None`` (the default): search
        with ``embed`` of the test rows.

        Args:
            model (`nn.Module`): the model the index was built on.
            selection (`ParamSelection`): the scored parameters.
            preconditioned (`torch.Tensor` of shape `[n_test, r]`): ``A φ(test)``, the preconditioned test features.
            directions (`torch.Tensor` of shape `[r, P]`, *optional*): the subspace ``φ`` projects onto
                (``None``: the features are the gradients themselves, ``r = P``).
        """
        return None

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.embed(model, batch)


class FunctionEmbedding(Embedding):
    """A strategy from a function ``(model, batch) -> Tensor[B, d]``; test rows are embedded the same way."""

    def __init__(self, name: str, function: EmbedFn, metric: str = "l2"):
        self.name, self.function, self.metric = name, function, metric

    def embed(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.function(model, batch)


class HeadGradientEmbedding(Embedding):
    """The head's per-example loss gradients, searched with the head block of the preconditioned test gradient,
    so that ``query · row`` is the head's share of the influence score (see `hf_influence.knn.head_gradient`)."""

    name = "head_gradient"
    metric = "abs_ip"

    def embed(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return embed_head_gradient(model, batch)

    def queries(
        self, model: nn.Module, selection: ParamSelection, preconditioned: torch.Tensor, directions: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The head block of ``(H + λI)^-1 g_test``; ``None`` (with a warning) when the selection leaves the head out."""
        names = head_parameter_names(model)
        if not set(names) <= set(selection.names):
            logger.warning_once(f"The parameter selection leaves out the head ({', '.join(names)}): the head_gradient "
                                "index is searched with the test examples' own head gradients, not their preconditioned ones.")
            return None
        vectors = preconditioned if directions is None else preconditioned @ directions.to(preconditioned.dtype)  # [n_test, P]
        return head_queries(model, selection.unflatten(vectors))


def _real_token_mask(batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """``[B, T, 1]`` float: 1 at real tokens (all tokens when the batch has no attention mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.new_ones(hidden.shape[:2]).unsqueeze(-1)
    return mask.to(hidden.dtype).unsqueeze(-1)


def _masked_mean(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of ``[B, T, d]`` states over real tokens only: ``[B, d]``."""
    mask = _real_token_mask(batch, hidden)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def _last_real_token(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """State at each sequence's rightmost real token (where GPT-style classifiers read): ``[B, d]``."""
    mask = _real_token_mask(batch, hidden).squeeze(-1)  # [B, T]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * (mask > 0)).amax(dim=1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _text_inputs(batch: Batch) -> Batch:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


def embed_classifier_input(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The vector the classification head's output layer reads: BERT's pooler output, RoBERTa's
    dense+tanh first-token state; for heads applied at every position (GPT-2), the last real token's."""
    captured: list[torch.Tensor] = []
    handle = classifier_output_layer(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    features = captured[-1]
    return _last_real_token(features, batch) if features.dim() == 3 else features


def embed_encoder_mean(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Encoder states of a seq2seq model (Marian, T5, BART), averaged over real tokens."""
    hidden = model.get_encoder()(**_text_inputs(batch)).last_hidden_state  # [B, T, d]
    return _masked_mean(hidden, batch)


def embed_last_hidden_mean(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Last hidden states of a causal LM's base model (after its final norm), averaged over real tokens."""
    hidden = model.base_model(**_text_inputs(batch)).last_hidden_state  # [B, T, d]
    return _masked_mean(hidden, batch)


EMBEDDINGS: dict[str, Embedding] = {
    "classifier_input": FunctionEmbedding("classifier_input", embed_classifier_input),
    "encoder_mean": FunctionEmbedding("encoder_mean", embed_encoder_mean),
    "last_hidden_mean": FunctionEmbedding("last_hidden_mean", embed_last_hidden_mean),
    "head_gradient": HeadGradientEmbedding(),
}


def infer_embedding(model: nn.Module) -> str:
    """Name of the default embedding for ``model``'s class (a key of ``EMBEDDINGS``).

    Sequence classifiers get ``"head_gradient"``: influence is carried by training gradients, which feature
    distance does not see (on SICK, recall@10 at ``k`` = 1% of the training set is about 1 with it and near
    random with FastIF's ``"classifier_input"``; see ``benchmarks/RESULTS.md``).
    """
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "head_gradient"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return "encoder_mean"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "last_hidden_mean"
    raise InvalidInputError(
        f"No built-in embedding for model class {name!r} (built-ins: *ForSequenceClassification, encoder-decoder "
        "models, *ForCausalLM / *LMHeadModel). Pass embed_fn=<(model, batch) -> Tensor[B, d]>."
    )


def custom_embedding_name(embed_fn: EmbedFn) -> str:
    """The name saved for a user-supplied embedding function."""
    return f"custom:{getattr(embed_fn, '__qualname__', type(embed_fn).__name__)}"


def resolve_embedding(model: nn.Module, embed_fn: Embedding | EmbedFn | str | None) -> Embedding:
    """The strategy ``embed_fn`` stands for: an `Embedding`, a function, a key of ``EMBEDDINGS``, or ``None`` (inferred)."""
    if isinstance(embed_fn, Embedding):
        return embed_fn
    if callable(embed_fn):
        return FunctionEmbedding(custom_embedding_name(embed_fn), embed_fn)
    name = infer_embedding(model) if embed_fn is None else embed_fn
    if name not in EMBEDDINGS:
        raise InvalidInputError(
            f"embed_fn must be an Embedding, a callable, None or one of {sorted(EMBEDDINGS)}; got {embed_fn!r}."
        )
    return EMBEDDINGS[name]


def compute_embeddings(
    model: nn.Module,
    data: Any,
    embed_fn: Embedding | EmbedFn | str | None = None,
    batch_size: int = 32,
    pad_token_id: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Embed every example of ``data`` with the model's own features, in order.

    Args:
        model (`nn.Module`): a HF model, run in eval mode without gradients.
        data (`datasets.Dataset` or `DataLoader`): tokenized examples (a ``DataLoader`` is used as is).
        embed_fn (`Embedding`, `Callable` or `str`, *optional*): a strategy, a function
            ``(model, batch) -> Tensor[B, d]``, or the name of a built-in (``"head_gradient"``,
            ``"classifier_input"``, ``"encoder_mean"``, ``"last_hidden_mean"``); inferred from the model
            class when ``None`` (see :func:`infer_embedding`). Padding never enters a mean.
        batch_size (`int`, defaults to `32`): batch size when ``data`` is a ``Dataset``.
        pad_token_id (`int`, defaults to `0`): id used to pad ``input_ids``.
        progress (`bool`, defaults to `True`): show a tqdm bar.

    Returns:
        `torch.Tensor` of shape `[N, d]`, float32, on the CPU.
    """
    strategy = resolve_embedding(model, embed_fn)
    device = next(model.parameters()).device
    rows = []
    with eval_mode(model):
        for batch in tqdm(make_loader(data, batch_size, pad_token_id), desc="embeddings", disable=not progress):
            rows.append(strategy.embed(model, to_device(batch, device)).float().cpu())
    return torch.cat(rows)
