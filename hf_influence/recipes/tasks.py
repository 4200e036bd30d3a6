"""What differs between the NLI and the translation recipe: tokenizer, model, trainer, quality metric, loss ranking.

Both train small models from config (no downloads) with a word-level tokenizer fitted on the
training text, or start from ``model_name_or_path`` when the user has a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import evaluate
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    PrinterCallback,
)

from ..config import BasisConfig, InfluenceConfig, ScoringConfig
from ..corpora import NLI_LABELS
from ..tasks import Seq2SeqTask
from ..trainer import InfluenceSeq2SeqTrainer, InfluenceSeq2SeqTrainingArguments, InfluenceTrainer, InfluenceTrainingArguments
from .noise import flip_labels, permute_references
from .presets import build_tokenizer, fast_tokenizer, tiny_bert_classifier, tiny_marian
from .pretrained import load_pretrained

METRICS_DIR = Path(__file__).parent / "metrics"


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """One of the package's offline `evaluate` modules: ``noise_detection``, ``accuracy`` or ``bleu`` (loaded once)."""
    return evaluate.load(str(METRICS_DIR / name))


def influence_settings(args: Any) -> dict[str, Any]:
    """The recipe's influence settings as the Trainer's ``influence_*`` fields: the one map from recipe keys to
    `InfluenceConfig` / `BasisConfig` / `ScoringConfig` (built here, so their checks run before any data is read)."""
    configs = (
        InfluenceConfig(params=args.params, last_n_layers=args.last_n_layers, damping=args.damping, batch_size=args.influence_batch_size,
                        seed=args.seed, hessian_examples=args.hessian_examples, memory_budget_gb=args.memory_budget_gb),
        BasisConfig(rank=max(args.ranks), iterations=args.iterations),
        ScoringConfig(shard_size=args.shard_size),  # the method is named at each call: the recipe ranks by several
    )
    return {f"influence_{k}": v for config in configs for k, v in dataclasses.asdict(config).items()}


def _training_arguments(cls, config: Any, output_dir: Path, seed: int, **extra: Any):
    return cls(
        output_dir=str(output_dir), num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64, learning_rate=config.learning_rate, warmup_steps=0.1, lr_scheduler_type="linear",
        weight_decay=0.01, seed=seed, train_sampling_strategy="group_by_length" if config.group_by_length else "random", bf16=config.bf16,
        use_cpu=config.use_cpu or not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=True, **influence_settings(config), **extra,
    )


