"""CPU inference of SmolLM2-135M-Instruct: lmforge (fp32, int8, int4, the GGUF's own Q4_1; native
decode kernels or torch.compile; fp32 with speculative decoding, the Q4_1 weights drafting) vs HF
transformers (fp32, same weights) and llama-cpp-python (same GGUF) in the same run.

Each engine runs in its own process (clean load time and peak RSS): load time, prefill tok/s of
a 512-token prompt, milliseconds to prefill an 8-token tail after 256 cached tokens (a chat turn after a
prefix-cache hit), decode tok/s of 128 greedy tokens after a chat prompt, peak RSS. Rounds are
interleaved and the best of each metric kept, since this machine is shared and noisy. Prints a
table and the ratios the inference issue sets targets for; writes benchmarks/results/inference.json.

A second table runs llama.cpp's K-quant files (made here by llama-cpp-python's `llama_model_quantize`
from lmforge's f32 export of SmolLM2: Q4_K_M and Q6_K) in lmforge and in llama.cpp, same file, same
threads; with --qwen3, also a Qwen3-architecture model of 0.6B random weights in Q4_K_M (speed only).

A third table decodes the same GGUF while 0, 1 and 2 other processes keep a core busy each (a
numpy matmul loop, started and stopped here): lmforge choosing its threads per step (the
default), lmforge fixed at --threads (what it did before), and llama.cpp at --threads and at one
thread; the median of the rounds, since the point is what a user sees on a busy machine.

    python benchmarks/inference.py [--rounds 2] [--skip-hf] [--threads 2] [--load-only] [--kquants-only] [--qwen3]

With --device cuda, the same SmolLM2 weights on one GPU instead, in bf16: lmforge (eager, and with its
compiled decode step) vs transformers, prefill of 512 tokens and decode of 128 greedy tokens, best of
the rounds; writes benchmarks/results/inference_cuda.json. Without a CUDA device it prints
"skipped: no CUDA device" and exits 0, writing nothing.

llama-cpp-python is optional; it compiles llama.cpp from source (~15-20 min on 2 cores):
    pip install llama-cpp-python==0.3.36
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "inference.json"
CUDA_RESULTS = Path(__file__).parent / "results" / "inference_cuda.json"
SKIPPED = "skipped: no CUDA device"
NEW_TOKENS, PREFILL_TOKENS = 128, 512
# A chat turn's tail after a cached prefix (what a server with prefix caching prefills): milliseconds
# to prefill TAIL_TOKENS tokens after TAIL_PREFIX cached ones, the median of TAIL_REPEATS
TAIL_PREFIX, TAIL_TOKENS, TAIL_REPEATS = 256, 8, 5
COMPETING_PROCESSES = (0, 1, 2)
BUSY_LOOP = "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = (a @ a) / 256.0\n"
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
# The same conversation through SmolLM2's chat template, for the llama.cpp worker (which imports no lmforge)
CHAT_TEXT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    f"<|im_start|>user\n{CHAT[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
)
FILLER = (
    "The history of the Roman Empire is long and complicated. It began when Augustus became the first emperor, "
    "and in the west it lasted for five centuries, shaping law, language and roads across Europe. "
)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage: Linux carries ru_maxrss over exec, so a
    worker would inherit its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lmforge_worker(variant: str, checkpoint: str | None) -> dict:
    import torch

    from lmforge.formats.loading import load
    from lmforge.inference.chat import encode_chat
    from lmforge.inference.engine import next_token_logits
    from lmforge.inference.generate import SamplingConfig, generate_tokens
    from lmforge.inference.speculative import SpeculationStats, speculative_generate
    from lmforge.model import KVCache

    start = time.perf_counter()
    draft = None
    if variant in ("fp32", "fp32-compiled", "fp32-speculative"):
        model, tokenizer = load("smollm2-135m-instruct", keep_quantized=False)
        if variant == "fp32-speculative":  # the GGUF's own Q4_1 weights as the draft
            draft = load("smollm2-135m-instruct")[0]
    elif variant.startswith("gguf-q4_1"):
        model, tokenizer = load("smollm2-135m-instruct")
    else:
        model, tokenizer = load(checkpoint)
    load_seconds = time.perf_counter() - start

    if variant.endswith("fixed"):  # every step on all threads: lmforge's decoding before it chose them
        from lmforge.inference.engine import set_decode_threads

        set_decode_threads(torch.get_num_threads())
    if variant.endswith("compiled"):  # prefill through a compiled forward too
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    prefill_ids = tokenizer.encode(FILLER * 40)[:PREFILL_TOKENS]
    with torch.inference_mode():
        for _ in range(2):  # the first call of a compiled model compiles it
            cache = KVCache(model.config, 1, PREFILL_TOKENS)
            start = time.perf_counter()
            next_token_logits(model, torch.tensor([prefill_ids]), cache)
            prefill_seconds = time.perf_counter() - start
            del cache  # one cache at a time, as in serving (the peak RSS would count two)
        cache = KVCache(model.config, 1, PREFILL_TOKENS)
        next_token_logits(model, torch.tensor([prefill_ids[:TAIL_PREFIX]]), cache)
        tail = torch.tensor([prefill_ids[TAIL_PREFIX : TAIL_PREFIX + TAIL_TOKENS]])
        tail_seconds = []
        for _ in range(TAIL_REPEATS):
            cache.length = TAIL_PREFIX
            start = time.perf_counter()
            next_token_logits(model, tail, cache)
            tail_seconds.append(time.perf_counter() - start)
        del cache
    chat_ids = encode_chat(tokenizer, CHAT)
    compiled = variant.endswith("compiled")
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0)
    if compiled:  # the first generation compiles the decode step; time the second
        list(generate_tokens(model, chat_ids, SamplingConfig(max_new_tokens=4, temperature=0), compile=True))
    stats = SpeculationStats()
    if draft is None:
        tokens = generate_tokens(model, chat_ids, sampling, compile=compiled)
    else:
        tokens = speculative_generate(model, draft, chat_ids, NEW_TOKENS, draft_tokens=4, stats=stats)
    next(tokens)  # prefill + first token
    start = time.perf_counter()
    rest = list(tokens)
    decode_seconds = time.perf_counter() - start
    result = {
        "load_s": load_seconds,
        "prefill_tok_s": PREFILL_TOKENS / prefill_seconds,
        "tail_ms": 1000 * statistics.median(tail_seconds),
        "decode_tok_s": len(rest) / decode_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    if draft is not None:  # speculation must not change the text: the same tokens as plain fp32 greedy
        plain = list(generate_tokens(model, chat_ids, sampling))
        assert plain[1:] == rest, "speculative decoding changed the greedy output"
        result["acceptance_rate"] = stats.acceptance_rate
    return result


def transformers_worker() -> dict:
    import torch
    import transformers

    from lmforge.formats.loading import builtin_model_path

    path = builtin_model_path("smollm2-135m-instruct")
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    load_seconds = time.perf_counter() - start
    prefill_ids = torch.tensor([tokenizer.encode(FILLER * 40, add_special_tokens=False)[:PREFILL_TOKENS]])
    with torch.inference_mode():
        for _ in range(2):
            start = time.perf_counter()
            model(prefill_ids)
            prefill_seconds = time.perf_counter() - start
        chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        chat_ids = torch.tensor([tokenizer.encode(chat_text, add_special_tokens=False)])
        start = time.perf_counter()
        model.generate(chat_ids, max_new_tokens=1, do_sample=False)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        total_seconds = time.perf_counter() - start
    generated = out.shape[1] - chat_ids.shape[1]
    return {
        "load_s": load_seconds,
        "prefill_tok_s": PREFILL_TOKENS / prefill_seconds,
        "decode_tok_s": (generated - 1) / (total_seconds - first_seconds),
        "peak_rss_mb": peak_rss_mb(),
    }


def llama_cpp_worker(gguf_path: str, threads: int) -> dict:
    """No torch or lmforge import here, so the peak RSS is llama.cpp's (plus Python's ~10 MB)."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=1024, n_batch=PREFILL_TOKENS, n_threads=threads, verbose=False)
    load_seconds = time.perf_counter() - start
    prefill_ids = llm.tokenize((FILLER * 40).encode(), add_bos=False)[:PREFILL_TOKENS]
    for _ in range(2):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prefill_ids)
        prefill_seconds = time.perf_counter() - start
    llm.reset()
    llm.eval(prefill_ids[:TAIL_PREFIX])
    tail_seconds = []
    for _ in range(TAIL_REPEATS):
        llm.n_tokens = TAIL_PREFIX  # eval drops the cache's entries from here on
        start = time.perf_counter()
        llm.eval(prefill_ids[TAIL_PREFIX : TAIL_PREFIX + TAIL_TOKENS])
        tail_seconds.append(time.perf_counter() - start)
    chat_ids = llm.tokenize(CHAT_TEXT.encode(), add_bos=False, special=True)
    generated = 0
    for _ in llm.generate(chat_ids, temp=0.0, top_k=1, reset=True):
        if generated == 0:
            start = time.perf_counter()
        generated += 1
        if generated == NEW_TOKENS:
            break
    decode_seconds = time.perf_counter() - start
    return {
        "load_s": load_seconds,
        "prefill_tok_s": PREFILL_TOKENS / prefill_seconds,
        "tail_ms": 1000 * statistics.median(tail_seconds),
        "decode_tok_s": (generated - 1) / decode_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(engine: str, checkpoint: str | None, threads: int) -> dict | None:
    command = [sys.executable, __file__, "--worker", engine, "--threads", str(threads)]
    if checkpoint:
        command += ["--checkpoint", checkpoint]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        print(f"  {engine}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def busy_processes(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy until killed; single-threaded BLAS in each."""
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], env=environment) for _ in range(count)]


