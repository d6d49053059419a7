"""The main job on the embedded default: Shakespeare → char tokenizer → train for a few minutes → samples."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmforge.formats.checkpoint import load_model
from lmforge.inference.generate import SamplingConfig, generate
from lmforge.training.data import TokenDataset, load_manifest, prepare, sha256_file
from lmforge.training.optim import build_optimizer
from lmforge.training.pretrain import RUN_FILES, TrainConfig, train, train_config_from
from lmforge.training.recipes import shakespeare_corpus
from lmforge.training.run_folder import claim_run_folder
from lmforge.training.step import apply_gradients, autocast_for, forward_backward, next_token_forward


def say(text: str) -> None:
    print(text, flush=True)  # flushed: quickstart's output is often piped (make, CI logs)


SAMPLE_PROMPTS = ("ROMEO.\n", "KING.\nMy lords,", "\n")


def prepare_shakespeare(data_dir: Path, log=say) -> Path:
    """Tokenized Shakespeare under data_dir, built once and reused while its source is unchanged."""
    corpus = shakespeare_corpus()
    try:
        manifest = load_manifest(data_dir)
        if manifest["sources"][0]["sha256"] == sha256_file(corpus):
            return data_dir
    except Exception:  # absent or stale manifest: rebuild
        pass
    log(f"preparing {corpus} → {data_dir}")
    prepare([corpus], data_dir, tokenizer="char", val_fraction=0.1)
    return data_dir


def seconds_per_step(config: TrainConfig, steps: int = 10, warmup_steps: int = 12) -> float:
    """Time a few training steps (`step.forward_backward` + `step.apply_gradients`, as pretraining runs
    them on the CPU) of a throwaway copy of the model, to fit the run into a time budget.

    The first dozen steps run up to 2x slower (allocator and page warm-up) and are not counted.
    """
    from lmforge.model import Transformer

    data = TokenDataset(config.data_dir, "train")
    model = Transformer(config.model)
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay, betas=(config.beta1, config.beta2))
    generator = torch.Generator().manual_seed(0)
    timings = []
    for _ in range(warmup_steps + steps):
        start = time.perf_counter()
        inputs, targets = data.gather(
            data.sample_starts(config.batch_size, config.model.block_size, generator), config.model.block_size
        )
        forward_backward(next_token_forward(model, inputs, targets), 1, autocast_for(torch.device("cpu")))
        apply_gradients(optimizer, config.grad_clip)
        timings.append(time.perf_counter() - start)
    timings = sorted(timings[warmup_steps:])
    return timings[len(timings) // 2]


def quickstart(
    out_dir: str | Path = "runs/quickstart",
    minutes: float = 3.0,
    overrides: dict | None = None,
    samples: int = 3,
    sample_tokens: int = 300,
    log=say,
    overwrite: bool = False,
) -> dict:
    """Prepare Shakespeare, train the quickstart model for about `minutes`, print samples.

    An out_dir holding an earlier run is refused unless `overwrite` (which moves that run into
    out_dir/previous-<date>-<time>/); the prepared data in out_dir/data is kept and reused.
    """
    out_dir = Path(out_dir)
    values = {
        "data_dir": str(out_dir / "data"),
        "out_dir": str(out_dir),
        "preset": "quickstart",
        "eval_interval": 250,
        "checkpoint_interval": 250,
        "overwrite": overwrite,
        **(overrides or {}),
    }
    config = train_config_from(values)
    if not config.resume:  # before minutes of preparing and calibrating, not after
        continuing = f"continue it with `lmforge train --out_dir={out_dir} --resume --max_steps=MORE`"
        archived = claim_run_folder(out_dir, RUN_FILES, config.overwrite, f"{continuing}, choose another --out-dir")
        if archived is not None:
            log(f"--overwrite: moved the previous run into {archived}")
    data_dir = prepare_shakespeare(out_dir / "data", log)
    vocab = TokenDataset(data_dir).tokenizer().vocab_size
    config.model.vocab_size = vocab
    if "max_steps" not in (overrides or {}):
        per_step = seconds_per_step(config)
        # ~8% of the budget goes to evaluation and checkpoints.
        max_steps = max(50, int(minutes * 60 * 0.92 / per_step))
        config.max_steps = max_steps
        log(f"calibrated: {per_step * 1000:.0f} ms/step → {max_steps} steps in ~{minutes:g} min")
    summary = train(config)

    model, tokenizer, _ = load_model(summary["checkpoint"])
    texts = []
    for index, prompt in enumerate(SAMPLE_PROMPTS[:samples]):
        sampling = SamplingConfig(max_new_tokens=sample_tokens, temperature=0.8, top_k=50, seed=index)
        text = prompt + "".join(generate(model, tokenizer, prompt, sampling))
        texts.append(text)
        log(f"\n--- sample {index + 1} ---\n{text}")
    val = summary["val"] or {}
    log(
        f"\nval loss {val.get('loss', float('nan')):.4f} | bits/byte {val.get('bits_per_byte', float('nan')):.3f}"
        f" | checkpoint {summary['checkpoint']}"
    )
    if summary["loss_curve"]:
        log(f"loss curve: {summary['loss_curve']}")
    return {**summary, "samples": texts}
