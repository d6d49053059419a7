"""Keras-style training for task models: `compile`, `fit` with a progress bar and callbacks, `evaluate`, `predict`.

    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=10, batch_size=32, validation_split=0.2)

Any `nn.Module` can use the functions here (`fit(model, x, y, ...)`); task models inherit
`Fittable` to get them as methods. `x` is a tensor, a tuple of tensors (positional inputs) or
a dict of tensors (keyword inputs), all with the examples along dimension 0.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.evaluation.metrics import confusion_matrix, macro_f1
from lmforge.settings import Parallelism
from lmforge.training import distributed
from lmforge.training.optim import OPTIMIZERS, build_optimizer
from lmforge.training.parallelize import (
    SHARDED_MODES,
    apply_activation_checkpointing,
    apply_fully_shard,
    block_lists,
    device_mesh,
    is_sharded,
    load_whole_weights,
    sum_sharded_gradients,
    tied_names,
    whole_weights,
    writes_sharded_checkpoints,
)
from lmforge.training.progress import ProgressBar, format_logs
from lmforge.training.schedule import reached_peak, warmup_cosine, warmup_steps_for, warmup_warning
from lmforge.training.step import apply_gradients, autocast_for, forward_backward, to_device

Inputs = torch.Tensor | tuple | list | dict


# Losses: (outputs, targets, from_logits) → one loss per example (per token for sequences),
# so class weights can scale each example before the mean.
def binary_crossentropy(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool) -> torch.Tensor:
    outputs, targets = outputs.reshape(len(outputs), -1).squeeze(-1), targets.reshape(len(targets), -1).squeeze(-1)
    if from_logits:
        return F.binary_cross_entropy_with_logits(outputs, targets.float(), reduction="none")
    # Keras clips probabilities by 1e-7 the same way, so a confident wrong answer costs ~16, not inf.
    return F.binary_cross_entropy(outputs.clamp(1e-7, 1 - 1e-7), targets.float(), reduction="none")


def sparse_categorical_crossentropy(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool) -> torch.Tensor:
    log_probabilities = F.log_softmax(outputs, -1) if from_logits else outputs.clamp_min(1e-7).log()
    return F.nll_loss(log_probabilities, targets.long(), reduction="none")


def categorical_crossentropy(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool) -> torch.Tensor:
    log_probabilities = F.log_softmax(outputs, -1) if from_logits else outputs.clamp_min(1e-7).log()
    return -(targets * log_probabilities).sum(-1)


def mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool) -> torch.Tensor:
    return (outputs.reshape(targets.shape) - targets.float()).pow(2).reshape(len(targets), -1).mean(-1)


def token_crossentropy(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool = True) -> torch.Tensor:
    """Next-token loss for (B, T, vocab) logits: one loss per scored token; targets of -100 are not scored."""
    scored = targets != -100
    return F.cross_entropy(outputs[scored].float(), targets[scored])


LOSSES: dict[str, Callable] = {
    "binary_crossentropy": binary_crossentropy,
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "categorical_crossentropy": categorical_crossentropy,
    "mse": mean_squared_error,
    "mean_squared_error": mean_squared_error,
    "token_crossentropy": token_crossentropy,
}
PER_EXAMPLE_LOSSES = {binary_crossentropy, sparse_categorical_crossentropy, categorical_crossentropy}


def predicted_classes(outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool) -> torch.Tensor:
    """Class ids from outputs: a threshold for one output per example (binary), argmax otherwise."""
    if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] > 1:
        return outputs.argmax(-1)
    return (outputs.reshape(targets.shape) > (0.0 if from_logits else 0.5)).long()


class Metric:
    """Accumulates over an epoch's batches; `result()` is the value over everything seen."""

    name: str

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, from_logits: bool) -> None:
        raise NotImplementedError

    def result(self) -> float:
        raise NotImplementedError

    def result_across(self, processes: distributed.ProcessGroup, device: torch.device) -> float:
        """The result over every process's examples, where each process updated it with its share of each
        batch (under torchrun); every process calls this together."""
        raise NotImplementedError

    def state_across(self, processes: distributed.ProcessGroup, device: torch.device) -> dict:
        """What every process has accumulated, as one process's state: a resumed run (on any number of
        processes) restores it into its main process alone. Every process calls this together."""
        raise NotImplementedError


class Accuracy(Metric):
    """Share of correct predictions; for token targets, of the scored (not -100) tokens."""

    name = "accuracy"

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, outputs, targets, from_logits) -> None:
        if targets.is_floating_point() and targets.shape == outputs.shape and outputs.shape[-1] > 1:
            targets = targets.argmax(-1)  # one-hot (categorical_crossentropy)
        predicted = predicted_classes(outputs, targets, from_logits)
        scored = targets != -100
        self.correct += int((predicted[scored] == targets[scored].long()).sum())
        self.total += int(scored.sum())

    def result(self) -> float:
        return self.correct / max(self.total, 1)

    def result_across(self, processes, device) -> float:
        state = self.state_across(processes, device)
        return state["correct"] / max(state["total"], 1)

    def state_across(self, processes, device) -> dict:
        counts = torch.tensor([self.correct, self.total], dtype=torch.float64, device=device)
        correct, total = distributed.sum_across_processes(counts, processes).tolist()
        return {"correct": int(correct), "total": int(total)}


