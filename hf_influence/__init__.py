"""hf_influence: influence functions for Hugging Face Transformers."""

from .engine.ihvp.arnoldi import ArnoldiBasis
from .engine.ihvp.lissa import LissaConfig
from .influence import Influence, Method
from .index import InfluenceIndex
from .lds import LdsResult, lds, lds_subsets
from .metrics import knn_recall
from .tasks import CausalLMTask, Seq2SeqTask, SequenceClassificationTask, Task
from .trainer import (
    InfluenceSeq2SeqTrainer,
    InfluenceSeq2SeqTrainingArguments,
    InfluenceTrainer,
    InfluenceTrainerMixin,
    InfluenceTrainingArguments,
)

__all__ = [
    "ArnoldiBasis",
    "CausalLMTask",
    "Influence",
    "InfluenceIndex",
    "InfluenceSeq2SeqTrainer",
    "InfluenceSeq2SeqTrainingArguments",
    "InfluenceTrainer",
    "InfluenceTrainerMixin",
    "InfluenceTrainingArguments",
    "LdsResult",
    "LissaConfig",
    "Method",
    "Seq2SeqTask",
    "SequenceClassificationTask",
    "Task",
    "knn_recall",
    "lds",
    "lds_subsets",
]
__version__ = "0.1.0"