def decode_under_load(threads: int, rounds: int, gguf_path: str, with_llama_cpp: bool) -> dict:
    """Median decode tok/s per engine and number of competing busy processes."""
    engines = [("lmforge (threads chosen)", "lmforge-gguf-q4_1", threads),
               (f"lmforge (fixed {threads})", "lmforge-gguf-q4_1-fixed", threads)]  # fmt: skip
    if with_llama_cpp:
        engines += [(f"llama.cpp ({threads} threads)", "llama.cpp", threads), ("llama.cpp (1 thread)", "llama.cpp", 1)]
    measured: dict[str, dict[int, list[float]]] = {label: {n: [] for n in COMPETING_PROCESSES} for label, *_ in engines}
    for round_index in range(rounds):
        for competitors in COMPETING_PROCESSES:
            busy = busy_processes(competitors)
            try:
                time.sleep(1.0)  # let the competitors start before timing
                for label, worker, worker_threads in engines:
                    print(f"under load, round {round_index + 1}/{rounds}: {competitors} busy, {label}", flush=True)
                    checkpoint = gguf_path if worker == "llama.cpp" else None
                    result = run_worker(worker, checkpoint, worker_threads)
                    if result is not None:
                        measured[label][competitors].append(result["decode_tok_s"])
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
    return {
        label: {str(n): statistics.median(values) for n, values in per_load.items() if values}
        for label, per_load in measured.items()
    }


