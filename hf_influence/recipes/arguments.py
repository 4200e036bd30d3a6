"""The settings of a recipe run: one dataclass, read from the YAML configs in ``recipes/nli`` and
``recipes/translation`` and from ``hf-influence recipe --key value``; every setting checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._utils.errors import InvalidInputError
from ..config import BasisConfig, InfluenceConfig, ScoringConfig
from .data import VALIDATION_SPLITS
from .tasks import RECIPE_TASKS, influence_settings

BASELINES = ("random", "loss", "tracin", "randproj", "fisher", "lissa", "val_influence")
DEFAULT_BASELINES = ("random", "loss", "tracin", "randproj", "fisher", "lissa")  # val_influence needs a validation split
FILTER_METHODS = ("arnoldi", "tracin", "randproj", "fisher", "loss", "val_influence", "random")  # lissa scores a subset only


@dataclass
class RecipeArguments:
    """Settings of a recipe run (YAML configs in ``recipes/nli`` and ``recipes/translation``)."""

    task: str = field(default="nli", metadata={"help": "'nli' (label flips, accuracy) or 'translation' (permuted references, BLEU)."})
    dataset: str = field(default="sick", metadata={"help": "sick, snli, multi30k (local, with data_dir) or glue/mnli, hub/snli, wmt16 (Hub)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the local corpus (../shared/data/<name> here)."})
    test_dir: str | None = field(default=None, metadata={"help": "Translation: a WMT21 newstest folder to test on instead."})
    source_lang: str = field(default="en", metadata={"help": "Translation source language."})
    target_lang: str = field(default="de", metadata={"help": "Translation target language."})
    max_train: int | None = field(default=None, metadata={"help": "Seeded random subset of the training set (reduced runs)."})
    max_test: int | None = field(default=None, metadata={"help": "Seeded random subset of the test set."})
    noise_fraction: float = field(default=0.1, metadata={"help": "Share of training rows corrupted (NLI 0.1, translation 0.06)."})
    filter_fraction: float | None = field(default=None, metadata={"help": "Share removed before retraining (default: noise_fraction)."})
    filter_methods: list[str] = field(default_factory=lambda: ["arnoldi"], metadata={
        "help": f"Rankings that each filter the training set for retraining (one filtered arm each): {', '.join(FILTER_METHODS)} "
                "(arnoldi: the largest p̄). The first one's filtered set is saved with its dataset card."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Start from this checkpoint (a save_pretrained folder or a Hub id; a Hub id with a packaged offline copy "
                "installed, see recipes/README.md, loads from it); default: a small model from config."})
    hidden_size: int = field(default=64, metadata={"help": "From-config model width."})
    num_layers: int = field(default=2, metadata={"help": "From-config model depth (encoder and decoder each)."})
    overlap_hint: bool = field(default=False, metadata={"help": "NLI: append the words the hypothesis adds to and drops from the premise "
                                                                  "(exact-match features) for small models trained from scratch."})
    max_length: int = field(default=64, metadata={"help": "Tokens per side (truncation), and generation limit."})
    min_word_frequency: int = field(default=2, metadata={"help": "Translation word-level vocabulary: minimum count."})
    num_beams: int = field(default=1, metadata={"help": "Translation: beams when generating the test set."})
    epochs: int = field(default=8, metadata={"help": "Training epochs of every run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (warm-up over the first tenth of the steps, then linear decay)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    group_by_length: bool = field(default=False, metadata={"help": "Batch rows of similar length together when training (less padding: "
                                                                     "faster for pretrained encoders on CPU)."})
    bf16: bool = field(default=False, metadata={"help": "Train and evaluate under bfloat16 autocast (mixed precision: the weights, and "
                                                        "every influence computation, stay float32); about 2x faster on CPUs with AVX512-BF16."})
    ceiling_arm: bool = field(default=True, metadata={
        "help": "Also retrain without exactly the corrupted rows (the rows the noise record names): the perfect filter. Each "
                "filter's share of its gain over noisy is reported beside the recovered share (retrain_seeds more runs)."})
    retrain_seeds: int = field(default=1, metadata={"help": "Training runs (seeds) of every arm: clean, noisy and each filtered set, "
                                                            "paired by seed."})
    last_n_layers: int | None = field(default=None, metadata={"help": "Influence over the last k layers + head, no embeddings."})
    params: list[str] | None = field(default=None, metadata={"help": "Influence over the parameters matching these regexes instead "
                                                                     "(e.g. classifier pooler: the head alone)."})
    damping: float = field(default=InfluenceConfig.damping, metadata={"help": "Additive damping λ."})
    ranks: list[int] = field(default_factory=lambda: [10, 20, 50], metadata={"help": "Arnoldi p̄ values compared (one basis, truncated)."})
    iterations: int = field(default=BasisConfig.iterations, metadata={"help": "Arnoldi iterations (>= the largest p̄)."})
    hessian_examples: int | None = field(default=InfluenceConfig.hessian_examples, metadata={
        "help": "The Hessian is that of the mean loss over a seeded random subset of this many training rows."})
    influence_batch_size: int = field(default=InfluenceConfig.batch_size, metadata={"help": "Examples per batch when scoring."})
    memory_budget_gb: float = field(default=InfluenceConfig.memory_budget_gb, metadata={
        "help": "What one influence call may hold at once (GiB); a call that needs more is refused before it starts."})
    shard_size: int = field(default=ScoringConfig.shard_size, metadata={"help": "Rows per saved score shard (resumable)."})
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES), metadata={
        "help": f"Rankings beside Arnoldi: {', '.join(BASELINES)} (val_influence: each row's total influence on the loss of the "
                "clean validation split, rows that hurt it most first)."})
    lissa_subset: int = field(default=256, metadata={"help": "LiSSA self-influence costs one solve per row: scored on this many rows."})
    output_dir: str = field(default="recipe_output", metadata={"help": "Where results, cards and the filtered set go (a rerun resumes from "
                                                                      "the saved rankings and per-seed results)."})
    card_dir: str | None = field(default=None, metadata={"help": "Also copy the cards here, as <name>.md and <name>.dataset.md."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the run's cards (default: <task>-<dataset>)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    seed: int = field(default=0, metadata={"help": "Seed of subsets, noise, models and bases."})

    def __post_init__(self):
        if self.task not in RECIPE_TASKS:
            raise InvalidInputError(f"task must be one of {sorted(RECIPE_TASKS)}, got {self.task!r}.")
        self.filter_fraction = self.noise_fraction if self.filter_fraction is None else self.filter_fraction
        for name in ("noise_fraction", "filter_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InvalidInputError(f"{name} must be in (0, 1), got {getattr(self, name)}.")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise InvalidInputError(f"Unknown baselines {sorted(unknown)}; choose from {BASELINES}.")
        self._check_filter_methods()
        if "val_influence" in self.baselines and self.dataset not in VALIDATION_SPLITS:
            raise InvalidInputError(f"val_influence needs a clean validation split; the recipe has one for {sorted(VALIDATION_SPLITS)}, "
                                    f"not {self.dataset!r}: drop val_influence from baselines.")
        if not self.ranks or min(self.ranks) < 1 or max(self.ranks) > self.iterations:
            raise InvalidInputError(f"ranks must be >= 1 and <= iterations ({self.iterations}), got {self.ranks}.")
        if self.overlap_hint and self.task != "nli":
            raise InvalidInputError("overlap_hint is an NLI setting (premise / hypothesis words); drop it for translation.")
        influence_settings(self)  # every influence rule, checked once, in hf_influence.config
        if self.retrain_seeds < 1 or self.epochs < 1:
            raise InvalidInputError("retrain_seeds and epochs must be >= 1.")

    def _check_filter_methods(self) -> None:
        if not self.filter_methods or len(set(self.filter_methods)) != len(self.filter_methods):
            raise InvalidInputError(f"filter_methods must name at least one ranking, each once, got {self.filter_methods}.")
        unknown = [m for m in self.filter_methods if m not in FILTER_METHODS]
        if unknown:
            raise InvalidInputError(f"Unknown filter_methods {unknown}; choose from {FILTER_METHODS}.")
        unranked = [m for m in self.filter_methods if m != "arnoldi" and m not in self.baselines]
        if unranked:
            raise InvalidInputError(f"filter_methods {unranked} are not computed: add them to baselines (now {self.baselines}).")
