"""The tiny BERT the benchmarks train from config on SICK-style pairs (one training loop for all of them)."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_influence.data import make_loader


def train_tiny_bert(train: Dataset, vocab_size: int, max_positions: int, hidden: int, layers: int, epochs: int,
                    batch_size: int, seed: int) -> BertForSequenceClassification:
    """A 3-label BERT (4 heads, FFN 2·hidden, eager attention) trained with AdamW (lr 1e-3, weight decay 0.01)
    on shuffled batches of ``train`` (``input_ids``, ``labels``, ...); seeded; returned in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=max_positions, num_labels=3, pad_token_id=0,
                        attn_implementation="eager")
    model = BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    collate = make_loader(train, batch_size).collate_fn
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate):
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
    return model.eval()