class MacroF1(Metric):
    name = "macro_f1"

    def reset(self) -> None:
        self.predicted, self.targets = [], []

    def update(self, outputs, targets, from_logits) -> None:
        self.predicted.append(predicted_classes(outputs, targets, from_logits).flatten())
        self.targets.append(targets.long().flatten())

    def result(self) -> float:
        return self._score(torch.cat(self.predicted), torch.cat(self.targets))

    def result_across(self, processes, device) -> float:
        state = self.state_across(processes, device)
        return self._score(torch.cat(state["predicted"]), torch.cat(state["targets"]))

    def state_across(self, processes, device) -> dict:
        import torch.distributed as dist

        mine = (torch.cat(self.predicted).cpu(), torch.cat(self.targets).cpu()) if self.predicted else None
        everyone = [None] * processes.world_size
        dist.all_gather_object(everyone, mine)  # the shares differ in length: objects, not one tensor
        shares = [share for share in everyone if share is not None]
        return {"predicted": [p for p, _ in shares], "targets": [t for _, t in shares]}

    @staticmethod
    def _score(predicted: torch.Tensor, targets: torch.Tensor) -> float:
        classes = int(max(predicted.max(), targets.max())) + 1
        return macro_f1(confusion_matrix(predicted, targets, classes))


METRICS = {"accuracy": Accuracy, "acc": Accuracy, "macro_f1": MacroF1, "f1": MacroF1}


# Keras's defaults for the named optimizers: the learning rate, and options beyond torch's defaults.
DEFAULT_LEARNING_RATES = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}
DEFAULT_OPTIONS = {"rmsprop": {"alpha": 0.9}}


