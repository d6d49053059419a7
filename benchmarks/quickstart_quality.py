"""Quickstart quality: validation loss of `lmforge quickstart` vs nanoGPT's CPU recipe, same corpus, same wall time.

nanoGPT's CPU recipe (shakespeare_char with its README's CPU overrides): char-level, 4 layers,
4 heads, d=128, no biases, block 64, batch 12, 2000 iterations, lr 1e-3 → 1e-4, warmup 100,
beta2 0.99, dropout 0. It runs first; its wall time becomes the quickstart's budget. Both are
scored on the whole validation split. Prints a table, writes
benchmarks/results/quickstart_quality.json.

    python benchmarks/quickstart_quality.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.evaluation.evaluate import evaluate_loss
from lmforge.formats.checkpoint import load_model
from lmforge.training.data import TokenDataset
from lmforge.training.pretrain import train, train_config_from
from lmforge.training.quickstart import prepare_shakespeare, quickstart

NANOGPT_RECIPE = {
    "preset": "nanogpt-cpu",
    "model": {"bias": False},  # train.py's default, which shakespeare_char keeps
    "batch_size": 12,
    "learning_rate": 1e-3,
    "min_learning_rate": 1e-4,
    "warmup_steps": 100,
    "beta2": 0.99,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_interval": 0,
    "checkpoint_interval": 0,
    "progress": "plain",
    "log_interval": 200,
    "plot": False,
}


def score(checkpoint: str, data_dir: Path) -> dict:
    model, tokenizer, _ = load_model(checkpoint)
    return evaluate_loss(model, TokenDataset(data_dir, "val"), tokenizer.token_byte_lengths(), batch_size=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="nanoGPT recipe iterations (default 2000)")
    parser.add_argument("--out", default="benchmarks/results/quickstart_quality.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmforge-quality-"))
    data_dir = prepare_shakespeare(work / "data")
    rows = []

    start = time.perf_counter()
    summary = train(
        train_config_from(
            {**NANOGPT_RECIPE, "data_dir": str(data_dir), "out_dir": str(work / "nanogpt"), "max_steps": args.steps}
        )
    )
    nanogpt_seconds = time.perf_counter() - start
    rows.append(
        {
            "recipe": "nanoGPT CPU recipe (lmforge GPT-2 layout)",
            "seconds": nanogpt_seconds,
            "steps": summary["step"],
            "parameters": summary["parameters"],
            **score(summary["checkpoint"], data_dir),
        }
    )

    start = time.perf_counter()
    summary = quickstart(
        work / "quickstart",
        minutes=nanogpt_seconds / 60,
        samples=0,
        overrides={"progress": "plain", "log_interval": 100},
    )
    rows.append(
        {
            "recipe": "lmforge quickstart",
            "seconds": time.perf_counter() - start,
            "steps": summary["step"],
            "parameters": summary["parameters"],
            **score(summary["checkpoint"], data_dir),
        }
    )

    print(f"\n{'recipe':<44} {'seconds':>8} {'steps':>6} {'params':>10} {'val loss':>9} {'bpb':>7}")
    for row in rows:
        print(
            f"{row['recipe']:<44} {row['seconds']:>8.0f} {row['steps']:>6} {row['parameters']:>10,} "
            f"{row['loss']:>9.4f} {row['bits_per_byte']:>7.4f}"
        )
    ratio = rows[1]["loss"] / rows[0]["loss"]
    print(f"quickstart / nanoGPT val loss: {ratio:.3f} ({'better' if ratio < 1 else 'WORSE'})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "loss_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
