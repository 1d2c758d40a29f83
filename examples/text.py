"""Text classification as your own task (README: "Your own task"): generated token sequences and a small BERT-style
encoder of torch's own layers (nothing is downloaded).

    searchsvc run configs/your-task-text.yaml

`sentiment` is a dataset factory (`dataset: {name: python, factory: examples.text:sentiment}`): each example is a
sequence of `length` token ids (0 pads the end of a shorter sentence); ids 1-20 are "positive" words, 21-40
"negative" ones, the rest neutral. The label is 1 where positive words outnumber negative ones. As a tokenizer
returns them, an example's input is `{"input_ids": [length], "attention_mask": [length]}` (1 for a word, 0 for
padding): the network is called with both as keyword arguments (`masks: false`: the ids alone, positionally).
`encoder` is the network factory: token and position embeddings, pre-norm transformer blocks (nn.MultiheadAttention
that ignores the padding), and a classifier on the first position's output, as BERT's [CLS]. `hf_bert` is a Hugging
Face BertForSequenceClassification from a config, as it is (its output's `logits` are the prediction: task.output).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

POSITIVE, NEGATIVE = range(1, 21), range(21, 41)


class Tokenized(Dataset):
    """Sentences as a tokenizer gives them: `{"input_ids": ids, "attention_mask": 1 where a word is}` and a label."""

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}, self.labels[index]


def sentiment(train: int = 2048, val: int = 512, test: int = 512, length: int = 32, vocab: int = 256,
              seed: int = 0, masks: bool = True) -> dict[str, Dataset]:
    """The three splits: token ids [length] with their attention mask (`masks`; else the ids alone) and a label
    of two classes."""
    generator = torch.Generator().manual_seed(seed)
    kind = Tokenized if masks else TensorDataset
    return {name: kind(*_sentences(count, length, vocab, generator)) for name, count in
            (("train", train), ("val", val), ("test", test))}


def _sentences(count: int, length: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(41, vocab, (count, length), generator=generator)  # neutral words
    for words in (POSITIVE, NEGATIVE):  # a few sentiment words at random places
        hits = torch.rand(count, length, generator=generator) < torch.rand(count, 1, generator=generator) * 0.3
        ids = torch.where(hits, torch.randint(words.start, words.stop, (count, length), generator=generator), ids)
    ids[:, 0] = vocab - 1  # the [CLS] position
    lengths = torch.randint(length // 2, length + 1, (count, 1), generator=generator)
    ids = torch.where(torch.arange(length) < lengths, ids, 0)  # padding after each sentence
    positive = ((ids >= POSITIVE.start) & (ids < POSITIVE.stop)).sum(1)
    negative = ((ids >= NEGATIVE.start) & (ids < NEGATIVE.stop)).sum(1)
    return ids, (positive > negative).long()


class Block(nn.Module):
    """Pre-norm self-attention and MLP, each added back (BERT's layer, normalised first as most recent ones)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """A small BERT-style classifier of token ids [N, L]: attention ignores where `attention_mask` is 0 (without
    one, the padding id 0)."""

    def __init__(self, vocab: int, length: int, classes: int, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(1, length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        padding = input_ids == 0 if attention_mask is None else attention_mask == 0
        x = self.tokens(input_ids) + self.positions
        for block in self.blocks:
            x = block(x, padding)
        return self.head(self.norm(x[:, 0]))


def encoder(vocab: int = 256, length: int = 32, num_classes: int = 2, dim: int = 64, heads: int = 4,
            layers: int = 2) -> Encoder:
    """The network factory (`teacher: {model: examples.text:encoder, kwargs: {...}}`)."""
    return Encoder(vocab, length, num_classes, dim, heads, layers)


def hf_bert(vocab: int = 256, length: int = 32, num_classes: int = 2, dim: int = 64, heads: int = 4,
            layers: int = 2) -> nn.Module:
    """The network factory of a Hugging Face BERT classifier built from a config, nothing downloaded
    (`teacher: {model: examples.text:hf_bert}`; pip install transformers): BertForSequenceClassification as it is,
    called with input_ids and attention_mask."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * dim, max_position_embeddings=length, num_labels=num_classes,
                        attn_implementation="eager")
    return BertForSequenceClassification(config)
