"""Checkpoints: weights as safetensors, training state as a weights-only torch file.

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding model.safetensors,
config.json, tokenizer.json and (for training runs) state.pt. It is written under a
temporary name and renamed into place, and `checkpoints/latest` names the newest, so a
crash at any moment leaves the previous checkpoint whole.

Sharded runs (fsdp/hsdp) write `shards/` (torch.distributed.checkpoint: weights and optimizer
state, each process its own shard) instead of model.safetensors, and state.pt holds the step,
RNG and data position only. Such a checkpoint resumes on any number of processes, and loads
(export, `lmforge.load`) into one whole model without a process group.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import temporary_path_beside, write_atomically, write_folder_atomically, write_text_atomically
from lmforge.errors import LmforgeError
from lmforge.inference.quantize import apply_layout, quantized_layout
from lmforge.model import ModelConfig, Transformer, uninitialized_layers
from lmforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS, CONFIG, STATE, TOKENIZER, LATEST = "model.safetensors", "config.json", "state.pt", "tokenizer.json", "latest"
SHARDS = "shards"  # a sharded checkpoint's torch.distributed.checkpoint folder (its index is .metadata)


def model_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict without the tied LM head (safetensors stores each tensor once)."""
    weights = model.state_dict()
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}


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
    point_latest_at(final, keep)
    return final


def point_latest_at(folder: Path, keep: int) -> None:
    """Name a written step folder in `checkpoints/latest`, then delete all but the `keep` newest (0 keeps all)."""
    checkpoints = folder.parent
    write_text_atomically(checkpoints / LATEST, folder.name)
    if keep > 0:
        # Only written folders count: an empty step folder someone made must not push a real one out.
        for old in [written for written in step_folders(checkpoints) if (written / CONFIG).exists()][keep:]:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Tokenizer,
    state: dict,
    extra_config: dict | None = None,
    keep: int = 2,
) -> Path:
    """Every process calls this together: checkpoint `step` (`save_sharded_folder`: weights and optimizer
    state in `shards/`, each process writing its own shard) with `state` (step, RNG, data position: the
    main process's) in state.pt, then `latest`, pruning as `save_checkpoint`. Under several machines
    `run_dir` must be storage they share."""
    folder = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    config = {"model": model.config.to_dict(), "step": step, **(extra_config or {})}
    writers = {
        STATE: lambda path: torch.save(state, path),
        TOKENIZER: lambda path: tokenizer.save(path),
        CONFIG: lambda path: path.write_text(json.dumps(config, indent=2)),
    }
    save_sharded_folder(folder, model, optimizer, writers)
    if not dist.is_initialized() or dist.get_rank() == 0:
        point_latest_at(folder, keep)
    _wait_for_every_process()  # no process goes on (and may read or prune it) before `latest` names it
    return folder


def save_sharded_folder(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    writers: dict[str, Callable[[Path], object]],
    trainable_only: bool = False,
) -> Path:
    """Every process calls this together: `folder/shards/` holds the model's and optimizer's state
    (torch.distributed.checkpoint, each process writing its own shard in parallel) and the main process
    writes the other files (`name: write(path)`). Atomic: all of it is built in the folder's temporary
    folder, which the main process renames over `folder` once every shard is written.
    `trainable_only` leaves frozen weights out (a LoRA base: they come back from where it was loaded)."""
    import torch.distributed.checkpoint as dcp  # a few seconds to import: only where a sharded run needs it

    model_state, optimizer_state, _ = _sharded_state(model, optimizer, trainable_only)

    def write_shards(staging: Path) -> None:
        _wait_for_every_process()  # the main process has emptied the folder of any killed write's leftovers
        # Returns on the main process once every shard is written: it gathers each process's result.
        with _alone_without_a_warning():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / SHARDS)

    def write_all(staging: Path) -> None:
        staging.mkdir()
        write_shards(staging)
        for name, write in writers.items():
            write(staging / name)

    if not dist.is_initialized() or dist.get_rank() == 0:
        write_atomically(folder, write_all)
    else:
        write_shards(temporary_path_beside(folder))
    _wait_for_every_process()  # no process goes on (and may read it) before it is in place
    return folder


def _wait_for_every_process() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _alone_without_a_warning():
    """torch.distributed.checkpoint warns that it is "assuming the intent is to save [load] in a single
    process" whenever there is no process group: a sharded run alone, and export, are just that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _shard_failure(error: BaseException) -> str:
    """What went wrong reading shards, in one line: DCP wraps each process's exception (with its whole
    traceback in the message) in a CheckpointException, which is a BaseException."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    return f"{type(error).__name__}: {error}".rstrip(": ").splitlines()[0]


def is_sharded(folder: Path) -> bool:
    """Whether a checkpoint folder was written by a sharded (fsdp/hsdp) run."""
    return (folder / SHARDS).is_dir()


