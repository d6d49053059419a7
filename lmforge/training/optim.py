"""The optimizer every trainer builds: pretraining, `fit` (SFT, classification, recommendation, vision).

Weight decay goes on the matrices (linear and embedding weights, ≥2-D) and never on norms' gains
or biases (1-D): decaying a norm's gain pulls it towards zero, which shrinks the signal instead of
regularising a mapping (nanoGPT's `configure_optimizers`). nanochat unified its two optimizers after
one of them decayed everything; one builder keeps every entry point on the same rule.
"""

from __future__ import annotations

import torch
from torch import nn

# The optimizers `fit`'s `compile` names; each takes (param groups, lr=..., **options).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
# These have a fused kernel (one launch for every tensor) on CUDA and, in recent torch, on CPU;
# where it is missing, the multi-tensor (`foreach`) path is the next fastest.
FUSED = (torch.optim.AdamW, torch.optim.Adam)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters (requires_grad) in two groups: ≥2-D with `weight_decay`, the rest
    with none. Always both groups, in that order, so optimizer states saved by a run load into another."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, name: str = "adamw", **options
) -> torch.optim.Optimizer:
    """The named optimizer (`OPTIMIZERS`) over the model's trainable parameters, decaying only the
    ≥2-D ones; Adam(W) fused where available. `options` go to the optimizer (betas, alpha, ...)."""
    kind = OPTIMIZERS[name]
    groups = parameter_groups(model, weight_decay)
    if kind in FUSED:
        try:
            return kind(groups, lr=learning_rate, fused=True, **options)
        except (RuntimeError, TypeError):
            return kind(groups, lr=learning_rate, foreach=True, **options)
    return kind(groups, lr=learning_rate, **options)
