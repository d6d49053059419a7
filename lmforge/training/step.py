"""The training step every trainer runs: micro-batches forward (bf16 autocast on CUDA) and backward
with the loss scaled for accumulation, then one update: clip, optimizer step, zero the gradients.

Pretraining, `fit` (SFT, classification, recommendation, vision) and quickstart's calibration
(`quickstart.seconds_per_step`) call these two functions; what differs between them (how a batch
is drawn, what is logged, when a loss counts as diverged) stays with the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

Outputs = TypeVar("Outputs")


def autocast_for(device: torch.device) -> AbstractContextManager:
    # bf16 on GPUs; on CPUs without bf16 units a bf16 matmul is ~100x slower, so stay in fp32.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def forward_backward(
    forward: Callable[[], tuple[torch.Tensor, Outputs]], micro_batches: int, autocast: AbstractContextManager
) -> tuple[torch.Tensor, Outputs]:
    """One micro-batch: `forward()` → (loss, outputs) under `autocast`, then the backward pass of
    loss / micro_batches, so the gradients summed over the step's micro-batches are those of their
    mean loss. Returns the loss (detached, unscaled) and the outputs."""
    with autocast:
        loss, outputs = forward()
    # Outside autocast, as torch's AMP recipe has it: backward ops run in the dtype of their forward anyway.
    (loss / micro_batches).backward()
    return loss.detach(), outputs


def next_token_forward(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """`forward` for `forward_backward` of a language model (a `Transformer` called with targets):
    the next-token loss, and the logits beside it."""

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        logits, loss = model(inputs, targets)
        return loss, logits

    return forward


def apply_gradients(optimizer: torch.optim.Optimizer, clip_grad_norm: float | None) -> None:
    """The update that ends a step: clip the gradients' global norm (when `clip_grad_norm` > 0),
    step the optimizer, and free the gradients for the next step."""
    if clip_grad_norm is not None and clip_grad_norm > 0:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