def print_under_load(table: dict, threads: int) -> dict:
    """The decode-under-load table and its ratios (lmforge vs the best llama.cpp row; loaded vs idle)."""
    print(f"\nDecode tok/s (median) with competing busy processes, SmolLM2 Q4_1 GGUF, --threads {threads}")
    print(f"{'engine':<26}" + "".join(f"{f'{n} busy':>10}" for n in COMPETING_PROCESSES))
    for label, per_load in table.items():
        print(f"{label:<26}" + "".join(f"{per_load.get(str(n), float('nan')):>10.1f}" for n in COMPETING_PROCESSES))
    ratios = {}
    ours = table["lmforge (threads chosen)"]
    peers = [row for label, row in table.items() if label.startswith("llama.cpp")]
    for n in map(str, COMPETING_PROCESSES):
        best_peer = max((row[n] for row in peers if n in row), default=None)
        if best_peer and n in ours:
            ratios[f"decode_{n}_busy_vs_best_llama_cpp"] = ours[n] / best_peer
    if "0" in ours and "1" in ours:
        ratios["decode_1_busy_vs_own_idle"] = ours["1"] / ours["0"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="leave out HF transformers (slow to load)")
    parser.add_argument("--load-only", action="store_true", help="only the decode-under-load table")
    parser.add_argument("--kquants-only", action="store_true", help="only the table of llama.cpp's K-quant files")
    parser.add_argument("--qwen3", action="store_true", help="add a random Qwen3 0.6B Q4_K_M to the K-quant table")
    parser.add_argument("--device", default="cpu", help="cpu (the tables above) or cuda / cuda:N (one GPU, bf16)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "llama.cpp":
        print(json.dumps(llama_cpp_worker(args.checkpoint, args.threads)))
        return

    import torch

    if args.device != "cpu":
        if not torch.cuda.is_available():
            print(f"{SKIPPED}; nothing measured, nothing written")
            return
        compare_on_gpu(torch.device(args.device), args.rounds)
        return
    torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker == "transformers":
            result = transformers_worker()
        else:
            result = lmforge_worker(args.worker.removeprefix("lmforge-"), args.checkpoint)
        print(json.dumps(result))
        return

    from lmforge.formats.loading import builtin_model_path, load
    from lmforge.inference.chat import render_chat

    tokenizer = load("smollm2-135m-instruct")[1]
    assert render_chat(CHAT, tokenizer.chat_template) == CHAT_TEXT, "CHAT_TEXT no longer matches the template"
    try:
        import llama_cpp  # noqa: F401

        with_llama_cpp = True
    except ImportError:
        with_llama_cpp = False
        print("llama-cpp-python is not installed: its rows are left out (see this file's docstring)")
    load_at_start = Path("/proc/loadavg").read_text().split()[:3]  # beside every number: the machine is shared
    partial = args.load_only or args.kquants_only
    report = json.loads(RESULTS.read_text()) if partial and RESULTS.exists() else {}
    if not partial:
        report.update(compare_engines(args, with_llama_cpp))
    if with_llama_cpp and not args.load_only:  # the files are made by llama.cpp's quantiser
        report["kquants"] = compare_gguf_files(args)
    if not args.kquants_only:
        gguf_path = str(builtin_model_path("smollm2-135m-instruct"))
        under_load = decode_under_load(args.threads, args.rounds, gguf_path, with_llama_cpp)
        report["under_load"] = {"competing_processes": list(COMPETING_PROCESSES), "decode_tok_s": under_load}
        report["under_load"]["ratios"] = print_under_load(under_load, args.threads)
    report["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "load_average_start_end": [load_at_start, Path("/proc/loadavg").read_text().split()[:3]],
    }
    report["torch"] = torch.__version__
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {RESULTS}")


def time_on_gpu(run) -> float:
    """Seconds `run()` takes on the GPU: from an empty queue to the end of its work."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def lmforge_on_gpu(device, compiled: bool) -> dict:
    """lmforge's prefill and greedy decode of SmolLM2 in bf16 on `device`; the token ids it generated."""
    import torch

    from lmforge.formats.loading import load
    from lmforge.inference.chat import encode_chat
    from lmforge.inference.engine import next_token_logits
    from lmforge.inference.generate import SamplingConfig, generate_tokens
    from lmforge.model import KVCache

    model, tokenizer = load("smollm2-135m-instruct", keep_quantized=False)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    prefill = torch.tensor([tokenizer.encode(FILLER * 40)[:PREFILL_TOKENS]], device=device)

    def prefill_once():
        cache = KVCache(model.config, 1, PREFILL_TOKENS, device=device, dtype=torch.bfloat16)
        next_token_logits(model, prefill, cache)

    with torch.inference_mode():
        prefill_once()  # CUDA context, kernels' first launches
        prefill_seconds = min(time_on_gpu(prefill_once) for _ in range(3))
    chat_ids = encode_chat(tokenizer, CHAT)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0)
    if compiled:  # the first generation compiles the decode step
        list(generate_tokens(model, chat_ids, SamplingConfig(max_new_tokens=4, temperature=0), compile=True))
    tokens = generate_tokens(model, chat_ids, sampling, compile=compiled)
    generated = [next(tokens)]  # prefill + first token; each further token is read back, so each step is synced
    start = time.perf_counter()
    generated += list(tokens)
    decode_seconds = time.perf_counter() - start
    return {
        "prefill_tok_s": PREFILL_TOKENS / prefill_seconds,
        "decode_tok_s": (len(generated) - 1) / decode_seconds,
        "tokens": generated,
    }


