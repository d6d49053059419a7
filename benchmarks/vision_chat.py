"""Vision-language chat (LLaVA-style, `lmforge.apps.vlm`): accuracy per question type on held-out images,
against the same recipe trained on the same chats without the image (a text-only model that cannot
see, which can only learn the answers' prior) and the majority answer of each question type.

Both models are SmolLM2-135M-Instruct with LoRA adapters, trained by `train_vision_chat` (stage 1: the
ViT on the images' labels; stage 2: projector + LoRA on the chats). Questions are asked on held-out
images (the digits' test split, scenes from another seed) in the training phrasings, and on more
held-out images in phrasings never trained on. Writes benchmarks/results/vision_chat.json.

    python benchmarks/vision_chat.py [--train-chats 600] [--test-chats 90] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from lmforge.apps import scenes, vlm
from lmforge.settings import VisionChatConfig

RESULTS = Path(__file__).parent / "results"


def majority_accuracy(train: list[scenes.VisionChat], test: list[scenes.VisionChat]) -> dict[str, float]:
    """Per question type: how often the training chats' most common answer is right on the test chats."""
    accuracy = {}
    for kind in scenes.QUESTION_TYPES:
        common = Counter(c.answer for c in train if c.question_type == kind).most_common(1)[0][0]
        asked = [c for c in test if c.question_type == kind]
        accuracy[kind] = sum(scenes.score_answer(c, common) for c in asked) / len(asked)
    return accuracy


def progress_line(label: str):
    def report(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"  {label}: {done}/{total} questions", file=sys.stderr, flush=True)

    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-chats", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=VisionChatConfig.learning_rate)
    parser.add_argument("--test-chats", type=int, default=90, help="held-out images, training phrasings")
    parser.add_argument("--held-out-chats", type=int, default=30, help="held-out images and phrasings")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's)")
    parser.add_argument("--out", default=str(RESULTS / "vision_chat.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    test = scenes.vision_chats(args.test_chats, "test", seed=0)
    held_out = scenes.vision_chats(args.held_out_chats, "test", seed=1, held_out_questions=True)
    train = scenes.vision_chats(args.train_chats, "train", seed=0)
    runs = {}
    tokens_per_image = None
    with tempfile.TemporaryDirectory() as folder:
        for name, text_only in (("vlm", False), ("text-only", True)):
            config = VisionChatConfig(
                out=f"{folder}/{name}", train_chats=args.train_chats, epochs=args.epochs,
                batch_size=args.batch_size, learning_rate=args.learning_rate, validation_chats=0, text_only=text_only,
            )  # fmt: skip
            print(f"training {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = vlm.train_vision_chat(config, verbose=1)
            seconds = time.perf_counter() - start
            model, tokenizer = result["model"], result["tokenizer"]
            tokens_per_image = tokens_per_image or model.tokens_per_image
            vlm.remove_lora(model.language_model)  # merged: decoding runs the native kernels
            runs[name] = {
                "training_seconds": round(seconds, 1),
                "encoder_seconds": round(result["encoder_seconds"], 1),
                "chat_training_seconds": round(result["chat_seconds"], 1),
                "steps_per_second": round(result["steps_per_second"], 4),
                "final_loss": result["history"]["loss"][-1],
                "encoder": result["encoder"],
                "held_out_images": vlm.evaluate_vision_chat(model, tokenizer, test, text_only, progress_line(name)),
                "held_out_phrasings": vlm.evaluate_vision_chat(
                    model, tokenizer, held_out, text_only, progress_line(f"{name}, held-out phrasings")
                ),
            }
            del model, result
    majority = majority_accuracy(train, test)
    print(f"\n{'question type':<14} {'vlm':>7} {'text-only':>10} {'majority':>9} {'vlm (held-out phrasing)':>24}")
    for kind in scenes.QUESTION_TYPES:
        print(
            f"{kind:<14} {runs['vlm']['held_out_images']['accuracy'][kind]:>7.1%} "
            f"{runs['text-only']['held_out_images']['accuracy'][kind]:>10.1%} {majority[kind]:>9.1%} "
            f"{runs['vlm']['held_out_phrasings']['accuracy'][kind]:>24.1%}"
        )
    for name, run in runs.items():
        objects = run["held_out_images"]["describe_objects"]
        print(
            f"{name}: describe, objects named in the right cell: precision {objects['object_precision']:.1%}, "
            f"recall {objects['object_recall']:.1%}; of the right colour and shape anywhere: precision "
            f"{objects['kind_precision']:.1%}, recall {objects['kind_recall']:.1%}"
        )
    for name, run in runs.items():
        print(f"{name}: trained in {run['training_seconds']:.0f} s ({run['steps_per_second']:.3f} chat steps/s)")
    record = {
        "model": f"smollm2-135m-instruct + LoRA r16, ViT 4x128 on 48x48 (3x3 patches), {tokens_per_image} image tokens",
        "train_chats": args.train_chats,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "test_chats": args.test_chats,
        "held_out_chats": args.held_out_chats,
        "threads": torch.get_num_threads(),
        "majority_answer": majority,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
