"""The guide's Keras example, in lmforge: Embedding(10000, 32) → LSTM(128) → Dense(1, sigmoid) on movie reviews.

    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=10, batch_size=32, validation_split=0.1)

Data: 10,568 movie-review sentences rated by people (VADER's ground truth, fetched once from
the vaderSentiment sdist on PyPI; see `lmforge.training.recipes.movie_reviews`). 20% is held out as
the test set. Run: `python examples/sentiment_lstm.py [--epochs 10]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from lmforge.finetune.classify import WordVocabulary, train_test_split
from lmforge.training.data import read_labelled_texts
from lmforge.training.fit import EarlyStopping, Fittable
from lmforge.training.recipes import movie_reviews

VOCABULARY, SEQUENCE_LENGTH = 10_000, 64


class SentimentLSTM(Fittable, nn.Module):
    """Keras: Sequential([Embedding(10000, 32), LSTM(128), Dense(1, activation="sigmoid")])."""

    def __init__(self, vocabulary: int = VOCABULARY):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 32, padding_idx=0)
        self.lstm = nn.LSTM(32, 128, batch_first=True)
        self.dense = nn.Linear(128, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Keras's LSTM reads padded positions too unless masked; we pack to stop at each text's end.
        lengths = (tokens != 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(tokens), lengths, True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return torch.sigmoid(self.dense(hidden[-1])).squeeze(-1)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default="benchmarks/results/sentiment_lstm.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    reviews = read_labelled_texts(movie_reviews())
    (train_texts, train_labels), (test_texts, test_labels) = train_test_split(reviews.texts, reviews.labels, 0.2)
    vocabulary = WordVocabulary(train_texts, VOCABULARY)
    x_train, y_train = vocabulary.encode(train_texts, SEQUENCE_LENGTH), torch.tensor(train_labels)
    x_test, y_test = vocabulary.encode(test_texts, SEQUENCE_LENGTH), torch.tensor(test_labels)

    model = SentimentLSTM()
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=0.1,
        callbacks=[EarlyStopping("val_loss", patience=2, restore_best_weights=True)],
    )
    test = model.evaluate(x_test, y_test)
    print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) on {len(y_test)} held-out reviews")
    result = {"model": "Embedding(10000,32)-LSTM(128)-Dense(1)", "test": test, "history": history.history}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
