"""Pretraining loop: AdamW, warmup + cosine schedule, accumulation, DDP or FSDP2, checkpoints, resume.

`train(config)` runs unchanged alone or under `torchrun --nproc_per_node=N`. Every rank
draws the same global batch of window starts from one seeded generator and takes its own
slice, so N processes see exactly the batch one process would.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.config import apply_values
from lmforge.errors import LmforgeError
from lmforge.evaluation.evaluate import evaluate_loss
from lmforge.formats.checkpoint import (
    CONFIG,
    STATE,
    holds_checkpoint,
    load_resume_checkpoint,
    load_sharded_training_state,
    load_weights,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmforge.model import Transformer
from lmforge.settings import TrainConfig, recorded_settings, train_config_from  # noqa: F401 (importable from here too)
from lmforge.training import distributed
from lmforge.training.data import TokenDataset
from lmforge.training.optim import build_optimizer
from lmforge.training.parallelize import describe_mesh, device_mesh, parallelize, writes_sharded_checkpoints
from lmforge.training.progress import ProgressBar, format_duration
from lmforge.training.run_folder import claim_run_folder, settings_to_record
from lmforge.training.schedule import reached_peak, warmup_cosine, warmup_steps_for, warmup_warning
from lmforge.training.step import (
    apply_gradients,
    autocast_for,
    compute_dtype,
    forward_backward,
    next_token_forward,
    to_device,
)

# What a pretraining run writes into out_dir; a folder holding any of them holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "loss_curve.png", "checkpoints")


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_learning_rate at max_steps."""
    warmup_steps = warmup_steps_for(config.max_steps, config.warmup_steps)
    return warmup_cosine(step, config.max_steps, warmup_steps, config.learning_rate, config.min_learning_rate)