def resolve_optimizer(
    spec, model: nn.Module, learning_rate: float | None, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """An optimizer from a name (`optim.build_optimizer`, with Keras's defaults: adam 1e-3, sgd 1e-2;
    adamw decays 0.01 unless told), a factory `trainable params → optimizer`, or itself."""
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if callable(spec):
        return spec([p for p in model.parameters() if p.requires_grad])
    if spec not in OPTIMIZERS:
        raise LmforgeError(f"unknown optimizer {spec!r}; known: {sorted(OPTIMIZERS)}, or an optimizer instance")
    if weight_decay is None:
        weight_decay = 0.01 if spec == "adamw" else 0.0
    return build_optimizer(
        model, learning_rate or DEFAULT_LEARNING_RATES[spec], weight_decay, spec, **DEFAULT_OPTIONS.get(spec, {})
    )


@dataclass
class TrainingSetup:
    """What `compile` fixed: how `fit` updates the model and what it reports."""

    optimizer: torch.optim.Optimizer
    loss: Callable
    loss_name: str
    metrics: list[Metric]
    from_logits: bool
    clip_grad_norm: float | None
    parallelism: Parallelism = field(default_factory=Parallelism)
    # FSDP2 shards the model over this torchrun job's processes and reduces its gradients (fsdp/hsdp
    # with more than one process); otherwise `fit` sums whole gradients itself.
    sharded: bool = False


def compile(
    model: nn.Module,
    optimizer="adam",
    loss="sparse_categorical_crossentropy",
    metrics: list[str] | None = None,
    from_logits: bool = False,
    learning_rate: float | None = None,
    clip_grad_norm: float | None = None,
    weight_decay: float | None = None,
    parallelism: Parallelism | None = None,
) -> None:
    """Fix the optimizer (over the parameters that require grad), the loss and the metrics for `fit`.

    `parallelism` (under torchrun): fsdp/hsdp shard the model in place here, through
    `training.parallelize` as pretraining does, before the optimizer is built over the shards;
    `activation_checkpointing` wraps its transformer blocks. ddp (the default) leaves it whole.
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise LmforgeError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}, or a callable")
        loss_function, loss_name = LOSSES[loss], loss
    else:
        loss_function, loss_name = loss, getattr(loss, "__name__", "loss")
    unknown = [name for name in metrics or [] if name not in METRICS]
    if unknown:
        raise LmforgeError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LmforgeError("the model has no trainable parameters (all have requires_grad=False)")
    parallelism = parallelism or Parallelism()
    sharded = _parallelize(model, parallelism, optimizer)  # first: the optimizer must hold the shards
    model.training_setup = TrainingSetup(
        optimizer=resolve_optimizer(optimizer, model, learning_rate, weight_decay),
        loss=loss_function,
        loss_name=loss_name,
        metrics=[METRICS[name]() for name in metrics or []],
        from_logits=from_logits,
        clip_grad_norm=clip_grad_norm,
        parallelism=parallelism,
        sharded=sharded,
    )


def _parallelize(model: nn.Module, parallelism: Parallelism, optimizer) -> bool:
    """Activation checkpointing, then (fsdp/hsdp under torchrun) FSDP2 with its gradient reduction a sum;
    whether the model is now sharded. Alone, fsdp/hsdp shard nothing but still write sharded states."""
    if parallelism.activation_checkpointing and not block_lists(model):
        raise LmforgeError(
            "activation_checkpointing: the model has no `blocks` list of transformer blocks to recompute"
        )
    device, mesh = _device(model), None
    if parallelism.parallel in SHARDED_MODES:
        mesh = device_mesh(parallelism, distributed.init_process_group(device.type), device)
    if mesh is not None and isinstance(optimizer, torch.optim.Optimizer):
        raise LmforgeError(
            f"parallel={parallelism.parallel}: pass the optimizer by name or as a factory of the parameters; "
            f"an optimizer instance holds the parameters as they were before sharding"
        )
    if parallelism.activation_checkpointing:
        apply_activation_checkpointing(model)  # before sharding, torchtitan's order (as `parallelize`)
    if mesh is None:
        return False
    apply_fully_shard(model, mesh, device)
    sum_sharded_gradients(model)
    return True


def _setup(model: nn.Module) -> TrainingSetup:
    setup = getattr(model, "training_setup", None)  # declared on Fittable; a plain module has it after compile
    if setup is None:
        raise LmforgeError("call compile(...) before fit/evaluate")
    return setup


# --- data --------------------------------------------------------------------------------


def _count(x: Inputs) -> int:
    if isinstance(x, torch.Tensor):
        return len(x)
    values = list(x.values()) if isinstance(x, dict) else list(x)
    counts = {len(v) for v in values}
    if len(counts) != 1:
        raise LmforgeError(f"inputs disagree on the number of examples: {sorted(counts)}")
    return counts.pop()


def _take(x: Inputs, index) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x[index]
    if isinstance(x, dict):
        return {key: value[index] for key, value in x.items()}
    return tuple(value[index] for value in x)


def _to(x: Inputs, device: torch.device) -> Inputs:
    if isinstance(x, torch.Tensor):
        return to_device(x, device)
    if isinstance(x, dict):
        return {key: to_device(value, device) for key, value in x.items()}
    return tuple(to_device(value, device) for value in x)


def _call(model: nn.Module, x: Inputs) -> torch.Tensor:
    if isinstance(x, dict):
        return model(**x)
    return model(*x) if isinstance(x, tuple) else model(x)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- callbacks ---------------------------------------------------------------------------


class Callback:
    """Hooks into `fit`. `self.model` is the model being fitted and `self.params` holds epochs and steps."""

    model: nn.Module
    params: dict

    def on_train_begin(self, logs: dict) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict) -> None: ...
    def on_batch_begin(self, batch: int, logs: dict) -> None: ...
    def on_batch_end(self, batch: int, logs: dict) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict) -> None: ...
    def on_train_end(self, logs: dict) -> None: ...

    # What a resumed `fit` needs to go on as if never stopped (plain values and tensors); a callback
    # whose decisions depend on what it saw (the best loss so far, a schedule's peak) returns it here.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def _mode(monitor: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "max" if any(word in monitor for word in ("acc", "f1", "auc")) else "min"


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _monitored(logs: dict, monitor: str, who: str) -> float:
    if monitor not in logs:
        raise LmforgeError(f"{who}: monitored value {monitor!r} is not in the logs {sorted(logs)}")
    return logs[monitor]


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by `min_delta` for `patience` epochs; can restore the best weights."""

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 0,
        min_delta: float = 0.0,
        mode: str = "auto",
        restore_best_weights: bool = False,
    ):
        self.monitor, self.patience, self.min_delta = monitor, patience, abs(min_delta)
        self.mode, self.restore_best_weights = _mode(monitor, mode), restore_best_weights

    def on_train_begin(self, logs):
        self.best, self.best_epoch, self.wait, self.stopped_epoch, self.best_weights = None, 0, 0, None, None

    def on_epoch_end(self, epoch, logs):
        value = _monitored(logs, self.monitor, "EarlyStopping")
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:  # sharded: the main process holds them whole (see whole_weights)
                self.best_weights = whole_weights(self.model)
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs):
        if self.restore_best_weights and self.best_weights is not None and self.stopped_epoch is not None:
            load_whole_weights(self.model, self.best_weights)

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("best", "best_epoch", "wait", "stopped_epoch", "best_weights")}


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """The weights as safetensors, through the atomic writer: a crash never leaves half a file. A model
    sharded over processes is gathered first: every process calls this, the main one writes."""
    from safetensors.torch import save_file, save_model

    from lmforge.atomic import write_atomically

    if is_sharded(model):
        weights = whole_weights(model)
        if not weights:  # not the main process
            return Path(path)
        for group in tied_names(model):  # safetensors keeps one name of a tied weight, as save_model does
            for name in group[1:]:
                weights.pop(name)
        return write_atomically(path, lambda temporary: save_file(weights, str(temporary)))
    # save_model (not save_file) copes with tied weights
    return write_atomically(path, lambda temporary: save_model(model, str(temporary)))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Weights that `save_weights` wrote, into the model; sharded, every process calls this and the main
    one reads the file."""
    from safetensors.torch import load_file, load_model

    if not is_sharded(model):
        load_model(model, str(path))
        return
    weights = {}
    if torch.distributed.get_rank() == 0:
        weights = load_file(str(path))
        for group in tied_names(model):  # the file holds one of the names
            kept = next(name for name in group if name in weights)
            weights.update({name: weights[kept] for name in group})
    load_whole_weights(model, weights)


class ModelCheckpoint(Callback):
    """Save the weights after each epoch, or only when `monitor` improves (`save_best_only`).

    `path` may contain `{epoch}` and any logged value, e.g. `ckpt-{epoch:02d}-{val_loss:.3f}.safetensors`.
    """

    def __init__(self, path: str | Path, monitor: str = "val_loss", save_best_only: bool = True, mode: str = "auto"):
        self.path, self.monitor, self.save_best_only = str(path), monitor, save_best_only
        self.mode = _mode(monitor, mode)
        self.best: float | None = None
        self.saved: list[Path] = []

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only:
            value = _monitored(logs, self.monitor, "ModelCheckpoint")
            if not _improved(value, self.best, self.mode, 0.0):
                return
            self.best = value
        path = Path(self.path.format(epoch=epoch + 1, **logs))
        # Under torchrun one process writes; they hold the same weights (sharded: every process gathers them).
        if self.params.get("is_main", True) or is_sharded(self.model):
            save_weights(self.model, path)
        distributed.wait_for_every_process()  # then every process may read it
        self.saved.append(path)

    def state_dict(self) -> dict:
        return {"best": self.best, "saved": [str(path) for path in self.saved]}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.saved = state["best"], [Path(path) for path in state["saved"]]


class LearningRateScheduler(Callback):
    """Set the learning rate at the start of each epoch to `schedule(epoch, current_lr)`."""

    def __init__(self, schedule: Callable[[int, float], float]):
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs):
        for group in _setup(self.model).optimizer.param_groups:
            group["lr"] = float(self.schedule(epoch, group["lr"]))


class WarmupCosine(Callback):
    """Per optimizer step: linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` x the peak.

    `warmup_steps` unset: a tenth of the run's optimizer steps, at most 100 (`schedule.warmup_steps_for`).
    After `fit`, `reached_peak` says whether the run got through its warmup (early stopping may end it sooner).
    """

    def __init__(self, warmup_steps: int | None = None, min_ratio: float = 0.1):
        self.requested_warmup_steps, self.min_ratio = warmup_steps, min_ratio
        self.warmup_steps, self.reached_peak = warmup_steps, False

    def on_train_begin(self, logs):
        self.peaks = [group["lr"] for group in _setup(self.model).optimizer.param_groups]
        total = self.params["optimizer_steps"]
        self.warmup_steps = warmup_steps_for(total, self.requested_warmup_steps)
        warning = warmup_warning(self.warmup_steps, total)
        if warning:
            print(warning, file=sys.stderr)

    def on_batch_begin(self, batch, logs):
        step, total = self.params["optimizer_step"], self.params["optimizer_steps"]
        for group, peak in zip(_setup(self.model).optimizer.param_groups, self.peaks):
            group["lr"] = warmup_cosine(step, total, self.warmup_steps, peak, peak * self.min_ratio)

    def on_train_end(self, logs):
        self.reached_peak = reached_peak(self.params["optimizer_step"], self.warmup_steps)

    def state_dict(self) -> dict:  # the peaks as the run began: a resumed optimizer holds a scheduled rate
        return {"peaks": self.peaks, "warmup_steps": self.warmup_steps}


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by `factor` when `monitor` has not improved for `patience` epochs."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=2, min_lr=0.0, mode="auto"):
        self.monitor, self.factor, self.patience, self.min_lr = monitor, factor, patience, min_lr
        self.mode = _mode(monitor, mode)

    def on_train_begin(self, logs):
        self.best, self.wait = None, 0

    def on_epoch_end(self, epoch, logs):
        value = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        if _improved(value, self.best, self.mode, 0.0):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            for group in _setup(self.model).optimizer.param_groups:
                group["lr"] = max(group["lr"] * self.factor, self.min_lr)
            self.wait = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}


@dataclass
class History:
    """What `fit` returns: per-epoch logs (`history["loss"]`, `history["val_accuracy"]`, ...)."""

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)

    def record(self, epoch: int, logs: dict) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)


# --- the loops ---------------------------------------------------------------------------


def _batch_loss(setup: TrainingSetup, outputs, targets, weights) -> torch.Tensor:
    losses = setup.loss(outputs, targets, setup.from_logits)
    if weights is None or losses.dim() == 0:
        return losses.mean()
    return (losses * weights).mean()  # Keras's sum-over-batch-size: a batch of weight-0 examples costs 0


def _loss_and_outputs(model: nn.Module, setup: TrainingSetup, inputs: Inputs, targets, weights):
    outputs = _call(model, inputs)
    # The loss in fp32, outside the step's autocast (bf16 on CUDA): bf16 outputs would round the loss,
    # and binary_cross_entropy refuses to run under autocast at all.
    with torch.autocast(outputs.device.type, enabled=False):
        return _batch_loss(setup, outputs.float(), targets, weights), outputs


def _loss_count(setup: TrainingSetup, targets: torch.Tensor) -> int:
    """What the batch loss is a mean over: scored tokens for the next-token loss, else examples."""
    if setup.loss is token_crossentropy:
        return int((targets != -100).sum())
    return len(targets)


def _class_weights(class_weight: dict | None, targets: torch.Tensor, setup: TrainingSetup) -> torch.Tensor | None:
    if class_weight is None:
        return None
    if setup.loss not in PER_EXAMPLE_LOSSES:
        raise LmforgeError(f"class_weight needs a classification loss, not {setup.loss_name!r}")
    labels = targets.argmax(-1) if targets.is_floating_point() and targets.dim() > 1 else targets.long().flatten()
    missing = sorted(set(labels.unique().tolist()) - set(class_weight))
    if missing:
        raise LmforgeError(f"class_weight has no weight for classes {missing}")
    table = torch.zeros(int(labels.max()) + 1)
    for label, weight in class_weight.items():
        if label < len(table):
            table[label] = float(weight)
    return table[labels]


@dataclass
class FitPosition:
    """Where a `fit` run is: the epoch, the batches of it done, and what was summed over them so far."""

    epoch: int = 0
    batches_done: int = 0
    optimizer_step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    metrics: list[dict] = field(default_factory=list)  # each metric's accumulated state
    rng: torch.Tensor | None = None  # torch's RNG (dropout) right after the last completed step
    order_rng: torch.Tensor | None = None  # the shuffling RNG as this epoch began, to redraw its order


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fine-tune changes: parameters that require grad, and buffers. Frozen weights (a LoRA base)
    come back from where the model was loaded, so a checkpoint of a 135M model's adapter stays small."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    trainable |= {name for name, _ in model.named_buffers()}
    return {name: value.detach().clone() for name, value in model.state_dict().items() if name in trainable}


def save_fit_state(path: Path, model: nn.Module, setup: TrainingSetup, position: FitPosition,
                   history: History, callbacks: list[Callback]) -> None:  # fmt: skip
    """One file with all a resumed `fit` needs, written atomically; loadable with weights_only=True.

    Under parallel=fsdp/hsdp (even alone) a folder instead, which every process writes together: the
    trainable weights and optimizer state in `shards/` (torch.distributed.checkpoint), the rest in
    state.pt; it resumes on any number of processes."""
    from lmforge.atomic import write_atomically
    from lmforge.formats.checkpoint import STATE, save_sharded_folder

    state = {
        "position": vars(position),
        "history": {"history": history.history, "epoch": history.epoch},
        "callbacks": [callback.state_dict() for callback in callbacks],
    }
    if writes_sharded_checkpoints(setup.parallelism):
        writers = {STATE: lambda file: torch.save(state, file)}
        save_sharded_folder(path, model, setup.optimizer, writers, trainable_only=True)
        return
    state |= {"weights": _trainable_state(model), "optimizer": setup.optimizer.state_dict()}
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def _check_resumable(path: Path | None, setup: TrainingSetup) -> None:
    """That `path` holds a training state of the kind this run writes: a sharded folder or one file."""
    if path is None or not path.exists():
        raise LmforgeError(f"resume=True needs the training state a run wrote; there is none at {path}")
    parallel = setup.parallelism.parallel
    if writes_sharded_checkpoints(setup.parallelism) and not path.is_dir():
        raise LmforgeError(
            f"{path} was written by a parallel=ddp run (one file), which parallel={parallel} cannot resume; "
            f"resume it with parallel=ddp"
        )
    if not writes_sharded_checkpoints(setup.parallelism) and path.is_dir():
        raise LmforgeError(
            f"{path} was written by a parallel=fsdp/hsdp run (shards), which parallel={parallel} cannot resume; "
            f"resume it with the parallel it was written with"
        )


def _load_fit_state(path: Path, model, setup, history, callbacks) -> FitPosition:
    from lmforge.formats.checkpoint import STATE, load_sharded_training_state, load_torch_file

    sharded = writes_sharded_checkpoints(setup.parallelism)
    state = load_torch_file(path / STATE if sharded else path, "resuming needs the training state the run wrote")
    try:
        missing = set() if sharded else set(_trainable_state(model)) - set(state["weights"])
        if missing or len(state["callbacks"]) != len(callbacks):
            raise ValueError(f"it was written for another model or callbacks ({len(missing)} tensors missing)")
        if sharded:  # every process reads the parts of the shards its own shard needs (missing ones: an error)
            load_sharded_training_state(path, model, setup.optimizer, trainable_only=True)
        else:
            model.load_state_dict(state["weights"], strict=False)
            setup.optimizer.load_state_dict(state["optimizer"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError) as error:
        raise LmforgeError(f"{path}: cannot resume from this training state ({error})") from None
    history.history, history.epoch = state["history"]["history"], state["history"]["epoch"]
    for callback, callback_state in zip(callbacks, state["callbacks"]):
        callback.load_state_dict(callback_state)
    return FitPosition(**state["position"])


def _distributed_step(forward, micro_batches: int, autocast, setup: TrainingSetup, targets, processes, idle: bool):
    """`forward_backward` of this process's share of a batch, its loss weighted by the share's part
    of the whole batch's loss (1 alone); the whole batch's loss, and this share's outputs (None if empty).
    `idle`: the batch is smaller than the job and this process has none of it (a stand-in example under
    FSDP, whose every forward and backward needs every process)."""
    if not processes.is_distributed:
        return forward_backward(forward, micro_batches, autocast)
    count = 0 if idle else _loss_count(setup, targets)
    # on the batch's device: NCCL reduces GPU tensors only
    total = distributed.sum_across_processes(torch.tensor(float(count), device=targets.device), processes)
    if count:
        weight = count / float(total)
        loss, outputs = forward_backward(lambda: _weighted(forward(), weight), micro_batches, autocast)
    elif setup.sharded:  # nothing to score here, but FSDP's all-gathers and reduce-scatters need this process
        loss, outputs = forward_backward(lambda: _zero_weighted(forward()), micro_batches, autocast)
    else:
        loss, outputs = torch.zeros((), device=targets.device), None
    return distributed.sum_across_processes(loss, processes), None if idle else outputs


def _metric_states(metrics: list[Metric], processes: distributed.ProcessGroup, device) -> list[dict]:
    """Each metric's accumulated state for a saved position: under torchrun every process's combined."""
    if processes.is_distributed:
        return [metric.state_across(processes, device) for metric in metrics]
    return [copy.deepcopy(vars(metric)) for metric in metrics]


def _metric_results(metrics: list[Metric], processes: distributed.ProcessGroup, device) -> dict[str, float]:
    """Each metric over the batches so far; under torchrun over every process's shares of them."""
    if processes.is_distributed:
        return {metric.name: metric.result_across(processes, device) for metric in metrics}
    return {metric.name: metric.result() for metric in metrics}


def _weighted(loss_and_outputs: tuple, weight: float) -> tuple:
    loss, outputs = loss_and_outputs
    return loss * weight, outputs


def _zero_weighted(loss_and_outputs: tuple) -> tuple:
    """A loss of 0 whose backward reaches every weight the outputs depend on, with zero gradients. Not
    loss * 0: a share with no scored token has a NaN mean loss, and NaN * 0 is NaN."""
    _, outputs = loss_and_outputs
    return outputs.float().sum() * 0.0, outputs


def fit(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    epochs: int = 1,
    batch_size: int = 32,
    validation_data: tuple[Inputs, torch.Tensor] | None = None,
    validation_split: float = 0.0,
    callbacks: list[Callback] | None = None,
    class_weight: dict[int, float] | None = None,
    shuffle: bool = True,
    accumulation_steps: int = 1,
    verbose: int = 1,
    seed: int | None = 0,
    stream=None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> History:
    """Train for `epochs` passes over (x, y) in shuffled mini-batches; returns the per-epoch History.

    `validation_split` holds out the last fraction of the examples (before shuffling, as Keras
    does). `accumulation_steps` sums gradients over that many batches per optimizer step.
    `verbose`: 0 silent, 1 progress bar, 2 one line per epoch.

    With `checkpoint` (a file), the training state is written there at the end of each epoch, every
    `checkpoint_every` optimizer steps, and on Ctrl-C (the last completed step, then the interrupt
    goes on); `resume=True` continues from it exactly as the run would have gone on (tested bit-exact).
    Under parallel=fsdp/hsdp (`compile`'s `parallelism`) `checkpoint` is a folder of shards instead, which
    resumes on any number of processes.
    """
    setup = _setup(model)
    count = _count(x)
    if len(y) != count:
        raise LmforgeError(f"x has {count} examples but y has {len(y)}")
    if count == 0:
        raise LmforgeError("no training examples")
    if not 0 <= validation_split < 1:
        raise LmforgeError(f"validation_split must be in [0, 1), got {validation_split}")
    if resume:
        _check_resumable(None if checkpoint is None else Path(checkpoint), setup)
    if validation_split and validation_data is None:
        keep = count - math.ceil(count * validation_split)
        if keep < 1:
            raise LmforgeError(f"validation_split={validation_split} leaves no training examples out of {count}")
        validation_data = (_take(x, slice(keep, None)), y[keep:])
        x, y, count = _take(x, slice(0, keep)), y[:keep], keep
    weights = _class_weights(class_weight, y, setup)
    steps = math.ceil(count / batch_size)
    optimizer_steps_per_epoch = math.ceil(steps / accumulation_steps)
    callbacks = list(callbacks or [])
    params = {"epochs": epochs, "steps": steps, "optimizer_steps": epochs * optimizer_steps_per_epoch}
    params["optimizer_step"] = 0
    for callback in callbacks:
        callback.model, callback.params = model, params
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = _device(model)
    autocast = autocast_for(device)
    # Under torchrun each process takes its share of every batch; the gradients are summed across
    # them with each share weighted by its part of the batch's loss, so N processes take exactly
    # the steps one process would (to float rounding; dropout draws differ, one RNG per process).
    # Sharded (fsdp/hsdp), FSDP's reduce-scatter does the summing, once per optimizer step.
    processes = distributed.init_process_group(device.type)
    sharded_state = writes_sharded_checkpoints(setup.parallelism)
    params["is_main"] = processes.is_main
    if not processes.is_main:
        verbose = 0
    history = History()
    model.stop_training = False
    for callback in callbacks:
        callback.on_train_begin({})
    position = FitPosition()
    if resume:  # after on_train_begin, whose fresh state the saved one replaces
        position = _load_fit_state(Path(checkpoint), model, setup, history, callbacks)
        params["optimizer_step"] = position.optimizer_step
    order_rng = generator if generator is not None else torch.default_generator
    # The state as of the last completed optimizer step: what Ctrl-C saves when it lands mid-step.
    completed: FitPosition | None = None
    logs: dict = {}

    def save(at: FitPosition) -> None:
        if checkpoint is not None and (processes.is_main or sharded_state):  # sharded: every process its shard
            save_fit_state(Path(checkpoint), model, setup, at, history, callbacks)

    def stop_if_asked(saved: bool = False) -> None:
        """Sharded over processes, Ctrl-C takes effect here, on every process at once: the state of this
        completed step saved (unless `saved` already), then the interrupt (see `distributed.StopRequests`)."""
        if stops.any_process():
            if not saved:
                save(completed)
            if processes.is_main and checkpoint is not None:
                print(f"\ninterrupted: saved the last completed step to {checkpoint}", file=sys.stderr)
            raise KeyboardInterrupt

    stops = distributed.StopRequests(device, sharded_state and processes.is_distributed)
    with stops:
        try:
            for epoch in range(position.epoch, epochs):
                resuming = epoch == position.epoch and position.order_rng is not None
                resuming_mid_epoch = resuming and position.batches_done > 0
                model.train()
                for metric in setup.metrics:
                    metric.reset()
                if resuming_mid_epoch:
                    # Saved as every process's state combined: the main process holds it, the others start empty.
                    for metric, metric_state in zip(setup.metrics, position.metrics if processes.is_main else ()):
                        vars(metric).update(metric_state)
                for callback in callbacks:
                    callback.on_epoch_begin(epoch, {})
                if verbose:
                    print(f"Epoch {epoch + 1}/{epochs}", file=stream or sys.stdout, flush=True)
                bar = ProgressBar(steps, stream) if verbose == 1 else None
                # The RNG states of a resumed run: shuffling's as the epoch began (its order is drawn again),
                # dropout's as of the resume point, set last; a run is drawing from both as it would have been.
                if resuming and not resuming_mid_epoch:
                    torch.set_rng_state(position.rng)
                if resuming:
                    order_rng.set_state(position.order_rng)
                epoch_order_rng = order_rng.get_state()
                if not resuming_mid_epoch:
                    completed = FitPosition(epoch, 0, params["optimizer_step"], rng=torch.get_rng_state(),
                                            order_rng=epoch_order_rng)  # fmt: skip
                order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
                if resuming_mid_epoch:
                    torch.set_rng_state(position.rng)
                first = position.batches_done if resuming_mid_epoch else 0
                loss_sum, seen = (position.loss_sum, position.seen) if resuming_mid_epoch else (0.0, 0)
                setup.optimizer.zero_grad(set_to_none=True)
                for step in range(first, steps):
                    index = order[step * batch_size : (step + 1) * batch_size]
                    for callback in callbacks:
                        callback.on_batch_begin(step, {})
                    share = index[processes.rank :: processes.world_size] if processes.is_distributed else index
                    idle = len(share) == 0
                    if idle and setup.sharded:
                        share = index[:1]  # a stand-in, weighted 0: FSDP needs every process in every step
                    inputs, targets = _to(_take(x, share), device), to_device(y[share], device)
                    batch_weights = None if weights is None else to_device(weights[share], device)
                    # The last group of an epoch may hold fewer batches than accumulation_steps.
                    group = min(accumulation_steps, steps - (step // accumulation_steps) * accumulation_steps)
                    updates = (step + 1) % accumulation_steps == 0 or step + 1 == steps
                    forward = functools.partial(_loss_and_outputs, model, setup, inputs, targets, batch_weights)
                    # Sharded, the gradients of a step's batches accumulate unreduced until its last one.
                    with distributed.no_gradient_sync(model, skip=setup.sharded and not updates):
                        loss, outputs = _distributed_step(forward, group, autocast, setup, targets, processes, idle)
                    if not torch.isfinite(loss):  # before the update: the weights stay those of the last good batch
                        raise LmforgeError(
                            f"epoch {epoch + 1}, batch {step + 1}: loss is {loss.item()}; lower the learning rate"
                        )
                    loss_sum, seen = loss_sum + loss.item() * len(index), seen + len(index)
                    with torch.no_grad():
                        for metric in setup.metrics if outputs is not None else ():
                            metric.update(outputs.detach(), targets, setup.from_logits)
                    if updates:
                        completed = None  # an update in progress: nothing consistent to save until it ends
                        if processes.is_distributed and not setup.sharded:
                            distributed.sum_gradients(setup.optimizer)
                        apply_gradients(setup.optimizer, setup.clip_grad_norm)
                        params["optimizer_step"] += 1
                        completed = FitPosition(
                            epoch, step + 1, params["optimizer_step"], loss_sum, seen,
                            _metric_states(setup.metrics, processes, device),
                            torch.get_rng_state(), epoch_order_rng,
                        )  # fmt: skip
                        if checkpoint_every and params["optimizer_step"] % checkpoint_every == 0:
                            save(completed)
                    logs = {"loss": loss_sum / seen, **_metric_results(setup.metrics, processes, device)}
                    for callback in callbacks:
                        callback.on_batch_end(step, logs)
                    if bar is not None:
                        bar.update(step + 1, logs)
                    if updates:
                        stop_if_asked()
                if validation_data is not None:
                    results = evaluate(model, *validation_data, batch_size=batch_size)
                    logs.update({f"val_{key}": value for key, value in results.items()})
                logs["learning_rate"] = setup.optimizer.param_groups[0]["lr"]
                if bar is not None:
                    bar.finish({k: v for k, v in logs.items() if k != "learning_rate"})
                elif verbose == 2:
                    print(format_logs(logs), file=stream or sys.stdout, flush=True)
                history.record(epoch, logs)
                for callback in callbacks:
                    callback.on_epoch_end(epoch, logs)
                # a run that a callback stopped stays stopped when resumed
                next_epoch = epochs if model.stop_training else epoch + 1
                completed = FitPosition(next_epoch, 0, params["optimizer_step"], rng=torch.get_rng_state(),
                                        order_rng=order_rng.get_state())  # fmt: skip
                save(completed)
                stop_if_asked(saved=True)  # a request during validation: the epoch's state is saved
                if model.stop_training:
                    break
        except KeyboardInterrupt:
            # Sharded over processes, the interrupt reaches here from `stop_if_asked`, which saved.
            if checkpoint is not None and completed is not None and not stops.active:
                save(completed)
                print(f"\ninterrupted: saved the last completed step to {checkpoint}", file=sys.stderr)
            raise
    for callback in callbacks:
        callback.on_train_end(logs)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: Inputs, y: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """Loss and metrics over (x, y), in eval mode, without changing the model."""
    setup = _setup(model)
    count, device, was_training = _count(x), _device(model), model.training
    if len(y) != count:
        raise LmforgeError(f"x has {count} examples but y has {len(y)}")
    model.eval()
    metrics = [type(metric)() for metric in setup.metrics]
    for metric in metrics:
        metric.reset()
    loss_sum = 0.0
    for start in range(0, count, batch_size):
        index = slice(start, start + batch_size)
        targets = y[index].to(device)
        outputs = _call(model, _to(_take(x, index), device))
        loss_sum += _batch_loss(setup, outputs, targets, None).item() * len(targets)
        for metric in metrics:
            metric.update(outputs, targets, setup.from_logits)
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), **{metric.name: metric.result() for metric in metrics}}


@torch.no_grad()
def predict(model: nn.Module, x: Inputs, batch_size: int = 32) -> torch.Tensor:
    """The model's outputs for every example of x, batch by batch, in eval mode."""
    device, was_training = _device(model), model.training
    model.eval()
    outputs = [
        _call(model, _to(_take(x, slice(start, start + batch_size)), device)).cpu()
        for start in range(0, _count(x), batch_size)
    ]
    model.train(was_training)
    return torch.cat(outputs)


class Fittable:
    """Mixin for an `nn.Module`: `compile`, `fit`, `evaluate` and `predict` as methods.

    Listed before `nn.Module` in the bases, its `compile` (Keras's) replaces `nn.Module.compile`
    (torch.compile in place); `torch.compile(model)` or `nn.Module.compile(model)` reach that.
    """

    # Keras's names, declared and typed instead of set on the fly: what `compile` fixed (None until
    # then), and the flag a callback sets to end `fit` after the current epoch (EarlyStopping does).
    training_setup: TrainingSetup | None = None
    stop_training: bool = False

    # Deliberately shadows nn.Module.compile: the Keras face (`model.compile(optimizer=..., loss=...)`)
    # is what SFT, classification, recommendation and vision users write, and renaming it would break
    # every Keras habit and README snippet. torch's graph compiler stays one call away: the function
    # `torch.compile(model)` wraps the module without calling this method, and
    # `nn.Module.compile(model)` compiles in place (both tested in tests/training/test_fit.py).

    def compile(self, optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None, **options) -> None:
        compile(self, optimizer, loss, metrics, **options)

    def fit(self, x, y, **options) -> History:
        return fit(self, x, y, **options)

    def evaluate(self, x, y, batch_size: int = 32) -> dict[str, float]:
        return evaluate(self, x, y, batch_size)

    def predict(self, x, batch_size: int = 32) -> torch.Tensor:
        return predict(self, x, batch_size)