def transformers_on_gpu(device, folder: Path) -> dict:
    """transformers' prefill and greedy decode of the same weights in bf16 on `device`, from the HF
    folder lmforge exported them to (dense weights: transformers keeps a GGUF's quantised blocks)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prefill = torch.tensor([tokenizer.encode(FILLER * 40, add_special_tokens=False)[:PREFILL_TOKENS]], device=device)
    with torch.inference_mode():
        model(prefill)
        prefill_seconds = min(time_on_gpu(lambda: model(prefill)) for _ in range(3))
        chat_text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        chat_ids = torch.tensor([tokenizer.encode(chat_text, add_special_tokens=False)], device=device)
        first_seconds = time_on_gpu(lambda: model.generate(chat_ids, max_new_tokens=1, do_sample=False))
        out = []
        total_seconds = time_on_gpu(
            lambda: out.append(
                model.generate(chat_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            )
        )
    generated = out[0][0, chat_ids.shape[1] :].tolist()
    return {
        "prefill_tok_s": PREFILL_TOKENS / prefill_seconds,
        "decode_tok_s": (len(generated) - 1) / (total_seconds - first_seconds),
        "tokens": generated,
    }


def compare_on_gpu(device, rounds: int) -> dict:
    """SmolLM2 on one GPU in bf16, lmforge vs transformers, best of `rounds`; writes CUDA_RESULTS."""
    import torch

    from lmforge.formats.hf import save_hf
    from lmforge.formats.loading import load

    results: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "smollm2-hf"
        save_hf(*load("smollm2-135m-instruct", keep_quantized=False), folder)  # the fp32 weights lmforge runs
        engines = {
            "lmforge bf16": lambda: lmforge_on_gpu(device, compiled=False),
            "lmforge bf16, compiled decode": lambda: lmforge_on_gpu(device, compiled=True),
            "transformers bf16": lambda: transformers_on_gpu(device, folder),
        }
        if importlib.util.find_spec("transformers") is None:
            print("transformers is not installed: its row (the peer) is left out")
            del engines["transformers bf16"]
        for round_index in range(rounds):
            for engine, run in engines.items():
                print(f"round {round_index + 1}/{rounds}: {engine}", flush=True)
                measured = run()
                tokens[engine] = measured.pop("tokens")
                keep_best(results.setdefault(engine, {}), measured)
    name = torch.cuda.get_device_name(device)
    print(f"\nSmolLM2-135M-Instruct on {name}, bf16, best of {rounds} rounds")
    print(f"{'engine':<32}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for engine, row in results.items():
        print(f"{engine:<32}{row['prefill_tok_s']:>15.0f}{row['decode_tok_s']:>14.1f}")
    ratios, same = {}, None
    if "transformers bf16" in results:
        reference = results["transformers bf16"]
        ratios = {
            f"{engine} {metric.removesuffix('_tok_s')} vs transformers": row[metric] / reference[metric]
            for engine, row in results.items()
            if engine.startswith("lmforge")
            for metric in ("prefill_tok_s", "decode_tok_s")
        }
        for label, value in ratios.items():
            print(f"{label}: {value:.2f}x")
        # bf16 rounds differently in each implementation, so greedy paths may part after a near-tie
        ours, theirs = tokens["lmforge bf16"], tokens["transformers bf16"]
        pairs = enumerate(zip(ours, theirs))
        same = next((index for index, (mine, peer) in pairs if mine != peer), min(len(ours), len(theirs)))
        print(f"greedy tokens equal to transformers' before the first difference: {same}/{NEW_TOKENS}")
    report = {
        "device": name,
        "dtype": "bfloat16",
        "torch": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "prefill_tokens": PREFILL_TOKENS,
        "rounds": rounds,
        "results": results,
        "ratios": ratios,
        "greedy_tokens_before_first_difference": same,
    }
    CUDA_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    CUDA_RESULTS.write_text(json.dumps(report, indent=2))
    print(f"wrote {CUDA_RESULTS}")
    return report


def keep_best(best: dict, measured: dict) -> None:
    """Merge one round into the best so far: highest tok/s, lowest seconds and memory."""
    for key, value in measured.items():
        if not isinstance(value, float):
            best[key] = value
        elif key.endswith("tok_s"):
            best[key] = max(best.get(key, 0.0), value)
        else:
            best[key] = min(best.get(key, float("inf")), value)


def compare_engines(args: argparse.Namespace, with_llama_cpp: bool) -> dict:
    """The main table: every lmforge variant, transformers and llama.cpp, best of the rounds."""
    from lmforge.evaluation.quantization import quantize_and_save
    from lmforge.formats.loading import builtin_model_path

    engines = [
        "lmforge-fp32", "lmforge-fp32-speculative", "lmforge-fp32-compiled", "lmforge-int8", "lmforge-int4",
        "lmforge-gguf-q4_1", "lmforge-gguf-q4_1-compiled",
    ]  # fmt: skip
    if not args.skip_hf:
        engines.append("transformers")
    if with_llama_cpp:
        engines.append("llama.cpp")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = {"llama.cpp": str(builtin_model_path("smollm2-135m-instruct"))}
        for bits in (8, 4):
            print(f"quantising to int{bits} ...", flush=True)
            checkpoints[f"lmforge-int{bits}"] = str(Path(scratch) / f"int{bits}")
            quality = quantize_and_save("smollm2-135m-instruct", checkpoints[f"lmforge-int{bits}"], bits)
            results.setdefault(f"lmforge-int{bits}", {})["quality"] = quality
        for round_index in range(args.rounds):
            for engine in engines:
                print(f"round {round_index + 1}/{args.rounds}: {engine}", flush=True)
                measured = run_worker(engine, checkpoints.get(engine), args.threads)
                if measured is None:
                    continue
                keep_best(results.setdefault(engine, {}), measured)

    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, best of {args.rounds} rounds")
    print(f"{'engine':<24}{'load s':>8}{'prefill tok/s':>15}{'tail ms':>9}{'decode tok/s':>14}{'peak RSS MB':>13}")
    for engine, row in results.items():
        if "decode_tok_s" in row:
            print(
                f"{engine:<24}{row['load_s']:>8.2f}{row['prefill_tok_s']:>15.1f}{row.get('tail_ms', math.nan):>9.1f}"
                f"{row['decode_tok_s']:>14.1f}{row['peak_rss_mb']:>13.0f}"
            )
    ratios = {}
    hf, llama = results.get("transformers", {}), results.get("llama.cpp", {})
    if "decode_tok_s" in hf:
        ratios["fp32_decode_vs_transformers"] = results["lmforge-fp32"]["decode_tok_s"] / hf["decode_tok_s"]
        if "decode_tok_s" in results.get("lmforge-fp32-speculative", {}):
            speculative = results["lmforge-fp32-speculative"]["decode_tok_s"]
            ratios["fp32_speculative_decode_vs_transformers"] = speculative / hf["decode_tok_s"]
    if "decode_tok_s" in llama:
        for engine in ("lmforge-int4", "lmforge-gguf-q4_1"):
            ratios[f"{engine}_decode_vs_llama_cpp"] = results[engine]["decode_tok_s"] / llama["decode_tok_s"]
        best_prefill = max(
            results[e]["prefill_tok_s"] for e in results if e.startswith("lmforge") and "prefill_tok_s" in results[e]
        )
        ratios["best_lmforge_prefill_vs_llama_cpp"] = best_prefill / llama["prefill_tok_s"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    for bits in (8, 4):
        quality = results[f"lmforge-int{bits}"]["quality"]
        print(
            f"int{bits} quality: perplexity {quality['perplexity_reference']:.3f} -> "
            f"{quality['perplexity_quantized']:.3f}, mean KL {quality['mean_kl']:.5f}"
        )
    return {
        "new_tokens": NEW_TOKENS,
        "prefill_tokens": PREFILL_TOKENS,
        "rounds": args.rounds,
        "results": results,
        "ratios": ratios,
    }


def quantize_with_llama_cpp(source: Path, target: Path, file_type: str) -> Path:
    """llama.cpp's own quantiser (`llama-quantize`) on a GGUF, e.g. file_type "Q4_K_M"."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")
    return target


