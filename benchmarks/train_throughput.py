"""Training throughput: tokens/s, ms/step and MFU, lmforge vs a nanoGPT-style peer in the same run.

Two shapes: nanoGPT's CPU recipe (4 layers, 4 heads, d=128, block 64, batch 12, 65-char vocab,
no biases) and a 6-layer d=384 block-256 model. Three implementations of each: the peer,
lmforge's GPT-2 layout (the peer's architecture, no biases) and lmforge's Llama family, each
eager and torch.compile'd. MFU uses a peak fp32 matmul rate the benchmark measures itself.
Prints a table; writes benchmarks/results/train_throughput.json.

    python benchmarks/train_throughput.py [--seconds 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers.nanogpt_style import NanoGPTStyle  # noqa: E402

from lmforge.model import ModelConfig, Transformer, preset  # noqa: E402
from lmforge.training.optim import build_optimizer  # noqa: E402
from lmforge.training.pretrain import TrainConfig, measure_matmul_flops  # noqa: E402

SHAPES = {
    "nanogpt-cpu": dict(vocab_size=65, block_size=64, n_layers=4, n_heads=4, d_model=128, batch_size=12),
    "6L-d384-T256": dict(vocab_size=65, block_size=256, n_layers=6, n_heads=6, d_model=384, batch_size=8),
}


def peer_model(shape: dict) -> NanoGPTStyle:
    return NanoGPTStyle(shape["vocab_size"], shape["block_size"], shape["n_layers"], shape["n_heads"], shape["d_model"])


def peer_step(shape: dict, compiled: bool):
    model = peer_model(shape)
    optimizer = model.configure_optimizer()
    forward = torch.compile(model) if compiled else model

    def step(inputs, targets):
        loss = forward(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.flops_per_token()


def lmforge_config(shape: dict, family: str) -> ModelConfig:
    """The shape as lmforge builds it: no biases, as nanoGPT's recipe (and Llama) has none."""
    sizes = {k: v for k, v in shape.items() if k != "batch_size"} | dict(bias=False)
    if family == "llama":
        # SwiGLU's width at equal parameters (8d/3), rounded up to a multiple of 8: never fewer FLOPs than the peer
        sizes |= dict(norm="rmsnorm", mlp="swiglu", positions="rope", d_mlp=-(-8 * shape["d_model"] // 24) * 8)
    return preset("nanogpt-cpu", **sizes)


def lmforge_step(shape: dict, compiled: bool, family: str):
    model = Transformer(lmforge_config(shape, family))
    config = TrainConfig(learning_rate=1e-3, beta2=0.99)
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay, betas=(config.beta1, config.beta2))
    forward = torch.compile(model) if compiled else model

    def step(inputs, targets):
        _, loss = forward(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.flops_per_token()


def make_batches(shape: dict, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, shape["vocab_size"], (200_000,), generator=generator)

    def batch():
        starts = torch.randint(len(data) - shape["block_size"] - 1, (shape["batch_size"],), generator=generator)
        windows = torch.stack([data[s : s + shape["block_size"] + 1] for s in starts])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    return batch


MIN_TURNS = 8  # the 6-layer shape's steps take ~1.5 s: its seconds alone would give it ~3 turns


def time_round_robin(steps: dict, shape: dict, seconds: float) -> dict[str, list[float]]:
    """Seconds per optimizer step of each candidate, taken in turns: each candidate takes two steps
    and the second is timed (the first brings its weights and optimizer state back into cache,
    where they stay in a real run).

    On a shared machine a neighbour's load comes and goes within seconds, and rounds of a few
    seconds per candidate left ratios moving by ±10%. Turns this short put every candidate under
    the same load, and a ratio of steps from the same turn cancels most of it.
    """
    batch = make_batches(shape)
    for step in steps.values():
        for _ in range(5):  # warm-up, compilation included
            step(*batch())
    timings: dict[str, list[float]] = {name: [] for name in steps}
    started, turns = time.perf_counter(), 0
    while time.perf_counter() - started < seconds or turns < MIN_TURNS:
        turns += 1
        for name, step in steps.items():
            step(*batch())
            inputs, targets = batch()
            start = time.perf_counter()
            step(inputs, targets)
            timings[name].append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per row, half of them timed")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()

    peak = measure_matmul_flops()
    print(f"peak fp32 matmul: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    modes = [False] if args.no_compile else [False, True]
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        tokens_per_step = shape["batch_size"] * shape["block_size"]
        steps, flops = {}, {}
        for compiled in modes:
            mode = "compiled" if compiled else "eager"
            builds = {
                "nanoGPT-style peer": partial(peer_step, shape, compiled),
                "lmforge gpt2 layout": partial(lmforge_step, shape, compiled, "gpt2"),
                "lmforge llama family": partial(lmforge_step, shape, compiled, "llama"),
            }
            for name, build in builds.items():
                steps[(name, mode)], flops[(name, mode)] = build()
        timings = time_round_robin(steps, shape, args.seconds * len(steps))
        peer_timings = timings[("nanoGPT-style peer", "eager")]
        for (name, mode), values in timings.items():
            seconds_per_step = statistics.median(values)
            tokens_per_second = tokens_per_step / seconds_per_step
            row = {
                "shape": shape_name,
                "implementation": name,
                "mode": mode,
                "steps_timed": len(values),
                "ms_per_step": seconds_per_step * 1e3,
                "tokens_per_second": tokens_per_second,
                "mfu": tokens_per_second * flops[(name, mode)] / peak,
                # the median over turns of (peer's step time / this step time) in the same turn
                "vs_peer_eager": statistics.median(p / v for p, v in zip(peer_timings, values)),
            }
            rows.append(row)
            print(
                f"{shape_name:<13} {name:<21} {mode:<8} {row['ms_per_step']:8.1f} ms/step "
                f"{tokens_per_second:10,.0f} tok/s  MFU {row['mfu']:6.1%}  x{row['vs_peer_eager']:.2f} vs peer",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "peak_flops": peak,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.processor(),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
