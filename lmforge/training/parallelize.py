"""Parallelism applied to a built model from outside, as torchtitan's `parallelize` functions do: the
model file stays single-device; this module turns it into what a torchrun job trains.

    mesh = device_mesh(config, group, device)    # None for one process
    model = parallelize(model, config, mesh)     # activation checkpointing, then DDP or FSDP2

All of it is PyTorch's own machinery: `checkpoint_wrapper` (non-reentrant torch.utils.checkpoint) per
block, `fully_shard` (FSDP2) per block and on the root over a `DeviceMesh`, DDP for whole-model replicas.
Pretraining (`pretrain.py`) and `fit` (the fine-tunes) both shard through the functions here.
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.errors import LmforgeError
from lmforge.training import distributed

SHARDED_MODES = ("fsdp", "hsdp")
# What `checkpoint_wrapper` puts into the names of a wrapped block's parameters (not into state dicts).
CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


class ParallelSettings(Protocol):
    """What this module reads of a run's settings: TrainConfig, SFTConfig and `settings.Parallelism` have it."""

    parallel: str
    hsdp_shard_processes: int
    activation_checkpointing: bool


def writes_sharded_checkpoints(config: ParallelSettings) -> bool:
    """fsdp/hsdp runs save with torch.distributed.checkpoint (each process its shard), even alone, so a
    run can move between 1 and N processes; ddp runs save one model.safetensors + state.pt."""
    return config.parallel in SHARDED_MODES


def device_mesh(config: ParallelSettings, group: distributed.ProcessGroup, device: torch.device) -> DeviceMesh | None:
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


def describe_mesh(config: ParallelSettings, mesh: DeviceMesh) -> str:
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


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """Every `blocks` list in the model: a Transformer's own, or the one inside a wrapper that `fit`
    trains (a chat model's `NextTokenModel`, a classifier's backbone)."""
    return [module.blocks for module in model.modules() if isinstance(getattr(module, "blocks", None), nn.ModuleList)]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each block so its activations are recomputed in backward instead of kept: memory for about
    one more forward pass. Non-reentrant, as torch recommends; state dicts keep the unwrapped names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for blocks in block_lists(model):
        for index, block in enumerate(blocks):
            blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_fully_shard(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> None:
    """FSDP2: each block its own shard group (its all-gather overlaps the previous block's compute), then
    the root for what remains (embeddings, final norm, head). A 2-D mesh makes it HSDP."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_for(device)
    for blocks in block_lists(model):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def sum_sharded_gradients(model: nn.Module) -> None:
    """Make FSDP's gradient reduction a sum instead of its default mean over processes: `fit` weights each
    process's loss by its share of the batch (shares differ when a batch does not split evenly), so the
    shares' gradients add up to the batch's, as `distributed.sum_gradients` adds them without sharding."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: a divide factor alone is NCCL's PREMUL_SUM(1 / factor), gloo has none.
            module.set_force_sum_reduction_for_comms(True)


def weightless_copy(model: nn.Module) -> nn.Module:
    """The model's structure with its parameters and buffers on the meta device (no memory): taken before
    sharding, it is what `gather_full_weights` fills for writing the trained model as one whole folder."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)  # tied weights stay tied: one memo entry per tensor


def gather_full_weights(sharded: nn.Module, whole: nn.Module, is_main: bool) -> None:
    """Fill `whole` (a `weightless_copy` of the model before sharding) on the main process with the sharded
    model's full weights, on CPU. Every process calls this together (the shards are all-gathered); its
    non-persistent buffers (RoPE tables) stay on meta: it is for writing, not running."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # cpu_offload: the main process only
    weights = get_model_state_dict(sharded, options=options)
    if not is_main:
        return
    # A weight whose first dimension does not split evenly comes back a view of a padded buffer, which
    # safetensors refuses to write (it would store the padding): its own copy.
    for name, value in weights.items():
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            weights[name] = value.clone()
    groups = tied_names(whole)
    whole.load_state_dict(weights, assign=True)  # assigns each name its own tensor, untying tied weights:
    for first, *others in groups:  # tie them again, as writers expect (one tensor, one name in the file)
        for name in others:
            module_name, _, attribute = name.rpartition(".")
            setattr(whole.get_submodule(module_name), attribute, whole.get_parameter(first))


def tied_names(model: nn.Module) -> list[list[str]]:
    """The state dict's names that are one parameter (tied weights), a list each."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name.replace(CHECKPOINT_WRAPPER_PREFIX, ""))
    return [group for group in names.values() if len(group) > 1]


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 holds the model in shards over processes (`fully_shard` on its root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as whole tensors, copied (the model may train on). Sharded, every process
    calls this together and the main process alone gets them, on CPU; the others get {}."""
    if not is_sharded(model):
        return {name: value.detach().clone() for name, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_whole_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put whole `weights` (every name of the state dict) into the model. Sharded, every process calls
    this together, the main process's `weights` are broadcast (the others may pass {}) and each process
    keeps its shard of them."""
    if not is_sharded(model):
        model.load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def parallelize(model: nn.Module, config: ParallelSettings, mesh: DeviceMesh | None) -> nn.Module:
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
