"""``TrainingArguments`` with influence settings: a dataclass mixin whose fields all start with ``influence_``.

The fields are those of `hf_influence.config.InfluenceConfig`, `BasisConfig` and `ScoringConfig`
(same types, defaults, help and checks), each renamed ``influence_<name>``, plus ``influence_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from ..config import BasisConfig, InfluenceConfig, ScoringConfig, prefixed_fields, unprefixed

PREFIX = "influence_"
_CONFIGS = (InfluenceConfig, BasisConfig, ScoringConfig)


def _post_init(self) -> None:
    super(InfluenceArgumentsMixin, self).__post_init__()
    for config in _CONFIGS:
        unprefixed(self, PREFIX, config)  # every rule of the config classes, with the influence_ names in the message


def _config(self, config: type) -> object:
    """The ``config`` class (`InfluenceConfig`, `BasisConfig` or `ScoringConfig`) these arguments describe."""
    return unprefixed(self, PREFIX, config)


InfluenceArgumentsMixin = make_dataclass(
    "InfluenceArgumentsMixin",
    prefixed_fields(PREFIX, *_CONFIGS)
    + [("influence_dir", str, field(default="influence", metadata={"help": "Sub-folder of output_dir for the basis and score shards."}))],
    namespace={"__post_init__": _post_init, "influence_config": _config, "__module__": __name__, "__doc__": (
        "Influence settings read by `InfluenceTrainerMixin`: every field of `InfluenceConfig`, `BasisConfig` and "
        "`ScoringConfig` as ``influence_<name>``, with the same default and check, plus ``influence_dir``. Mixed into "
        "`transformers.TrainingArguments` (`InfluenceTrainingArguments`) and `Seq2SeqTrainingArguments`, so the same "
        "``HfArgumentParser`` that reads training options reads these. ``args.influence_config(InfluenceConfig)`` "
        "returns the settings as that class.")},
)


@dataclass
class InfluenceTrainingArguments(InfluenceArgumentsMixin, TrainingArguments):
    """`transformers.TrainingArguments` plus the ``influence_*`` settings of `InfluenceArgumentsMixin`."""


@dataclass
class InfluenceSeq2SeqTrainingArguments(InfluenceArgumentsMixin, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` plus the ``influence_*`` settings of `InfluenceArgumentsMixin`."""