def measure_matmul_flops(
    device: str = "cpu",
    sizes: tuple[int, ...] | None = None,
    trials: int = 3,
    seconds: float = 0.15,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Peak matmul FLOP/s of this device in `dtype` (at the current thread count on CPU): the best of
    short trials, since shared machines only ever make a trial slower."""
    cuda = device.startswith("cuda")
    sizes = sizes or ((4096, 8192) if cuda else (512, 1024))  # a GPU is launch-bound below ~4k
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)  # the global RNG belongs to training
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, generator=generator, dtype=dtype)
        b = torch.randn(size, size, device=device, generator=generator, dtype=dtype)
        a @ b
        for _ in range(trials):
            synchronize()  # the timer starts with nothing queued: kernels run asynchronously on a GPU
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds or count < 2:
                a @ b
                count += 1
                if cuda and count % 8 == 0:
                    synchronize()  # keep the queue short, or the last sync waits for seconds of work
            synchronize()
            best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def resolve_device(name: str) -> torch.device:
    """The device this process trains on: `auto` is CUDA where there is one, and a bare `cuda` is
    this process's own GPU under torchrun (LOCAL_RANK), so N processes on a node use N GPUs."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise LmforgeError(f"device={name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"device={name!r} but CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise LmforgeError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def rng_states(device: torch.device, data_generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random state a training step draws from: dropout (CPU or CUDA) and the batch sampler."""
    states = {"torch_rng": torch.get_rng_state(), "data_rng": data_generator.get_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, device: torch.device, data_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch_rng"])
    data_generator.set_state(states["data_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


class TrainingDiverged(LmforgeError):
    """The loss became NaN or infinite."""


class ProgressReporter:
    """The progress bar (`progress.ProgressBar`) on a terminal, plain log lines elsewhere, and metrics.jsonl always."""

    def __init__(self, config: TrainConfig, start_step: int, metrics_path: Path, enabled: bool):
        self.config, self.metrics_path, self.enabled = config, metrics_path, enabled
        mode = config.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self.bar = ProgressBar(config.max_steps, sys.stderr, initial=start_step) if self.mode == "bar" else None
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.last_step, self.last_logs = start_step, {}

    def record(self, values: dict) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(values) + "\n")

    def step(self, step: int, loss: float, lr: float, tokens_per_second: float, mfu: float) -> None:
        if self.bar is not None:
            self.last_step = step
            self.last_logs = {
                "loss": loss,
                "lr": f"{lr:.2e}",
                "tok/s": f"{tokens_per_second:,.0f}",
                "MFU": f"{mfu:.1%}",
            }
            self.bar.update(step, self.last_logs)
        elif self.mode == "plain" and (step % self.config.log_interval == 0 or step == self.config.max_steps):
            elapsed = time.perf_counter() - self.start_time
            remaining = elapsed / max(1, step - self.start_step) * (self.config.max_steps - step)
            print(
                f"step {step}/{self.config.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_second:,.0f} tok/s | MFU {mfu:.1%} | ETA {format_duration(remaining)}",
                flush=True,
            )

    def message(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.clear()
        print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.finish(self.last_logs, self.last_step)


def train(config: TrainConfig, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Run (or resume) pretraining; returns a summary with the final losses and checkpoint path.

    `on_step(step, loss)` is called after every optimizer step (tests use it to interrupt a run).
    """
    device = resolve_device(config.device)
    group = distributed.init_process_group(device.type)
    try:
        return _train(config, device, group, on_step)
    finally:
        distributed.shutdown(group)


def _train(config: TrainConfig, device: torch.device, group: distributed.ProcessGroup, on_step) -> dict:
    out_dir = Path(config.out_dir)
    train_data = TokenDataset(config.data_dir, "train")
    val_data = TokenDataset(config.data_dir, "val") if train_data.manifest["splits"]["val"]["tokens"] else None
    tokenizer = train_data.tokenizer()
    global_batch = config.batch_size * config.grad_accum_steps * group.world_size

    start_step, resumed, archived = 0, None, None
    if config.resume and config.overwrite:
        raise LmforgeError(
            "resume and overwrite contradict each other: resume continues the run in out_dir, overwrite starts "
            "a new one there; choose one"
        )
    if config.resume and holds_checkpoint(out_dir):
        resumed = load_resume_checkpoint(out_dir)
        if resumed.latest_problem and group.is_main:
            print(
                f"warning: {resumed.latest_problem}; resuming from {resumed.folder}, the newest complete checkpoint",
                file=sys.stderr,
            )
        try:
            config = apply_values(config, {"model": resumed.model})
        except LmforgeError as error:
            raise LmforgeError(f"{resumed.folder / CONFIG}: {error}") from None
        start_step = resumed.state["step"]
    elif config.resume:
        # Nothing written yet (a first launch, or an attempt that died before its first checkpoint): the
        # run starts here, so one command, --resume included, serves every attempt of an elastic job.
        if group.is_main:
            print(f"note: {out_dir} holds no checkpoint to resume from: starting the run at step 0", file=sys.stderr)
    elif group.is_main or not config.overwrite:  # other processes check, but only the main one moves files
        archived = claim_run_folder(
            out_dir, RUN_FILES, config.overwrite, "continue it with --resume, train into a new out_dir"
        )
    config = apply_values(config, {"model": {"vocab_size": tokenizer.vocab_size}})
    # Resolved once and recorded, so a resumed run with a longer max_steps keeps the warmup it had.
    config.warmup_steps = warmup_steps_for(config.max_steps, config.warmup_steps)
    if group.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)  # before the model, so an out_dir taken by a file fails at once
        warning = warmup_warning(config.warmup_steps, config.max_steps)
        if warning:
            print(warning, file=sys.stderr)

    sharded = writes_sharded_checkpoints(config)
    mesh = device_mesh(config, group, device)
    if resumed is not None and not resumed.sharded and sharded and mesh is not None:
        raise LmforgeError(
            f"{resumed.folder} was written by a parallel=ddp run (one {STATE} optimizer state), which a sharded "
            f"model cannot take; resume it with --parallel ddp, or alone"
        )
    torch.manual_seed(config.seed)  # every process builds the same model, then keeps its shard of it
    model = Transformer(config.model)
    parameter_count, flops_per_token = model.num_parameters(), model.flops_per_token()
    if resumed is not None and not resumed.sharded:
        load_weights(model, resumed.folder)
    model.to(device)
    step_model = parallelize(model, config, mesh)
    # After sharding: the optimizer's state must live on each process's shards.
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay, betas=(config.beta1, config.beta2))
    data_generator = torch.Generator().manual_seed(config.seed)
    if resumed is not None and resumed.sharded:
        load_sharded_training_state(resumed.folder, model, optimizer)
    elif resumed is not None:
        try:
            optimizer.load_state_dict(resumed.state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise LmforgeError(
                f"{resumed.folder / STATE}: the optimizer state does not fit this model ({error})"
            ) from None

    if config.compile:
        try:
            step_model = torch.compile(step_model)
        except Exception as error:  # compile support varies by platform; eager always works
            print(f"torch.compile unavailable ({error}); training eagerly", file=sys.stderr)
    autocast = autocast_for(device)
    peak_flops = config.peak_flops or measure_matmul_flops(device=str(device), dtype=compute_dtype(device))

    if group.is_main:
        (out_dir / "config.json").write_text(json.dumps(settings_to_record(config), indent=2))
    reporter = ProgressReporter(config, start_step, out_dir / "metrics.jsonl", group.is_main)
    if archived is not None:
        reporter.message(f"--overwrite: moved the previous run into {archived}")
    reporter.message(
        f"model: {parameter_count:,} parameters | {train_data.num_tokens:,} train tokens | "
        f"{global_batch * config.model.block_size:,} tokens/step | device {device}"
        + (f" | {describe_mesh(config, mesh)}" if mesh is not None else "")
        + (f" | resumed at step {start_step}" if start_step else "")
    )

    def write_checkpoint(step: int, rng: dict[str, torch.Tensor] | None = None) -> Path | None:
        state = {"step": step, **(rng or rng_states(device, data_generator))}
        if sharded:  # every process writes its shard; the RNG states are the same on all of them
            return save_sharded_checkpoint(
                out_dir, step, model, optimizer, tokenizer, state, {"train": settings_to_record(config)},
                keep=config.keep_checkpoints,
            )  # fmt: skip
        if not group.is_main:
            return None
        state["optimizer"] = optimizer.state_dict()
        return save_checkpoint(
            out_dir,
            step,
            model,
            tokenizer,
            state,
            {"train": settings_to_record(config)},
            keep=config.keep_checkpoints,
        )

    def run_eval(step: int) -> dict | None:
        if val_data is None:
            return None
        result = evaluate_loss(
            model,
            val_data,
            tokenizer.token_byte_lengths(),
            config.model.block_size,
            config.batch_size,
            config.eval_tokens,
            autocast,
        )
        record = {
            "step": step,
            "val_loss": result["loss"],
            "val_perplexity": result["perplexity"],
            "val_bits_per_byte": result.get("bits_per_byte"),
        }
        reporter.record(record)
        reporter.message(
            f"step {step}: val loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f}"
            + (f" | bpb {result['bits_per_byte']:.3f}" if "bits_per_byte" in result else "")
        )
        return result

    model.train()
    last_checkpoint = None
    loss_value = float("nan")
    val_result = None
    step = start_step
    tokens_per_second = 0.0
    in_step = updating = False
    if resumed is not None:
        # Last, right before the first step: nothing in between may draw from the restored states.
        restore_rng_states(resumed.state, device, data_generator)
    stops = distributed.StopRequests(device, sharded and group.is_distributed)
    with stops:
        try:
            while step < config.max_steps:
                step_started = time.perf_counter()
                # RNG states as the step begins: what an interrupted step's checkpoint must hold.
                step_rng = rng_states(device, data_generator)
                in_step = True
                lr = learning_rate_at(step, config)
                for group_params in optimizer.param_groups:
                    group_params["lr"] = lr
                starts = train_data.sample_starts(global_batch, config.model.block_size, data_generator)
                loss_sum = torch.zeros((), device=device)
                for micro in range(config.grad_accum_steps):
                    first = (micro * group.world_size + group.rank) * config.batch_size
                    inputs, targets = train_data.gather(
                        starts[first : first + config.batch_size], config.model.block_size
                    )
                    inputs, targets = to_device(inputs, device), to_device(targets, device)
                    with distributed.no_gradient_sync(step_model, micro < config.grad_accum_steps - 1):
                        forward = next_token_forward(step_model, inputs, targets)
                        loss, _ = forward_backward(forward, config.grad_accum_steps, autocast)
                    loss_sum += loss.float()
                loss_value = distributed.mean_across_processes(loss_sum / config.grad_accum_steps, group).item()
                if not math.isfinite(loss_value):
                    where = (
                        f"the last good checkpoint is {last_checkpoint}"
                        if last_checkpoint
                        else "no checkpoint was written"
                    )
                    raise TrainingDiverged(
                        f"loss became {loss_value} at step {step + 1}; training stopped and {where}. "
                        f"Resume with --resume and a lower learning_rate."
                    )
                updating = True  # weights and optimizer state change together: no checkpoint in between
                apply_gradients(optimizer, config.grad_clip)
                step += 1
                in_step = updating = False

                measured = global_batch * config.model.block_size / (time.perf_counter() - step_started)
                # Smoothed over ~10 steps so the bar does not flicker with scheduler noise.
                tokens_per_second = measured if not tokens_per_second else 0.9 * tokens_per_second + 0.1 * measured
                mfu = tokens_per_second * flops_per_token / (peak_flops * group.world_size)
                reporter.step(step, loss_value, lr, tokens_per_second, mfu)
                if step % config.log_interval == 0 or step == config.max_steps:
                    reporter.record(
                        {"step": step, "loss": loss_value, "lr": lr, "tokens_per_second": tokens_per_second, "mfu": mfu}
                    )
                if config.eval_interval and (step % config.eval_interval == 0 or step == config.max_steps):
                    val_result = run_eval(step)
                    last_checkpoint = write_checkpoint(step) or last_checkpoint
                elif config.checkpoint_interval and step % config.checkpoint_interval == 0:
                    last_checkpoint = write_checkpoint(step) or last_checkpoint
                if on_step is not None:
                    on_step(step, loss_value)
                if stops.any_process():  # sharded over processes, Ctrl-C takes effect here, on all of them at once
                    if last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:06d}"):
                        last_checkpoint = write_checkpoint(step) or last_checkpoint
                    reporter.message(f"interrupted: saved {last_checkpoint}; continue with --resume")
                    raise KeyboardInterrupt
            if last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:06d}"):
                last_checkpoint = write_checkpoint(step) or last_checkpoint
        except KeyboardInterrupt:
            # Ctrl-C keeps the work done: save the last completed step (unless it is saved already).
            unsaved = last_checkpoint is None or not last_checkpoint.name.endswith(f"{step:06d}")
            # Sharded over processes, the interrupt reaches here from the step's end, which saved.
            can_save = not stops.active and group.is_main
            if can_save and not updating and step > start_step and unsaved:
                reporter.message(f"interrupted: saving step {step} ...")
                saved = write_checkpoint(step, step_rng if in_step else None)
                reporter.message(f"saved {saved}; continue with --resume")
            raise
        finally:
            reporter.close()

    plot_path = None
    if group.is_main and config.plot:
        plot_path = plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
    peaked = reached_peak(step, config.warmup_steps)
    if not peaked:
        reporter.message(
            f"note: the run ended at step {step}, inside its {config.warmup_steps}-step warmup: the learning "
            f"rate never reached its peak {config.learning_rate:g}"
        )
    return {
        "step": step,
        "loss": loss_value,
        "val": val_result,
        "checkpoint": str(last_checkpoint),
        "loss_curve": str(plot_path) if plot_path else None,
        "parameters": parameter_count,
        "warmup_steps": config.warmup_steps,
        "reached_peak_learning_rate": peaked,
    }


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and validation loss against step, as a PNG."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Keyed by step: the steps a resumed run replays (lost with a crash) replace their first records.
    train_points = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    val_points = sorted({r["step"]: r["val_loss"] for r in records if "val_loss" in r}.items())
    figure, axis = plt.subplots(figsize=(7, 4))
    if train_points:
        axis.plot(*zip(*train_points), label="train", linewidth=1)
    if val_points:
        axis.plot(*zip(*val_points), label="validation", marker="o")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return png_path
