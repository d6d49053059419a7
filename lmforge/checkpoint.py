"""Checkpoints: weights as safetensors, training state as a weights-only torch file.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding model.safetensors,
config.json, tokenizer.json and (for training runs) state.pt. It is written under a
temporary name and renamed into place, and `checkpoints/latest` names the newest, so a
crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer, uninitialized_layers
from lmforge.quantize import QuantizedLinear, apply_layout, quantized_layout
from lmforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS, CONFIG, STATE, TOKENIZER, LATEST = "model.safetensors", "config.json", "state.pt", "tokenizer.json", "latest"


def model_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict without the tied LM head (safetensors stores each tensor once)."""
    weights = model.state_dict()
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_files_atomically(folder: str | Path, writers: dict) -> Path:
    """Write each `name: write(path)` into a temporary folder, then move them into `folder` in order.

    A crash leaves either the old file or the new one under each name, never half a file; put
    the file that marks a complete folder (its config) last.
    """
    folder = Path(folder)
    temporary = folder / ".writing.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for name, write in writers.items():
        write(temporary / name)
    for name in writers:
        os.replace(temporary / name, folder / name)
    temporary.rmdir()
    return folder


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    tokenizer: Tokenizer,
    state: dict | None = None,
    extra_config: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `run_dir/checkpoints`, point `latest` at it, prune old ones."""
    checkpoints = Path(run_dir) / "checkpoints"
    final = save_model(
        checkpoints / f"step_{step:06d}", model, tokenizer, {"step": step, **(extra_config or {})}, state
    )
    write_atomically(checkpoints / LATEST, final.name)
    if keep > 0:
        for old in sorted(checkpoints.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_model(
    folder: str | Path, model: Transformer, tokenizer: Tokenizer, extra_config: dict | None = None, state=None
) -> Path:
    """Write a loadable model folder (weights, config, tokenizer[, training state]) atomically:
    built under a temporary name, then renamed over `folder`."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(model_weights(model), str(temporary / WEIGHTS), metadata={"format": "pt"})
    config = {"model": model.config.to_dict(), **(extra_config or {})}
    layout = quantized_layout(model)
    if layout:  # which layers hold int8/int4 codes, so loading can rebuild them first
        config["quantization"] = layout
    (temporary / CONFIG).write_text(json.dumps(config, indent=2))
    tokenizer.save(temporary / TOKENIZER)
    if state is not None:
        torch.save(state, temporary / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a run folder, or a run's checkpoints folder."""
    path = Path(path)
    if (path / WEIGHTS).exists():
        return path
    for checkpoints in (path / "checkpoints", path):
        latest = checkpoints / LATEST
        if latest.exists():
            return checkpoints / latest.read_text().strip()
    raise LmforgeError(f"{path}: no checkpoint here (expected {WEIGHTS} or checkpoints/{LATEST})")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, dict]:
    """Model (in eval mode), tokenizer and config dict of a checkpoint."""
    folder = resolve_checkpoint(path)
    try:
        config = json.loads((folder / CONFIG).read_text())
        model_config = ModelConfig.from_dict(config["model"])
        # No random init: load_weights fills every weight (or names the missing ones).
        with uninitialized_layers():
            model = Transformer(model_config, init_weights=False)
            if "quantization" in config:
                model = apply_layout(model, config["quantization"])
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise LmforgeError(f"{folder / CONFIG}: unreadable model config ({error})") from None
    load_weights(model, folder, assign="quantization" in config)
    model.to(device).eval()
    return model, load_tokenizer(folder / TOKENIZER), config


def load_weights(model: Transformer, folder: Path, assign: bool = False) -> None:
    """Fill `model` with a checkpoint's weights; every weight must be there (the tied head excepted)."""
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (OSError, SafetensorError) as error:
        raise LmforgeError(f"{folder / WEIGHTS}: cannot read weights ({error}); the file may be truncated") from None
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=assign)
    if model.config.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
        if assign and type(model.lm_head) is not QuantizedLinear:
            model.lm_head.weight = model.token_embedding.weight
    if assign:
        model.rebuild_buffers()
    if missing or unexpected:
        raise LmforgeError(
            f"{folder / WEIGHTS}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_training_state(folder: Path) -> dict:
    """Optimizer, RNG and data state; weights_only so a checkpoint can never run code."""
    return torch.load(folder / STATE, map_location="cpu", weights_only=True)
