"""Tiny models built from config, synthetic data, and the tolerances every test file uses."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
)

# Tolerances, named once.
GRAD_ATOL = 1e-5  # per-example gradients vs a plain autograd loop (fp32)
HVP_RTOL = 1e-4  # HVP vs explicit Hessian times a vector
PROJ_RTOL = 1e-4  # JVP vs per-example-gradient projections
CLOSED_FORM_RTOL = 1e-6  # exact influence vs analytic formula (fp64)
PEARSON_FLOOR = 0.99  # Arnoldi / LiSSA vs exact
VOCAB = 40


def tiny_bert(num_labels: int = 3, layers: int = 2, hidden: int = 16) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_gpt2_classifier() -> GPT2ForSequenceClassification:
    """A 3-way classifier on the tiny GPT-2: causal attention, the score head read at the last real token."""
    config = tiny_gpt2().config
    config.num_labels = 3
    return GPT2ForSequenceClassification(config)


def tiny_marian() -> MarianMTModel:
    config = MarianConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, forced_eos_token_id=2,
    )
    return MarianMTModel(config)


def tiny_t5() -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def random_lengths(n: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def classification_dataset(n: int, seed: int = 0, num_labels: int = 3) -> Dataset:
    """Variable-length token sequences; the label is the most frequent of three token groups."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": [], "text": []}
    for length in random_lengths(n, 4, 12, g):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        counts = torch.stack([(ids % num_labels == k).sum() for k in range(num_labels)])
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(int(counts.argmax()))
        rows["text"].append("unused string column")
    return Dataset.from_dict(rows)


def seq2seq_dataset(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for src, tgt in zip(random_lengths(n, 3, 9, g), random_lengths(n, 2, 7, g)):
        rows["input_ids"].append(torch.randint(3, VOCAB, (src,), generator=g).tolist())
        rows["attention_mask"].append([1] * src)
        rows["labels"].append(torch.randint(3, VOCAB, (tgt,), generator=g).tolist() + [2])
    return Dataset.from_dict(rows)


def lm_dataset(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": []}
    for length in random_lengths(n, 3, 10, g):
        rows["input_ids"].append(torch.randint(3, VOCAB, (length,), generator=g).tolist())
        rows["attention_mask"].append([1] * length)
    return Dataset.from_dict(rows)


def train_tiny_bert(n_train: int = 48, steps: int = 150, seed: int = 0):
    """Train a tiny BERT (float64) with Adam on full batches; returns (model, train_ds, test_ds)."""
    from hf_influence.data import PaddingCollator

    torch.manual_seed(seed)
    model = tiny_bert().double()
    train, test = classification_dataset(n_train, seed=seed), classification_dataset(12, seed=seed + 100)
    batch = PaddingCollator()([train[i] for i in range(len(train))])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval(), train, test


def memory_bert() -> BertForSequenceClassification:
    """The float64 tiny BERT (2 layers, hidden 64, seed 0) the memory tests profile: its tensors dwarf the allocator's noise."""
    torch.manual_seed(0)
    return tiny_bert(layers=2, hidden=64).double().eval()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


BERT_DAMPING = 0.05  # above |λ_min| of the trained tiny BERT's Hessian, so H + λI is positive definite


def collect_grads(inf, data) -> torch.Tensor:
    """All per-example gradients of ``data`` under ``inf``'s selection: ``[N, P]``."""
    from hf_influence.engine.grads import eval_mode, per_example_grads

    rows = []
    with eval_mode(inf.model):
        for batch in inf._loader(data):
            rows.append(per_example_grads(inf.train_loss, inf._params(), batch))
    return torch.cat(rows)
