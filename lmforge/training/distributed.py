"""Processes of a `torchrun` job: who this one is, and the collectives the trainers share.

The model file knows nothing of processes; the trainer asks this module who it is, and
`parallelize.py` wraps the model (DDP, FSDP2) when there is more than one process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# NCCL between GPUs (NVLink, InfiniBand); gloo between CPU processes, over TCP.
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


@dataclass
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def restart_warning(environment: Mapping[str, str]) -> str | None:
    """Why a restart of this torchrun job would fail, if it would: with --max-restarts, torchrun's
    default of sharing its rendezvous store with the workers hands a restarted group the first
    attempt's process-group keys, and the new processes dial ports that are gone (PyTorch issue 135712)."""
    restarts = int(environment.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and environment.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (
            f"warning: torchrun may restart this job (--max-restarts={restarts}), but a restart would hang: "
            f"its workers share torchrun's rendezvous store. Launch torchrun with "
            f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment"
        )
    return None


def init_process_group(device_type: str) -> ProcessGroup:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK, or run alone."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return ProcessGroup()
    group = ProcessGroup(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    warning = restart_warning(os.environ)
    if warning and group.is_main:
        print(warning, file=sys.stderr)
    if not dist.is_initialized():
        dist.init_process_group(backend=BACKENDS[device_type])
    if device_type == "cuda":
        torch.cuda.set_device(group.local_rank)
    return group


@contextmanager
def no_gradient_sync(model: nn.Module, skip: bool):
    """Inside gradient accumulation, skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all
    but the last micro-step: the gradients accumulate locally and are reduced once."""
    if skip and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def mean_across_processes(value: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return sum_across_processes(value, group) / group.world_size


def sum_across_processes(value: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Add up every process's gradients (a process that had no share of a batch adds zeros), one
    flat all-reduce for all of them."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in parameters])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter in parameters:
        parameter.grad.copy_(flat[offset : offset + parameter.numel()].view_as(parameter.grad))
        offset += parameter.numel()


class StopRequests:
    """In a torchrun job that saves sharded (every process writes its shard, together), Ctrl-C and
    torchrun's stop signal (it forwards SIGINT or SIGTERM to every worker, then kills them after 30 s)
    are a request to stop, not an exception wherever each process happens to be: a save begun by one
    process alone would wait forever for the others. At each step boundary `any_process` tells every
    process whether any of them was asked (one all-reduce), so all save the same step and stop together.
    Inactive (`active=False`: one process, or one that saves alone), it changes nothing."""

    def __init__(self, device: torch.device, active: bool):
        self.device = device  # of the flag all-reduced: NCCL reduces GPU tensors only
        self.active = active and threading.current_thread() is threading.main_thread()  # where handlers can go
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if self.active:
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._request)
        return self

    def _request(self, number, frame) -> None:
        self.requested = True

    def __exit__(self, *exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def any_process(self) -> bool:
        """Whether any process of the job was asked to stop; every process calls this at the same step."""
        if not self.active:
            return False
        flag = torch.tensor(float(self.requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def wait_for_every_process() -> None:
    """A barrier where a torchrun job is running (one process writes a file the others then read)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown(group: ProcessGroup) -> None:
    if group.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