# Qwen3-0.6B's shape (its vocabulary too; the tokens are SmolLM2's, padded): 0.6B parameters.
QWEN3_SHAPE = dict(
    vocab_size=151936, block_size=4096, n_layers=28, n_heads=16, n_kv_heads=8, d_model=1024, d_head=128,
    d_mlp=3072, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", positions="rope", rope_theta=1e6, bias=False,
    qk_norm=True, tie_embeddings=True, architecture="qwen3",
)  # fmt: skip


def qwen3_random_gguf(folder: Path) -> Path | str:
    """A random-weight Qwen3 of QWEN3_SHAPE as llama.cpp's Q4_K_M, or why it could not be made."""
    import torch

    from lmforge.errors import LmforgeError
    from lmforge.formats.gguf import save_gguf
    from lmforge.formats.loading import load
    from lmforge.model import ModelConfig, Transformer

    try:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**QWEN3_SHAPE)).eval()
        tokenizer = load("smollm2-135m-instruct")[1]
        source = save_gguf(model, tokenizer, folder / "qwen3-0.6b-random-f16.gguf", "f16")
    except (LmforgeError, ValueError, TypeError, KeyError) as error:
        return f"{type(error).__name__}: {error}"
    del model
    return quantize_with_llama_cpp(source, folder / "qwen3-0.6b-random-Q4_K_M.gguf", "Q4_K_M")


