"""``hf-influence demo``: the embedded default. No network, no files needed, minutes on a CPU.

Generates a small NLI-style task, trains a word-level tokenizer and a tiny BERT on it with 10% of
the training labels flipped, fits an Arnoldi basis, ranks training pairs by self-influence,
reports how well each method finds the flipped pairs, removes the top-ranked fraction and
retrains to compare accuracy.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification

from .. import Influence
from .._utils.io import atomic_path
from ..data import make_loader
from ..metrics import noise_detection_metrics

NOUNS = "cat dog bird horse child woman man farmer teacher doctor pilot chef artist singer player".split()
OBJECTS = "ball book apple car guitar letter boat cake kite lamp phone river song table wall".split()
VERBS = "sees holds paints carries likes finds cleans moves buys builds".split()
ADJECTIVES = "young old tall small happy quiet busy brave".split()
PLACES = "park garden kitchen school street market beach office".split()
LABELS = ["entailment", "neutral", "contradiction"]


@dataclass
class DemoArguments:
    """Settings of the embedded demo (all defaulted)."""

    output_dir: str = field(default="hf_influence_demo", metadata={"help": "Where the basis and summary are written."})
    num_train: int = field(default=1200, metadata={"help": "Training pairs generated."})
    num_test: int = field(default=300, metadata={"help": "Held-out pairs for accuracy."})
    noise_fraction: float = field(default=0.1, metadata={"help": "Fraction of training labels flipped."})
    filter_fraction: float = field(default=0.1, metadata={"help": "Fraction removed by self-influence before retraining."})
    epochs: int = field(default=30, metadata={"help": "Training epochs (each run)."})
    rank: int = field(default=20, metadata={"help": "Arnoldi rank p̄."})
    iterations: int = field(default=40, metadata={"help": "Arnoldi iterations n."})
    hessian_examples: int = field(default=256, metadata={"help": "Training pairs whose mean loss defines the Hessian."})
    seed: int = field(default=0, metadata={"help": "Seed for data, noise, model and basis."})

    def __post_init__(self):
        for name in ("noise_fraction", "filter_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.num_train < 20 or self.num_test < 1:
            raise ValueError("--num_train must be >= 20 and --num_test >= 1.")


def make_pair(rng: random.Random) -> tuple[str, str, int]:
    """One premise/hypothesis pair whose label follows from its wording."""
    noun, obj, verb, adj = rng.choice(NOUNS), rng.choice(OBJECTS), rng.choice(VERBS), rng.choice(ADJECTIVES)
    premise = f"the {adj} {noun} {verb} the {obj}"
    label = rng.randrange(3)
    if label == 0:
        hypothesis = f"the {noun} {verb} the {obj}"
    elif label == 1:
        other = rng.choice([o for o in OBJECTS if o != obj])  # half the neutral pairs need a comparison
        hypothesis = f"the {noun} {verb} the {obj} in the {rng.choice(PLACES)}" if rng.random() < 0.5 else f"the {noun} {verb} the {other}"
    else:
        hypothesis = f"the {noun} does not {verb.rstrip('s')} the {obj}"
    return premise, hypothesis, label


def build_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def make_dataset(pairs: list[tuple[str, str, int]], tokenizer: Tokenizer) -> Dataset:
    encodings = [tokenizer.encode(p, h) for p, h, _ in pairs]
    return Dataset.from_dict({
        "premise": [p for p, _, _ in pairs], "hypothesis": [h for _, h, _ in pairs],
        "input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings], "labels": [lab for _, _, lab in pairs],
    })


def flip_labels(dataset: Dataset, fraction: float, rng: random.Random) -> tuple[Dataset, list[bool]]:
    """Replace a seeded ``fraction`` of labels by a different class; return the noise mask."""
    flipped = set(rng.sample(range(len(dataset)), int(round(fraction * len(dataset)))))
    labels = [(lab + rng.randrange(1, 3)) % 3 if i in flipped else lab for i, lab in enumerate(dataset["labels"])]
    return dataset.remove_columns("labels").add_column("labels", labels), [i in flipped for i in range(len(dataset))]


def train_model(dataset: Dataset, vocab_size: int, args: DemoArguments) -> BertForSequenceClassification:
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, num_labels=3, pad_token_id=0, attn_implementation="eager",
    )
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for batch in torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, generator=generator, collate_fn=make_loader(dataset, 32).collate_fn):
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: BertForSequenceClassification, dataset: Dataset) -> float:
    correct = sum(int((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum()) for b in make_loader(dataset, 64))
    return correct / len(dataset)


@torch.no_grad()
def per_example_loss(model: BertForSequenceClassification, dataset: Dataset) -> torch.Tensor:
    losses = [torch.nn.functional.cross_entropy(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"], reduction="none") for b in make_loader(dataset, 64)]
    return torch.cat(losses)


def run_demo(args: DemoArguments) -> dict:
    """Run the whole demo; print a report and return the figures."""
    start = time.perf_counter()
    rng = random.Random(args.seed)
    pairs = [make_pair(rng) for _ in range(args.num_train + args.num_test)]
    tokenizer = build_tokenizer([t for p, h, _ in pairs for t in (p, h)])
    clean_train, test = make_dataset(pairs[: args.num_train], tokenizer), make_dataset(pairs[args.num_train :], tokenizer)
    train, is_noisy = flip_labels(clean_train, args.noise_fraction, rng)
    print(f"[1/4] data: {len(train)} training pairs ({sum(is_noisy)} labels flipped), {len(test)} test pairs")

    model = train_model(train, tokenizer.get_vocab_size(), args)
    noisy_accuracy = accuracy(model, test)
    print(f"[2/4] trained tiny BERT on noisy data: test accuracy {noisy_accuracy:.3f}")

    inf = Influence(model, damping=1e-3, batch_size=32, seed=args.seed)
    hessian_data = train.shuffle(seed=args.seed).select(range(min(args.hessian_examples, len(train))))
    basis = inf.fit_arnoldi(hessian_data, rank=args.rank, iterations=args.iterations)
    basis.save(args.output_dir)
    rankings = {
        "arnoldi self-influence": inf.self_influence(train, method="arnoldi", basis=basis),
        "tracin self-influence": inf.self_influence(train, method="tracin"),
        "loss": per_example_loss(model, train),
        "random": torch.rand(len(train), generator=torch.Generator().manual_seed(args.seed)),
    }
    detection = {name: noise_detection_metrics(scores, is_noisy) for name, scores in rankings.items()}
    print(f"[3/4] noise detection ({sum(is_noisy)} flipped of {len(train)}):")
    print(f"      {'ranking':26s}{'AUC':>8s}{'AP':>8s}{'P@k':>8s}")
    for name, m in detection.items():
        print(f"      {name:26s}{m['auc']:8.3f}{m['ap']:8.3f}{m['precision_at_k']:8.3f}")

    keep = rankings["arnoldi self-influence"].argsort()[: len(train) - int(round(args.filter_fraction * len(train)))]
    filtered = train.select(sorted(keep.tolist()))
    filtered_accuracy = accuracy(train_model(filtered, tokenizer.get_vocab_size(), args), test)
    removed_noisy = sum(is_noisy) - sum(is_noisy[i] for i in keep.tolist())
    print(f"[4/4] removed {len(train) - len(filtered)} top self-influence pairs ({removed_noisy} of them flipped); "
          f"retrained: test accuracy {noisy_accuracy:.3f} -> {filtered_accuracy:.3f}")

    summary = {"detection": detection, "accuracy_noisy": noisy_accuracy, "accuracy_filtered": filtered_accuracy,
               "removed": len(train) - len(filtered), "removed_noisy": int(removed_noisy), "seconds": time.perf_counter() - start,
               "arguments": vars(args)}
    with atomic_path(Path(args.output_dir) / "demo_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['seconds']:.0f}s; wrote {sorted(p.name for p in Path(args.output_dir).iterdir())} to {args.output_dir}/")
    return summary
