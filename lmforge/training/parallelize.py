"""Parallelism applied to a built model from outside, as torchtitan's `parallelize` functions do: the
model file stays single-device; this module turns it into what a torchrun job trains.

    mesh = device_mesh(config, group, device)    # None for one process
    model = parallelize(model, config, mesh)     # activation checkpointing, then DDP or FSDP2

All of it is PyTorch's own machinery: `checkpoint_wrapper` (non-reentrant torch.utils.checkpoint) per
block, `fully_shard` (FSDP2) per block and on the root over a `DeviceMesh`, DDP for whole-model replicas.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.errors import LmforgeError
from lmforge.settings import TrainConfig
from lmforge.training import distributed

SHARDED_MODES = ("fsdp", "hsdp")


def writes_sharded_checkpoints(config: TrainConfig) -> bool:
    """fsdp/hsdp runs save with torch.distributed.checkpoint (each process its shard), even alone, so a
    run can move between 1 and N processes; ddp runs save one model.safetensors + state.pt."""
    return config.parallel in SHARDED_MODES


def device_mesh(config: TrainConfig, group: distributed.ProcessGroup, device: torch.device) -> DeviceMesh | None:
    """The processes as a DeviceMesh: 1-D ("shard") for fsdp and ddp, 2-D ("replicate", "shard") for
    hsdp; None for a single process, where there is nothing to shard or replicate over."""
    if not group.is_distributed:
        return None
    if config.parallel != "hsdp":
        return init_device_mesh(device.type, (group.world_size,), mesh_dim_names=("shard",))
    # One node's processes by default: the shard group's all-gathers then stay on the node's fast links.
    shard_processes = config.hsdp_shard_processes or int(os.environ.get("LOCAL_WORLD_SIZE", group.world_size))
    if group.world_size % shard_processes:
        raise LmforgeError(
            f"parallel=hsdp: {group.world_size} processes do not split into shard groups of {shard_processes}; "
            f"set hsdp_shard_processes to a divisor of {group.world_size}"
        )
    return init_device_mesh(
        device.type, (group.world_size // shard_processes, shard_processes), mesh_dim_names=("replicate", "shard")
    )


def describe_mesh(config: TrainConfig, mesh: DeviceMesh) -> str:
    """How the processes split the work, for the run's first line: `hsdp: 2 replicas x 2 shards`."""
    if config.parallel == "hsdp":
        replicas, shards = mesh.shape
        return f"hsdp: {replicas} replicas x {shards} shards"
    return f"{config.parallel} over {mesh.size()} processes"


def mixed_precision_for(device: torch.device):
    """bf16 parameters with fp32 gradient reduction on GPUs with bf16; fp32 throughout on CPU, where a
    bf16 matmul is far slower than fp32 (see `step.autocast_for`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each block so its activations are recomputed in backward instead of kept: memory for about
    one more forward pass. Non-reentrant, as torch recommends; state dicts keep the unwrapped names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fully_shard(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> None:
    """FSDP2: each block its own shard group (its all-gather overlaps the previous block's compute), then
    the root for what remains (embeddings, final norm, head). A 2-D mesh makes it HSDP."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_for(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(model: nn.Module, config: TrainConfig, mesh: DeviceMesh | None) -> nn.Module:
    """The model a training step calls: activation checkpointing first (it wraps blocks, which FSDP then
    shards, torchtitan's order), then FSDP2/HSDP in place or a DDP wrapper. A single process (mesh None)
    keeps the plain model."""
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is None:
        return model
    device = next(model.parameters()).device
    if config.parallel in SHARDED_MODES:
        apply_fully_shard(model, mesh, device)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