def compare_gguf_files(args: argparse.Namespace) -> dict:
    """lmforge and llama.cpp on the same K-quant files, best of the rounds: decode, prefill, load."""
    from lmforge.formats.gguf import save_gguf
    from lmforge.formats.loading import load

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        print("exporting SmolLM2 as f32 GGUF and quantising it with llama.cpp ...", flush=True)
        model, tokenizer = load("smollm2-135m-instruct", keep_quantized=False)
        source = save_gguf(model, tokenizer, folder / "smollm2-f32.gguf", "f32")
        del model
        files = {
            f"SmolLM2 {name}": quantize_with_llama_cpp(source, folder / f"smollm2-{name}.gguf", name)
            for name in ("Q4_K_M", "Q6_K")
        }
        if args.qwen3:
            print("building a random Qwen3 0.6B and quantising it to Q4_K_M ...", flush=True)
            made = qwen3_random_gguf(folder)
            if isinstance(made, Path):
                files["Qwen3-0.6B random Q4_K_M"] = made
            else:
                print(f"  Qwen3 row left out: {made}")
        for round_index in range(args.rounds):
            for label, path in files.items():
                for engine, worker in (("lmforge", "lmforge-gguf-file"), ("llama.cpp", "llama.cpp")):
                    print(f"round {round_index + 1}/{args.rounds}: {label}, {engine}", flush=True)
                    measured = run_worker(worker, str(path), args.threads)
                    if measured is not None:
                        keep_best(results.setdefault(f"{label} | {engine}", {}), measured)
        sizes_mb = {label: path.stat().st_size / 2**20 for label, path in files.items()}

    print(f"\nllama.cpp's K-quant files, {args.threads} threads, best of {args.rounds} rounds")
    header = f"{'load s':>8}{'prefill tok/s':>15}{'tail ms':>9}{'decode tok/s':>14}{'peak RSS MB':>13}"
    print(f"{'file | engine':<40}{header}")
    for engine, row in results.items():
        print(
            f"{engine:<40}{row['load_s']:>8.2f}{row['prefill_tok_s']:>15.1f}{row.get('tail_ms', math.nan):>9.1f}"
            f"{row['decode_tok_s']:>14.1f}{row['peak_rss_mb']:>13.0f}"
        )
    ratios = {}
    for label in sizes_mb:
        ours, theirs = results.get(f"{label} | lmforge"), results.get(f"{label} | llama.cpp")
        if ours and theirs:
            for metric in ("decode_tok_s", "prefill_tok_s"):
                ratios[f"{label} {metric.removesuffix('_tok_s')} vs llama.cpp"] = ours[metric] / theirs[metric]
            if "tail_ms" in ours and "tail_ms" in theirs:  # as a speed: llama.cpp's time over ours
                ratios[f"{label} tail vs llama.cpp"] = theirs["tail_ms"] / ours["tail_ms"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    return {"results": results, "ratios": ratios, "file_mb": sizes_mb}


if __name__ == "__main__":
    main()