def load_sharded_training_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
) -> None:
    """Fill `model` and `optimizer` from a sharded checkpoint, whatever the number of processes that wrote
    it and that read it now: each process reads the parts of the shards its own shard needs (all of
    them, for a plain model). Every process calls this together. `trainable_only` as it was saved:
    frozen weights stay as they are (every trainable one must be in the shards)."""
    import torch.distributed.checkpoint as dcp  # a few seconds to import: only where a sharded run needs it
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optimizer_state, options = _sharded_state(model, optimizer, trainable_only)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _alone_without_a_warning():
            dcp.load(state, checkpoint_id=folder / SHARDS)
    except (Exception, CheckpointException) as error:  # a missing, truncated or mismatched shard
        raise LmforgeError(f"{folder / SHARDS}: cannot resume from these shards ({_shard_failure(error)})") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool):
    """(model state, optimizer state, options) as torch.distributed.checkpoint saves and loads them: by
    fully qualified names, each tensor this process's shard; without frozen weights if `trainable_only`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Not strict when loading only the trainable weights: the frozen ones are absent by design, and
    # dcp.load already refuses shards that lack any key asked for.
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    if trainable_only:  # torch keeps a frozen weight tied to another (an LM head tied to the embedding): not here
        frozen = {name for name, weight in model.named_parameters(remove_duplicate=False) if not weight.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name not in frozen}
    return model_state, optimizer_state, options


def load_sharded_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded checkpoint, read into this one process (no process group)."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    try:
        with _alone_without_a_warning():
            weights = _load_state_dict_from_keys("model", checkpoint_id=folder / SHARDS)["model"]
    except (Exception, CheckpointException) as error:  # a missing .metadata or shard file, a truncated one
        raise LmforgeError(f"{folder / SHARDS}: cannot read the sharded weights ({_shard_failure(error)})") from None
    return {name: tensor for name, tensor in weights.items() if isinstance(tensor, torch.Tensor)}


def save_model(
    folder: str | Path, model: Transformer, tokenizer: Tokenizer, extra_config: dict | None = None, state=None
) -> Path:
    """Write a loadable model folder (weights, config, tokenizer[, training state]) atomically:
    built under a temporary name, then renamed over `folder`."""
    config = {"model": model.config.to_dict(), **(extra_config or {})}
    layout = quantized_layout(model)
    if layout:  # which layers hold int8/int4 codes, so loading can rebuild them first
        config["quantization"] = layout
    writers = {
        WEIGHTS: lambda path: save_file(model_weights(model), str(path), metadata={"format": "pt"}),
        CONFIG: lambda path: path.write_text(json.dumps(config, indent=2)),
        TOKENIZER: lambda path: tokenizer.save(path),
    }
    if state is not None:
        writers[STATE] = lambda path: torch.save(state, path)
    return write_folder_atomically(folder, writers)


class DamagedLatest(LmforgeError):
    """`checkpoints/latest` is missing, unreadable, or names no checkpoint folder inside `checkpoints/`."""


def latest_folder(checkpoints: Path) -> Path:
    """The step folder `checkpoints/latest` names; DamagedLatest unless it is a non-empty folder right inside."""
    latest = checkpoints / LATEST
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DamagedLatest(f"{latest} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DamagedLatest(f"{latest} is unreadable ({error})") from None
    if not name:
        raise DamagedLatest(f"{latest} is empty")
    folder = checkpoints / name
    if Path(name).name != name or name in (".", "..") or folder.resolve().parent != checkpoints.resolve():
        raise DamagedLatest(f"{latest} names {name!r}, which is outside {checkpoints}")
    if not folder.is_dir():
        raise DamagedLatest(f"{latest} names {name!r}, which does not exist")
    if not any(folder.iterdir()):
        raise DamagedLatest(f"{latest} names {name!r}, which is empty")
    return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a run folder, or a run's checkpoints folder."""
    path = Path(path)
    if (path / WEIGHTS).exists() or (path / SHARDS).is_dir():
        return path
    for checkpoints in (path / "checkpoints", path):
        if (checkpoints / LATEST).exists():
            return latest_folder(checkpoints)
    raise LmforgeError(f"{path}: no checkpoint here (expected {WEIGHTS}, {SHARDS}/ or checkpoints/{LATEST})")


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
    """Fill `model` with a checkpoint's weights (model.safetensors, or a sharded run's shards/); every
    weight must be there (the tied head excepted)."""
    if is_sharded(folder):
        weights, source = load_sharded_weights(folder), folder / SHARDS
    else:
        try:
            weights, source = load_file(str(folder / WEIGHTS)), folder / WEIGHTS
        except (OSError, SafetensorError) as error:
            raise LmforgeError(
                f"{folder / WEIGHTS}: cannot read weights ({error}); the file may be truncated"
            ) from None
    try:
        model.load_weights(weights, assign=assign)
    except ValueError as error:
        raise LmforgeError(f"{source}: {error}") from None


STATE_TYPES = {"step": int, "optimizer": dict, "torch_rng": torch.Tensor, "data_rng": torch.Tensor}


