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


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype a training step's matmuls run in: bf16 on GPUs that have it (Ampere on); fp32 elsewhere,
    since on CPUs without bf16 units a bf16 matmul is ~100x slower."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast_for(device: torch.device) -> AbstractContextManager:
    dtype = compute_dtype(device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on `device`. To a GPU through pinned memory, without waiting: the copy is queued
    behind the work already on the GPU instead of stalling the Python loop (nanoGPT's get_batch)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


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
