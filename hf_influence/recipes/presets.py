"""Toy presets the demo, the recipes and the benchmarks share: a synthetic NLI task, a word-level tokenizer
trained on the spot, and small models built from config (no downloads)."""

from __future__ import annotations

import random

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, MarianConfig, MarianMTModel, PreTrainedTokenizerFast

from ..outputs import ROW_INDEX

NOUNS = "cat dog bird horse child woman man farmer teacher doctor pilot chef artist singer player".split()
OBJECTS = "ball book apple car guitar letter boat cake kite lamp phone river song table wall".split()
VERBS = "sees holds paints carries likes finds cleans moves buys builds".split()
ADJECTIVES = "young old tall small happy quiet busy brave".split()
PLACES = "park garden kitchen school street market beach office".split()
LABELS = ["entailment", "neutral", "contradiction"]


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


def make_dataset(pairs: list[tuple[str, str, int]], tokenizer: PreTrainedTokenizerFast) -> Dataset:
    """Text, tokenized pairs, labels and each pair's ``row_index``."""
    premises, hypotheses = [p for p, _, _ in pairs], [h for _, h, _ in pairs]
    return Dataset.from_dict({"premise": premises, "hypothesis": hypotheses, **tokenizer(premises, hypotheses),
                              "labels": [lab for _, _, lab in pairs], ROW_INDEX: list(range(len(pairs)))})


def build_tokenizer(texts: list[str]) -> Tokenizer:
    """A word-level tokenizer trained on ``texts``, with BERT's ``[CLS] a [SEP] b [SEP]`` pair layout."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def fast_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The word-level tokenizer as a transformers tokenizer, so the Trainer pads with ``DataCollatorWithPadding``."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_bert_classifier(
    vocab_size: int, pad_token_id: int, hidden_size: int = 64, num_layers: int = 2, max_length: int = 32, num_labels: int = 3
) -> BertForSequenceClassification:
    """A small BERT classifier from config (4 heads, feed-forward 2 × hidden, eager attention for double backward)."""
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
        intermediate_size=2 * hidden_size, max_position_embeddings=max_length, num_labels=num_labels,
        pad_token_id=pad_token_id, attn_implementation="eager"))


def tiny_marian(vocab_size: int, pad_token_id: int, eos_token_id: int, hidden_size: int = 64, num_layers: int = 2,
                max_length: int = 64) -> MarianMTModel:
    """A small Marian encoder-decoder from config (4 heads, feed-forward 2 × hidden, eager attention)."""
    return MarianMTModel(MarianConfig(
        vocab_size=vocab_size, d_model=hidden_size, encoder_layers=num_layers, decoder_layers=num_layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=2 * hidden_size, decoder_ffn_dim=2 * hidden_size, max_position_embeddings=max_length,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, decoder_start_token_id=pad_token_id, forced_eos_token_id=None,
        dropout=0.1, attn_implementation="eager"))