@dataclass
class TrainingCheckpoint:
    """What resuming reads from a checkpoint folder, loaded and checked; the weights are checked, not loaded."""

    folder: Path
    model: dict  # the run's ModelConfig fields
    state: dict  # STATE_TYPES' keys, plus cuda_rng from CUDA runs
    latest_problem: str | None = None  # set when `latest` was damaged and this is the newest complete folder
    sharded: bool = False  # weights and optimizer state in shards/ (`load_sharded_training_state`)


def load_training_state(path: Path, sharded: bool = False) -> dict:
    """Optimizer, RNG and data state (a sharded checkpoint keeps the optimizer in its shards); weights_only
    so a checkpoint can never run code."""
    state = load_torch_file(path, "this folder holds a model, not a training state to resume")
    expected = {key: kind for key, kind in STATE_TYPES.items() if not (sharded and key == "optimizer")}
    wrong = [
        key for key, kind in expected.items() if not isinstance(state, dict) or not isinstance(state.get(key), kind)
    ]
    if wrong:
        raise LmforgeError(f"{path}: not a training state (missing or malformed: {', '.join(wrong)})")
    return state


def load_torch_file(path: Path, when_missing: str) -> object:
    """A torch file of tensors and plain values (weights_only: it can never run code); a missing,
    damaged or hostile file is an LmforgeError naming it (`when_missing` says what a missing one means)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols just before refusing them
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LmforgeError(f"{path}: missing; {when_missing}") from None
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running whatever code the file holds.
        raise LmforgeError(
            f"{path}: holds objects other than tensors and plain values, so it is not a training state "
            f"lmforge wrote; refused to unpickle it"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for a damaged file
        reason = str(error).split(". ")[0] or type(error).__name__
        raise LmforgeError(f"{path}: unreadable, probably truncated ({reason})") from None
    return state


def load_training_checkpoint(folder: Path) -> TrainingCheckpoint:
    """A checkpoint folder's model config and training state, with its weights file checked whole."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{folder / CONFIG}: missing") from None
    except (OSError, ValueError) as error:  # ValueError: bad JSON or UTF-8, as when the file is truncated
        raise LmforgeError(f"{folder / CONFIG}: unreadable, probably truncated ({error})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise LmforgeError(f"{folder / CONFIG}: no 'model' object holding the model config")
    sharded = is_sharded(folder)
    state = load_training_state(folder / STATE, sharded)
    if sharded:
        from torch.distributed.checkpoint import FileSystemReader

        try:  # the index naming every shard's contents; dcp.save writes it last
            FileSystemReader(folder / SHARDS).read_metadata()
        except Exception as error:
            raise LmforgeError(f"{folder / SHARDS}: unreadable shard index ({type(error).__name__}: {error})") from None
        return TrainingCheckpoint(folder, model, state, sharded=True)
    try:
        with safe_open(str(folder / WEIGHTS), "pt"):  # reads the header, which covers the file
            pass
    except (OSError, SafetensorError) as error:
        raise LmforgeError(f"{folder / WEIGHTS}: cannot read weights ({error}); the file may be truncated") from None
    return TrainingCheckpoint(folder, model, state)


def step_folders(checkpoints: Path) -> list[Path]:
    """`checkpoints/step_N` folders, newest first."""
    found = [p for p in checkpoints.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len("step_") :]), reverse=True)


def newest_complete_checkpoint(checkpoints: Path, skip: Path | None = None) -> TrainingCheckpoint | None:
    """The newest step folder (other than `skip`) that holds everything resuming needs and loads."""
    for folder in step_folders(checkpoints):
        if folder != skip:
            try:
                return load_training_checkpoint(folder)
            except LmforgeError:
                continue
    return None


def holds_checkpoint(run_dir: str | Path) -> bool:
    """Whether `run_dir/checkpoints` holds anything resuming reads: `latest` or a step folder (a damaged
    one counts: `load_resume_checkpoint` says what is wrong with it)."""
    checkpoints = Path(run_dir) / "checkpoints"
    return (checkpoints / LATEST).exists() or bool(step_folders(checkpoints))


def load_resume_checkpoint(run_dir: str | Path) -> TrainingCheckpoint:
    """The checkpoint `run_dir/checkpoints/latest` names, loaded for resuming. If `latest` itself is
    damaged, the newest complete step folder instead, with `latest_problem` saying what was wrong."""
    checkpoints = Path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise LmforgeError(f"{run_dir}: no checkpoints to resume from (no {checkpoints} folder)")
    try:
        folder = latest_folder(checkpoints)
    except DamagedLatest as problem:
        fallback = newest_complete_checkpoint(checkpoints)
        if fallback is None:
            raise LmforgeError(f"{problem}, and {checkpoints} holds no complete checkpoint to resume from") from None
        fallback.latest_problem = str(problem)
        return fallback
    try:
        return load_training_checkpoint(folder)
    except LmforgeError as error:
        older = newest_complete_checkpoint(checkpoints, skip=folder)
        if older is None:
            raise
        raise LmforgeError(
            f"{error}\n  {older.folder} is complete: move {folder} out of {checkpoints} to resume from it"
        ) from None
