"""Language-model evaluation: loss, perplexity and bits-per-byte over a token dataset."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data import TokenDataset
from lmforge.model import Transformer


@torch.no_grad()
def evaluate_loss(
    model: Transformer,
    dataset: TokenDataset,
    token_byte_lengths: np.ndarray | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    autocast=None,
) -> dict:
    """Mean next-token loss (nats), perplexity and bits-per-byte over the dataset, in order.

    Streams batches so only one batch of logits is ever held. Bits-per-byte divides the
    total loss in bits by the UTF-8 bytes of the predicted tokens, so it compares across
    tokenizers.
    """
    was_training = model.training
    model.eval()
    block_size = block_size or model.config.block_size
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    byte_lengths = torch.from_numpy(token_byte_lengths) if token_byte_lengths is not None else None
    for inputs, targets in dataset.iterate(block_size, batch_size, max_tokens):
        inputs, targets = inputs.to(next(model.parameters()).device), targets
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            logits, _ = model(inputs)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.to(logits.device).flatten(), reduction="sum")
        total_nats += losses.item()
        total_tokens += targets.numel()
        if byte_lengths is not None:
            total_bytes += int(byte_lengths[targets].sum())
    model.train(was_training)
    loss = total_nats / total_tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total_tokens}
    if byte_lengths is not None and total_bytes:
        result["bits_per_byte"] = total_nats / math.log(2) / total_bytes
    return result