class NliRecipeTask:
    """Premise/hypothesis classification (3 labels); quality = test accuracy; loss ranking = cross-entropy."""

    noise = staticmethod(flip_labels)
    quality_name = "accuracy"
    loss_name = "loss"

    def __init__(self, config: Any, train: Dataset):
        self.config = config
        if config.model_name_or_path:
            self.tokenizer = load_pretrained(AutoTokenizer, config.model_name_or_path)
        else:
            self.tokenizer = fast_tokenizer(build_tokenizer([t for pair in zip(train["premise"], train["hypothesis"]) for t in pair]))

    def encode(self, data: Dataset) -> Dataset:
        premises, hypotheses = list(data["premise"]), list(data["hypothesis"])
        if self.config.overlap_hint:
            hypotheses = [with_overlap_hint(p, h, self.tokenizer.sep_token) for p, h in zip(premises, hypotheses)]
        encoded = self.tokenizer(premises, hypotheses, truncation=True, max_length=self.config.max_length)
        return data.rename_column("label", "labels").map(lambda _, i: {k: v[i] for k, v in encoded.items()}, with_indices=True)

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if self.config.model_name_or_path:
            return load_pretrained(AutoModelForSequenceClassification, self.config.model_name_or_path, num_labels=len(NLI_LABELS))
        return tiny_bert_classifier(len(self.tokenizer), self.tokenizer.pad_token_id, self.config.hidden_size, self.config.num_layers,
                                    self.config.max_length, len(NLI_LABELS))

    def trainer(self, train: Dataset, output_dir: Path, seed: int) -> InfluenceTrainer:
        args = _training_arguments(InfluenceTrainingArguments, self.config, output_dir, seed)
        trainer = InfluenceTrainer(model=self.model(seed), args=args, train_dataset=train, processing_class=self.tokenizer)
        trainer.remove_callback(PrinterCallback)
        return trainer

    def quality(self, trainer: InfluenceTrainer, test: Dataset) -> float:
        output = trainer.predict(test)
        return load_metric("accuracy").compute(predictions=output.predictions.argmax(-1), references=output.label_ids)["accuracy"]

    def loss(self, trainer: InfluenceTrainer, train: Dataset) -> torch.Tensor:
        """Cross-entropy of each row, ``[N]``, in row order (not through ``trainer.predict``, whose loop groups rows by
        length under ``group_by_length`` and would return the losses permuted)."""
        model, losses = trainer.model.eval(), []
        columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in train.column_names]
        with torch.no_grad():
            for batch in _batches(train, columns, DataCollatorWithPadding(self.tokenizer)):
                batch = batch.to(model.device)
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                losses.append(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none"))
        return torch.cat(losses).cpu()


def with_overlap_hint(premise: str, hypothesis: str, separator: str = "[SEP]") -> str:
    """The hypothesis followed by the words it adds to the premise and the words it drops from it
    (case-insensitive, in order): ``"A dog runs [SEP] dog runs [SEP] cat sleeps"`` for premise
    ``"A cat sleeps"``. The exact-match features of pre-BERT NLI models, as text: a small encoder
    trained from scratch on a few thousand pairs does not learn to align words by itself."""
    premise_words, hypothesis_words = premise.split(), hypothesis.split()
    in_premise, in_hypothesis = {w.lower() for w in premise_words}, {w.lower() for w in hypothesis_words}
    added = [w for w in hypothesis_words if w.lower() not in in_premise]
    dropped = [w for w in premise_words if w.lower() not in in_hypothesis]
    return f"{hypothesis} {separator} {' '.join(added)} {separator} {' '.join(dropped)}"


class TranslationRecipeTask:
    """Sentence translation with a Marian encoder-decoder; quality = sacreBLEU on the test set;
    loss ranking = per-token negative log-likelihood of the reference (log perplexity)."""

    noise = staticmethod(permute_references)
    quality_name = "bleu"
    loss_name = "perplexity (token NLL)"

    def __init__(self, config: Any, train: Dataset):
        self.config = config
        if config.model_name_or_path:
            self.tokenizer = load_pretrained(AutoTokenizer, config.model_name_or_path)
            return
        words = Tokenizer(models.WordLevel(unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        words.train_from_iterator(list(train["source"]) + list(train["target"]),
                                  trainers.WordLevelTrainer(min_frequency=config.min_word_frequency, special_tokens=["<pad>", "<unk>", "</s>"]))
        words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", words.token_to_id("</s>"))])
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")

    def encode(self, data: Dataset) -> Dataset:
        limit = self.config.max_length
        encoded = self.tokenizer(list(data["source"]), text_target=list(data["target"]), truncation=True, max_length=limit)
        return data.map(lambda _, i: {k: v[i] for k, v in encoded.items() if k != "token_type_ids"}, with_indices=True)

    def model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        if self.config.model_name_or_path:
            return load_pretrained(AutoModelForSeq2SeqLM, self.config.model_name_or_path)
        return tiny_marian(len(self.tokenizer), self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.config.hidden_size,
                           self.config.num_layers, self.config.max_length)

    def trainer(self, train: Dataset, output_dir: Path, seed: int) -> InfluenceSeq2SeqTrainer:
        args = _training_arguments(InfluenceSeq2SeqTrainingArguments, self.config, output_dir, seed)
        model = self.model(seed)
        trainer = InfluenceSeq2SeqTrainer(model=model, args=args, train_dataset=train, processing_class=self.tokenizer,
                                          data_collator=DataCollatorForSeq2Seq(self.tokenizer, model=model))
        trainer.remove_callback(PrinterCallback)
        return trainer

    def quality(self, trainer: InfluenceSeq2SeqTrainer, test: Dataset) -> float:
        model, hypotheses = trainer.model.eval(), []
        with torch.no_grad():
            for batch in _batches(test, ["input_ids", "attention_mask"], DataCollatorForSeq2Seq(self.tokenizer)):
                generated = model.generate(**batch.to(model.device), max_new_tokens=self.config.max_length, num_beams=self.config.num_beams)
                hypotheses += [detokenize(text) for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]
        return load_metric("bleu").compute(predictions=hypotheses, references=list(test["target"]))["score"]

    def loss(self, trainer: InfluenceSeq2SeqTrainer, train: Dataset) -> torch.Tensor:
        """Mean token NLL of each reference (the log perplexity), ``[N]``: the influence task's summed loss per token."""
        model, task, losses = trainer.model.eval(), Seq2SeqTask(), []
        with torch.no_grad():
            for batch in _batches(train, ["input_ids", "attention_mask", "labels"], DataCollatorForSeq2Seq(self.tokenizer, model=model)):
                batch = batch.to(model.device)
                losses.append(task.per_example_loss(model, batch) / (batch["labels"] != -100).sum(1).clamp(min=1))
        return torch.cat(losses).cpu()


def detokenize(text: str) -> str:
    """Undo the word-level tokenizer's spacing, so sacreBLEU sees text like the references:
    ``"Ein Mann im T - Shirt , lächelnd ."`` → ``"Ein Mann im T-Shirt, lächelnd."``."""
    text = re.sub(r"\s+([.,!?;:)\]])", r"\1", text)
    text = re.sub(r"([(\[])\s+", r"\1", text)
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)  # quotes pair up
    return re.sub(r"(\w) ([-']) (?=\w)", r"\1\2", text)  # T - Shirt, man ' s


def _batches(data: Dataset, columns: list[str], collate: Any, batch_size: int = 64) -> DataLoader:
    """``data``'s ``columns`` in row order, batched by ``collate``, in this process alone (no sharding)."""
    return DataLoader(data.select_columns(columns), batch_size=batch_size, collate_fn=collate)


RECIPE_TASKS = {"nli": NliRecipeTask, "translation": TranslationRecipeTask}
