"""PEFT adapter models (LoRA, ...), recognised without importing ``peft``.

A ``PeftModel`` wraps the user's model (``model.get_base_model()``) and names each adapter tensor
after the adapter it belongs to: ``...query.lora_A.<adapter>.weight``, ``...classifier.modules_to_save.<adapter>.weight``.
"""

from __future__ import annotations

import json
import re

from torch import nn

# Adapter config fields that change between fitting and loading the same adapter, not what it computes.
_VOLATILE_CONFIG = ("peft_version", "base_model_name_or_path", "revision", "inference_mode", "runtime_config", "auto_mapping")
_ADAPTER_SEGMENT = re.compile(r"(?:^|\.)(?:lora_[A-Za-z_]+|modules_to_save)\.([^.]+)(?:\.|$)")


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel`` and its task subclasses)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper adapts (``get_base_model()``); any other model as it is."""
    return model.get_base_model() if is_peft_model(model) else model


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters a PEFT model runs with (``[]`` for any other model)."""
    if not is_peft_model(model):
        return []
    active = getattr(model, "active_adapters", None) or getattr(model, "active_adapter", None)
    return [active] if isinstance(active, str) else list(active or [])


def adapter_parameter_filter(model: nn.Module):
    """Predicate on parameter names: ``True`` for the tensors of the active adapter(s) (LoRA A/B, the
    ``modules_to_save`` copies of the head), whose names hold the adapter name as a dotted segment."""
    segments = [re.compile(rf"(^|\.){re.escape(name)}(\.|$)") for name in active_adapters(model)]
    return lambda name: any(segment.search(name) for segment in segments)


def adapter_signature(model: nn.Module) -> str:
    """The base model class and the active adapters' configs (rank, alpha, targets, ...) as a stable string;
    ``""`` for a model that is not a PEFT wrapper. Goes into the fingerprint: the same LoRA weights
    with another ``lora_alpha`` compute another function."""
    if not is_peft_model(model):
        return ""
    configs = {}
    for name in active_adapters(model):
        config = model.peft_config[name].to_dict()
        configs[name] = {k: _stable(v) for k, v in config.items() if k not in _VOLATILE_CONFIG}
    return json.dumps({"base_model": type(unwrap_peft(model)).__name__, "adapters": configs}, sort_keys=True, default=str)


def adapter_names_in(parameter_names: list[str]) -> list[str]:
    """Adapter names that LoRA / ``modules_to_save`` parameter names carry, in first-seen order."""
    found: dict[str, None] = {}
    for name in parameter_names:
        match = _ADAPTER_SEGMENT.search(name)
        if match:
            found[match.group(1)] = None
    return list(found)


def describe_adapter_change(saved_names: list[str], requested_names: list[str]) -> str:
    """``" (another PEFT adapter: saved ['a'], requested ['b'])"`` when the two selections name different
    adapters; ``""`` when they name the same ones (or none)."""
    saved, requested = adapter_names_in(saved_names), adapter_names_in(requested_names)
    if saved == requested:
        return ""
    return f" (another PEFT adapter: saved {saved or 'none'}, requested {requested or 'none'})"


def _stable(value):
    """Sets, and lists of module names, as sorted lists without repeats, recursively: a set's iteration order
    changes between processes, and PEFT repeats ``modules_to_save`` when it loads an adapter."""
    if isinstance(value, (set, frozenset)) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return sorted({str(_stable(v)) for v in value})
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    return value
