"""GPU training throughput: tokens/s and MFU against the GPU's bf16 dense peak, lmforge vs a
nanoGPT-style peer in the same run.

Two shapes: GPT-2 124M at context 1024 (nanoGPT's GPU config: 12 layers, 12 heads, d=768, vocab
50304, no biases) and a ~1.1B Llama-family model at context 2048 (TinyLlama's shape: 22 layers,
d=2048, 32 heads sharing 4 KV heads, SwiGLU 5632, vocab 32000). On each, lmforge runs the step
`lmforge train` runs (`lmforge.training.step`: bf16 autocast, fused AdamW from `optim.build_optimizer`,
clipping); the peer runs nanoGPT's GPU recipe (bf16 autocast, fused AdamW, torch.compile, SDPA's
flash kernel, clipping). Both are compiled the same way: by default each transformer block
(`--compile blocks`, PyTorch's regional compilation: the identical blocks share one compiled graph,
so compiling takes seconds, not the minutes a whole 22-layer model can take); `--compile whole`
compiles the whole model as nanoGPT does, `--compile none` runs eagerly. At 124M both run the same
network (lmforge's GPT-2 layout); at 1.1B the peer is the GPT-2 layout at the Llama model's depth and
width, so the fair comparison there is MFU, each against its own FLOPs per token (PaLM appendix B:
6N + 12·L·d·T).

MFU is against the GPU's published bf16 dense peak (`BF16_DENSE_PEAK_FLOPS`; a GPU not in the table:
a bf16 matmul peak measured here, and the row says so); the measured matmul peak is reported beside
it. Random tokens on the GPU, so input loading costs neither side anything. Prints a table; writes
benchmarks/results/gpu_train.json after each row (a run cut short keeps what it measured).

Without a CUDA device it prints "skipped: no CUDA device" and exits 0, writing nothing.

    python benchmarks/gpu_train.py [--steps 20] [--shapes gpt2-124m,llama-1b] [--compile blocks|whole|none]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers.nanogpt_style import NanoGPTStyle  # noqa: E402

from lmforge.model import Transformer, preset  # noqa: E402
from lmforge.settings import LLAMA_SWITCHES  # noqa: E402
from lmforge.training.optim import build_optimizer  # noqa: E402
from lmforge.training.pretrain import measure_matmul_flops  # noqa: E402
from lmforge.training.step import apply_gradients, autocast_for, forward_backward, next_token_forward  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu_train.json"
SKIPPED = "skipped: no CUDA device"

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s; matched against
# torch.cuda.get_device_name() in order, so the more specific names come first.
BF16_DENSE_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
}

SHAPES = {
    "gpt2-124m": dict(
        vocab_size=50304, block_size=1024, n_layers=12, n_heads=12, d_model=768, batch_size=16, family="gpt2"
    ),
    "llama-1b": dict(
        vocab_size=32000,
        block_size=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        d_model=2048,
        d_mlp=5632,
        tie_embeddings=False,
        batch_size=4,
        family="llama",
    ),
}


def published_peak(device_name: str) -> float | None:
    return next((flops for name, flops in BF16_DENSE_PEAK_FLOPS.items() if name in device_name), None)


def lmforge_model(shape: dict, family: str) -> Transformer:
    sizes = {key: value for key, value in shape.items() if key not in ("batch_size", "family")}
    if family == "gpt2":  # the peer's network: learned positions, LayerNorm, exact GELU, no biases, tied head
        sizes = {key: value for key, value in sizes.items() if key not in ("n_kv_heads", "d_mlp")}
        return Transformer(preset("nanogpt-cpu", **sizes, bias=False))
    return Transformer(preset("nanogpt-cpu", **sizes, **LLAMA_SWITCHES))


def compiled(model: torch.nn.Module, blocks: torch.nn.ModuleList, how: str) -> torch.nn.Module:
    """The model to call: compiled whole, block by block (in place), or not at all."""
    if how == "whole":
        return torch.compile(model)
    if how == "blocks":
        for block in blocks:
            torch.nn.Module.compile(block)
    return model


def lmforge_step(shape: dict, family: str, device: torch.device, compile_how: str):
    """The step `lmforge train` takes (pretrain.py): its optimizer builder, autocast and training step."""
    with device:  # built on the GPU: initialising 1B parameters on the CPU first takes longer than the run
        model = lmforge_model(shape, family)
    optimizer = build_optimizer(model, 3e-4, 0.1, betas=(0.9, 0.95))
    forward = compiled(model, model.blocks, compile_how)
    autocast = autocast_for(device)

    def step(inputs, targets):
        forward_backward(next_token_forward(forward, inputs, targets), 1, autocast)
        apply_gradients(optimizer, 1.0)

    return step, model.flops_per_token(shape["block_size"]), model.num_parameters()


def peer_step(shape: dict, device: torch.device, compile_how: str):
    """nanoGPT's train.py on a GPU: bf16 autocast, fused AdamW, torch.compile, clipping at 1.0."""
    with device:
        model = NanoGPTStyle(
            shape["vocab_size"], shape["block_size"], shape["n_layers"], shape["n_heads"], shape["d_model"]
        )
    optimizer = model.configure_optimizer(3e-4, fused=True)
    forward = compiled(model, model.h, compile_how)

    def step(inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.flops_per_token(), sum(p.numel() for p in model.parameters())


def time_steps(step, shape: dict, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per optimizer step over `steps` steps, after `warmup` (compilation happens in the first)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def batch():
        windows = torch.randint(
            shape["vocab_size"], (shape["batch_size"], shape["block_size"] + 1), device=device, generator=generator
        )
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    batches = [batch() for _ in range(4)]
    for index in range(warmup):
        step(*batches[index % len(batches)])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(steps):
        step(*batches[index % len(batches)])
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def release_memory() -> None:
    """Drop the last row's model, optimizer and compiled graphs before the next row builds its own."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation included)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--compile", choices=("blocks", "whole", "none"), default="blocks", help="see above")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"{SKIPPED}; nothing measured, nothing written")
        return 0

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # nanoGPT's setting, for both sides' fp32 matmuls
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device)
    measured_peak = measure_matmul_flops("cuda", dtype=torch.bfloat16)
    peak = published_peak(name) or measured_peak
    peak_source = "published bf16 dense" if published_peak(name) else "measured bf16 matmul (not in the table)"
    print(f"{name}: peak {peak / 1e12:.0f} TFLOP/s ({peak_source}); measured bf16 matmul {measured_peak / 1e12:.0f}")
    report = {
        "device": name,
        "peak_flops": peak,
        "peak_source": peak_source,
        "measured_bf16_matmul_flops": measured_peak,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "compile": args.compile,
        "rows": [],
    }
    header = (
        f"{'shape':<10} {'implementation':<22} {'params':>8} {'ms/step':>9} {'tok/s':>11} {'MFU':>7} {'vs peer':>8}"
    )
    print(header)
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        builds = {
            "nanoGPT-style peer": partial(peer_step, shape, device, args.compile),
            f"lmforge {shape['family']}": partial(lmforge_step, shape, shape["family"], device, args.compile),
        }
        peer_mfu = None
        for implementation, build in builds.items():
            row = {"shape": shape_name, "implementation": implementation, "batch_size": shape["batch_size"],
                   "block_size": shape["block_size"]}  # fmt: skip
            try:
                step, flops_per_token, parameters = build()
                seconds = time_steps(step, shape, device, args.warmup, args.steps)
            except torch.cuda.OutOfMemoryError:
                seconds = None  # (outside the except block, whose traceback would keep the model alive)
            if seconds is None:
                row["error"] = "out of GPU memory at this batch size"
                print(f"{shape_name:<10} {implementation:<22} out of GPU memory", flush=True)
                report["rows"].append(row)
                release_memory()
                continue
            tokens_per_second = shape["batch_size"] * shape["block_size"] / seconds
            mfu = tokens_per_second * flops_per_token / peak
            peer_mfu = mfu if implementation.startswith("nanoGPT") else peer_mfu
            row |= {
                "parameters": parameters,
                "ms_per_step": seconds * 1e3,
                "tokens_per_second": tokens_per_second,
                "flops_per_token": flops_per_token,
                "mfu": mfu,
                "mfu_of_measured_matmul_peak": tokens_per_second * flops_per_token / measured_peak,
                "mfu_vs_peer": mfu / peer_mfu if peer_mfu else None,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            }
            report["rows"].append(row)
            versus = f"x{row['mfu_vs_peer']:.2f}" if row["mfu_vs_peer"] else "-"
            print(
                f"{shape_name:<10} {implementation:<22} {parameters / 1e6:7.0f}M {seconds * 1e3:9.1f} "
                f"{tokens_per_second:11,.0f} {mfu:7.1%} {versus:>8}",
                flush=True,
            )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
            del step
            release_memory()
            torch.cuda.reset_peak_memory_stats(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
