"""Tasks: how to turn a batch into one loss per example, for each kind of HF model.

Losses are per example: the sum over a sequence's target tokens (labels equal to -100 are
ignored), never a mean over tokens. Score scales depend on this convention.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ._utils.adapters import unwrap_peft
from ._utils.errors import TaskInferenceError

MaskKind = Literal["bidirectional", "causal"]


@runtime_checkable
class Task(Protocol):
    """What the engine needs from a task.

    ``per_example_loss(model, batch)`` returns a float tensor of shape ``[B]``. A task may also
    define ``per_example_measurement(model, batch) -> Tensor[B]`` for the test side (defaults to
    the loss), ``mask_kind`` (``"bidirectional"`` or ``"causal"``) to let per-example gradients
    run vectorised over padded batches, and ``required_columns`` (checked before any work).
    """

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Half/bf16 logits upcast to fp32 for the loss; fp32 and fp64 kept as they are."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies per sequence; -100 labels contribute nothing. ``[B]``."""
    token_loss = F.cross_entropy(
        _at_least_fp32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return token_loss.reshape(labels.shape).sum(dim=-1)


class SequenceClassificationTask:
    """Cross-entropy (single label), squared error (regression) or summed BCE (multi-label).

    ``mask_kind`` follows the backbone: ``"causal"`` for a decoder-only one (GPT-2, Llama), whose
    classifier reads the last real token, else ``"bidirectional"`` (see :func:`attention_kind`).
    """

    required_columns: tuple[str, ...] = ("input_ids", "labels")

    def __init__(self, mask_kind: MaskKind = "bidirectional"):
        self.mask_kind = mask_kind

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = _at_least_fp32(model(**inputs).logits)  # [B, C]
        labels = batch["labels"]
        problem = getattr(model.config, "problem_type", None)
        if problem == "regression" or (problem is None and logits.shape[-1] == 1):
            return (logits - labels.to(logits.dtype).reshape(logits.shape)).pow(2).sum(dim=-1)
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").sum(dim=-1)
        return F.cross_entropy(logits, labels, reduction="none")


class Seq2SeqTask:
    """Summed token cross-entropy of the target sequence (Marian, T5, BART, ...)."""

    mask_kind: MaskKind = "bidirectional"
    required_columns: tuple[str, ...] = ("input_ids", "labels")

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        return _token_loss_sum(model(**inputs).logits, labels)


class CausalLMTask:
    """Summed next-token cross-entropy. Without ``labels``, ``input_ids`` with padding masked out."""

    mask_kind: MaskKind = "causal"
    required_columns: tuple[str, ...] = ("input_ids",)

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(~_real_tokens(mask), -100)
        logits = model(**inputs).logits
        return _token_loss_sum(logits[:, :-1], labels[:, 1:])


def _real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` True at real tokens, from a 2-D 0/1 mask or a 4-D causal mask (its diagonal)."""
    if mask.dim() == 4:
        diagonal = mask.diagonal(dim1=-2, dim2=-1)[:, 0]  # [B, T]: may token t attend to itself?
        return diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return mask.bool()


def attention_kind(model: nn.Module) -> MaskKind:
    """``"causal"`` when the model's backbone attends only to earlier tokens: a decoder (``is_decoder``)
    or an architecture with a causal-LM head and no masked-LM head in transformers' auto mappings
    (GPT-2, Llama, Mistral, ...); ``"bidirectional"`` otherwise (BERT, RoBERTa, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_decoder", False) or (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return "causal"
    return "bidirectional"


def infer_task(model: nn.Module) -> Task:
    """Pick the built-in task for ``model`` from its class and config.

    A PEFT model (``get_peft_model(...)``, ``PeftModel.from_pretrained(...)``) is judged by the model it
    adapts (``get_base_model()``); the task then runs the PEFT model itself, adapters included.
    """
    base = unwrap_peft(model)
    name = type(base).__name__
    config = getattr(base, "config", None)
    if name.endswith("ForSequenceClassification"):
        return SequenceClassificationTask(attention_kind(base))
    if getattr(config, "is_encoder_decoder", False) and hasattr(base, "prepare_decoder_input_ids_from_labels"):
        return Seq2SeqTask()
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CausalLMTask()
    wrapper = f" (wrapped by {type(model).__name__})" if base is not model else ""
    raise TaskInferenceError(
        f"Cannot infer a task for model class {name!r}{wrapper}: built-in tasks cover *ForSequenceClassification, "
        "encoder-decoder models (Marian, T5, BART) and *ForCausalLM / *LMHeadModel. Pass "
        "task=<object with per_example_loss(model, batch) -> Tensor[B]> to hfi.Influence."
    )
