"""Trainer integration: ``InfluenceTrainerMixin`` and its ``TrainingArguments`` mixin."""

from .arguments import InfluenceArgumentsMixin, InfluenceSeq2SeqTrainingArguments, InfluenceTrainingArguments
from .mixin import InfluenceSeq2SeqTrainer, InfluenceTrainer, InfluenceTrainerMixin

__all__ = [
    "InfluenceArgumentsMixin",
    "InfluenceSeq2SeqTrainer",
    "InfluenceSeq2SeqTrainingArguments",
    "InfluenceTrainer",
    "InfluenceTrainerMixin",
    "InfluenceTrainingArguments",
]
