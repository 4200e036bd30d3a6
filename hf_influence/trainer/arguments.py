"""``TrainingArguments`` with influence settings: a dataclass mixin whose fields all start with ``influence_``."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .._utils.errors import InvalidInputError
from ..distributed import SHARDED_METHODS
from ..engine.ihvp.arnoldi import CURVATURES

PROJECTIONS = ("auto", "jvp", "grads")


@dataclass
class InfluenceArgumentsMixin:
    """Influence settings read by `InfluenceTrainerMixin`; every field is defaulted and checked in ``__post_init__``.

    Mixed into `transformers.TrainingArguments` (`InfluenceTrainingArguments`) and
    `transformers.Seq2SeqTrainingArguments` (`InfluenceSeq2SeqTrainingArguments`), so the same
    ``HfArgumentParser`` that reads training options reads these.
    """

    influence_method: str = field(default="arnoldi", metadata={
        "help": "Scoring method: 'arnoldi' (top Hessian eigenpairs, fitted by fit_influence) or 'tracin' (gradient dot product)."})
    influence_params: list[str] | None = field(default=None, metadata={
        "help": "Regexes (re.search) selecting the parameters influence is taken over (default: all trainable)."})
    influence_last_n_layers: int | None = field(default=None, metadata={
        "help": "Take influence over the last k transformer layers + head instead (no embeddings)."})
    influence_damping: float = field(default=1e-3, metadata={"help": "Additive damping λ: scores use (H + λI)^-1."})
    influence_rank: int = field(default=20, metadata={"help": "Arnoldi: eigenpairs kept (p̄)."})
    influence_iterations: int = field(default=100, metadata={"help": "Arnoldi: iterations (one HVP pass over the Hessian data each)."})
    influence_curvature: str = field(default="hessian", metadata={
        "help": "Eigenbasis of the 'hessian' (Arnoldi, influence_iterations HVP passes) or the empirical 'fisher' "
                "(exact, one pass of per-example gradients over the Hessian rows)."})
    influence_hessian_examples: int = field(default=512, metadata={
        "help": "Arnoldi: the Hessian is that of the mean loss over a seeded random subset of this many training rows."})
    influence_batch_size: int = field(default=16, metadata={"help": "Examples per batch for per-example gradients and HVPs."})
    influence_shard_size: int = field(default=1024, metadata={
        "help": "Rows per saved score shard (fixed partitions: a rerun or another process count resumes them)."})
    influence_projection: str = field(default="auto", metadata={
        "help": "Arnoldi projections: 'jvp' (forward mode), 'grads' (per-example gradients) or 'auto' (the cheaper)."})
    influence_memory_budget_gb: float = field(default=2.0, metadata={"help": "Bound on per-example gradient memory, GiB."})
    influence_seed: int = field(default=0, metadata={"help": "Seed of the Arnoldi start vector and the Hessian subset."})
    influence_dir: str = field(default="influence", metadata={
        "help": "Sub-folder of output_dir for the basis and score shards."})

    def __post_init__(self):
        super().__post_init__()
        methods = [m.value for m in SHARDED_METHODS]
        if self.influence_method not in methods:
            raise InvalidInputError(f"influence_method must be one of {methods}, got {self.influence_method!r}.")
        if self.influence_projection not in PROJECTIONS:
            raise InvalidInputError(f"influence_projection must be one of {PROJECTIONS}, got {self.influence_projection!r}.")
        if self.influence_curvature not in CURVATURES:
            raise InvalidInputError(f"influence_curvature must be one of {CURVATURES}, got {self.influence_curvature!r}.")
        if self.influence_damping < 0:
            raise InvalidInputError(f"influence_damping must be >= 0 (additive, (H + λI)^-1), got {self.influence_damping}.")
        if not 1 <= self.influence_rank <= self.influence_iterations:
            raise InvalidInputError(f"Need 1 <= influence_rank <= influence_iterations, got {self.influence_rank} and "
                                    f"{self.influence_iterations}: raise influence_iterations.")
        for name in ("influence_hessian_examples", "influence_batch_size", "influence_shard_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.influence_params is not None and self.influence_last_n_layers is not None:
            raise InvalidInputError("Set influence_params or influence_last_n_layers, not both.")


@dataclass
class InfluenceTrainingArguments(InfluenceArgumentsMixin, TrainingArguments):
    """`transformers.TrainingArguments` plus the ``influence_*`` settings of `InfluenceArgumentsMixin`."""


@dataclass
class InfluenceSeq2SeqTrainingArguments(InfluenceArgumentsMixin, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` plus the ``influence_*`` settings of `InfluenceArgumentsMixin`."""
