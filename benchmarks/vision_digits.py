"""Digits (scikit-learn's 8x8, 1,797 images): Vision Transformer vs an MLP and a small CNN, same split.

Trains each model on the same stratified 80/20 split, prints test accuracy and training time,
and writes benchmarks/results/vision_digits.json, the ViT's confusion matrix and an
attention-rollout map (PNG) next to it.

    python benchmarks/vision_digits.py [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmforge.apps.vision import (
    MLPClassifier,
    SmallCNN,
    VisionTransformer,
    ViTConfig,
    load_digits_split,
    predict,
    save_rollout_png,
    train_classifier,
)
from lmforge.evaluation.metrics import confusion_matrix, save_confusion_matrix_png

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    train_x, train_y, test_x, test_y = load_digits_split()
    models = {
        "mlp (64-128-10)": MLPClassifier(64, 10),
        "cnn (2 conv + linear)": SmallCNN(1, 10, 8),
        "vit (patch 4, 4 layers, d 64)": VisionTransformer(ViTConfig(patch_size=4)),
        "vit (patch 2, 4 layers, d 64)": VisionTransformer(ViTConfig(patch_size=2)),
    }
    rows = []
    for name, model in models.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        train_classifier(model, train_x, train_y, epochs=args.epochs, lr=2e-3)
        seconds = time.perf_counter() - start
        predicted = predict(model, test_x)
        accuracy = (predicted == test_y).float().mean().item()
        rows.append({"model": name, "test_accuracy": accuracy, "train_seconds": seconds,
                     "parameters": sum(p.numel() for p in model.parameters())})  # fmt: skip
        print(f"{name:<32}{accuracy:>9.4f}{seconds:>9.1f}s", flush=True)
        if name.startswith("vit (patch 2"):
            RESULTS.mkdir(parents=True, exist_ok=True)
            save_confusion_matrix_png(
                confusion_matrix(predicted, test_y, 10), RESULTS / "vision_digits_confusion.png",
                f"ViT on digits: test accuracy {accuracy:.3f}",
            )  # fmt: skip
            save_rollout_png(test_x[0], model.attention_rollout(test_x[:1])[0], RESULTS / "vision_digits_rollout.png")
    (RESULTS / "vision_digits.json").write_text(
        json.dumps({"epochs": args.epochs, "test_images": len(test_y), "results": rows}, indent=2)
    )
    print(f"wrote {RESULTS / 'vision_digits.json'} and the ViT's confusion matrix / rollout PNGs")


if __name__ == "__main__":
    main()
