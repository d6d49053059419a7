"""Serving throughput and latency: the same streaming clients against `lmforge serve` and its peers.

Peers, on the same machine and the same GGUF file (SmolLM2-135M-Instruct's shipped Q4_1 by default):
llama.cpp's own `llama-server` with 16 parallel slots and continuous batching (`-np 16 -cb`, built
from the llama.cpp source in llama-cpp-python's sdist and cached: benchmarks/peers/llama_cpp_servers.py),
and llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, its [server] extra; it serves one
request at a time). A peer that is not available is skipped with a message.

Each server runs alone: started on a free loopback port, warmed up with one request, then for each
concurrency level (1, 4, 16) that many clients at once each stream --requests chat completions of
--max-tokens tokens, one after another. Reported per level: aggregate completion tokens/s, time to
first token (p50/p95) and inter-token latency (p50/p95). Then the prefix-cache check: TTFT of a
request with a ~1,500-token system prompt, the first time and again with another question.

Before any server starts, the same chat prompts run in process through `generate` (what `lmforge
generate` calls) on the same model: the single-stream cost of the API is tokens/s through the
server with one client against that. Writes benchmarks/results/serve.json (serve_fp32.json with --fp32).

    python benchmarks/serve.py [--servers lmforge llama-server llama_cpp.server] [--levels 1 4 16]
                               [--max-tokens 128] [--requests 2] [--fp32] [--no-build]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from peers.llama_cpp_servers import LLAMA_SERVER, build_llama_server, llama_cpp_server_missing  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
TOPICS = [
    "the sea",
    "a mountain",
    "a city at night",
    "an old library",
    "a thunderstorm",
    "a garden",
    "a train",
    "winter",
]
SERVERS = ("lmforge", "llama-server", "llama_cpp.server")
# ~1,500 SmolLM2 tokens of instructions, as an application's long system prompt would be
SYSTEM_PROMPT = " ".join(
    f"Rule {number}: when the user asks about topic number {number}, answer politely, cite the relevant "
    f"section of the handbook, and keep the reply under {number + 20} words."
    for number in range(1, 46)
)
CORES = len(os.sched_getaffinity(0))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(value for value in values if value == value)  # NaN: a stream that sent no text
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def chat_body(messages: list[dict], max_tokens: int, seed: int) -> bytes:
    return json.dumps(
        {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


def poem(index: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short poem about {TOPICS[index % len(TOPICS)]}."}]


def stream_one(port: int, messages: list[dict], max_tokens: int, seed: int) -> dict:
    """One streamed chat completion: when each content chunk arrived, and the completion tokens (the
    usage chunk's count; a server that sends none streams one token per chunk)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request(
        "POST", "/v1/chat/completions", body=chat_body(messages, max_tokens, seed),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    arrivals, completion_tokens = [], None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            completion_tokens = chunk["usage"]["completion_tokens"]
        if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or []):
            arrivals.append(time.perf_counter())
    connection.close()
    end = arrivals[-1] if arrivals else time.perf_counter()
    return {
        "time_to_first_token_s": arrivals[0] - start if arrivals else float("nan"),
        "inter_token_s": [later - earlier for earlier, later in zip(arrivals, arrivals[1:])],
        "completion_tokens": completion_tokens if completion_tokens is not None else len(arrivals),
        "seconds": end - start,
    }


def run_level(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` at once, each streaming `requests` completions one after another."""
    results: list[list[dict]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        for turn in range(requests):
            number = index + turn * clients
            results[index].append(stream_one(port, poem(number), max_tokens, seed=number))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = [result for per_client in results for result in per_client]
    tokens = sum(result["completion_tokens"] for result in done)
    first = [result["time_to_first_token_s"] for result in done]
    gaps = [gap for result in done for gap in result["inter_token_s"]]
    return {
        "clients": clients,
        "requests": len(done),
        "requests_without_text": sum(1 for result in done if math.isnan(result["time_to_first_token_s"])),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        # one stream's own rate (request to last token), the number to hold against in-process generation
        "stream_tokens_per_s": sum(r["completion_tokens"] for r in done) / sum(r["seconds"] for r in done),
        "ttft_p50_s": percentile(first, 0.5),
        "ttft_p95_s": percentile(first, 0.95),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p95_s": percentile(gaps, 0.95),
    }


def shared_prefix_ttft(port: int) -> dict:
    """TTFT of a request with SYSTEM_PROMPT, the first time and again with another question."""
    times = []
    for question in ("Which rule covers topic 7?", "Which rule covers topic 31?"):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        times.append(stream_one(port, messages, 8, seed=0)["time_to_first_token_s"])
    return {"first_ttft_s": times[0], "second_ttft_s": times[1]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(name: str, gguf: str, port: int, slots: int, fp32: bool, threads: int) -> list[str] | str:
    """The command line that starts `name` on `port`, or why it cannot run here."""
    if name == "lmforge":
        return [sys.executable, "-m", "lmforge", "serve", "--model", gguf, "--port", str(port),
                "--max-batch", str(slots), "--embedding-model", "none",
                "--keep-quantized", "false" if fp32 else "true"]  # fmt: skip
    if name == "llama-server":
        if not LLAMA_SERVER.exists():
            return f"no llama-server binary at {LLAMA_SERVER} (build: python benchmarks/peers/llama_cpp_servers.py)"
        # -c is shared by the slots: 2,048 positions each, lmforge's --max-context default
        return [str(LLAMA_SERVER), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                "-cb", "-c", str(2048 * slots), "-t", str(threads), "-tb", str(threads), "--no-webui"]  # fmt: skip
    missing = llama_cpp_server_missing()
    if missing:
        return missing
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--interrupt_requests", "False"]  # fmt: skip  # by default a new request cuts off the one streaming


def wait_until_ready(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        for path in ("/health", "/v1/models"):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"did not start; its log:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def measure_server(name: str, command: list[str], port: int, args) -> dict:
    log = RESULTS_DIR / f"serve_{name}.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(port, server, log)
        stream_one(port, poem(0), 4, seed=0)  # warm-up
        levels = []
        for clients in args.levels:
            print(f"  {clients} concurrent client(s) ...", flush=True)
            levels.append(run_level(port, clients, args.requests, args.max_tokens))
        return {"levels": levels, "shared_prefix": shared_prefix_ttft(port)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.unlink(missing_ok=True)


def in_process_generation(gguf: str, max_tokens: int, requests: int, fp32: bool) -> dict:
    """The poems of one client, generated in this process by `generate` (as `lmforge generate` runs)."""
    from lmforge.formats.loading import load
    from lmforge.inference.chat import encode_chat, stop_token_ids
    from lmforge.inference.generate import SamplingConfig, TextStream, generate_tokens

    model, tokenizer = load(gguf, keep_quantized=not fp32)
    stops = set(stop_token_ids(tokenizer))

    def timed(number: int) -> tuple[int, float]:
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=number)
        prompt = encode_chat(tokenizer, poem(number))
        stream, count = TextStream(tokenizer), 0
        start = time.perf_counter()
        for token in generate_tokens(model, prompt, sampling):  # `generate`'s loop, counting tokens, not pieces
            if token in stops:
                break
            stream.push(token)
            count += 1
        return count, time.perf_counter() - start

    timed(0)  # warm-up, as each server gets
    runs = [timed(number) for number in range(requests)]
    return {"tokens_per_s": sum(count for count, _ in runs) / sum(seconds for _, seconds in runs)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: the shipped SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="requests each client makes, one after another")
    parser.add_argument("--fp32", action="store_true", help="lmforge serves fp32 weights, not the GGUF's blocks")
    parser.add_argument("--no-build", action="store_true", help="skip llama-server if it is not built yet")
    # llama.cpp's threads wait for each other at every op: on a busy machine fewer can be faster (lmforge
    # picks its own count per step), so a fair run measures the peers at 1 thread too
    parser.add_argument("--peer-threads", type=int, default=CORES, help=f"the peers' threads (default {CORES})")
    args = parser.parse_args()

    from lmforge.formats.loading import builtin_model_path

    gguf = args.model or str(builtin_model_path("smollm2-135m-instruct"))
    if "llama-server" in args.servers and not LLAMA_SERVER.exists() and not args.no_build:
        print("building llama-server (once; cached under ~/.cache/lmforge-peers) ...", flush=True)
        try:
            build_llama_server()
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"llama-server could not be built ({error}); skipped", flush=True)
    slots = max(args.levels)
    print("in-process generation (what `lmforge generate` runs) ...", flush=True)
    generation = in_process_generation(gguf, args.max_tokens, args.requests, args.fp32)
    measured, skipped = {}, {}
    for name in args.servers:
        port = free_port()
        command = server_command(name, gguf, port, slots, args.fp32, args.peer_threads)
        if isinstance(command, str):
            print(f"{name}: skipped: {command}", flush=True)
            skipped[name] = command
            continue
        print(f"{name} ...", flush=True)
        try:
            measured[name] = measure_server(name, command, port, args)
        except RuntimeError as error:
            print(f"{name}: skipped: {error}", flush=True)
            skipped[name] = str(error)

    print(
        f"\n{Path(gguf).name}, {args.max_tokens} tokens per request, streaming; {CORES} cores, peers on "
        f"{args.peer_threads} thread(s)"
    )
    print(f"{'server':<18}{'clients':>8}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>10}{'ITL p95':>10}")
    for name, result in measured.items():
        for level in result["levels"]:
            print(
                f"{name:<18}{level['clients']:>8}{level['tokens_per_s']:>10.1f}{level['ttft_p50_s']:>9.2f}s"
                f"{level['ttft_p95_s']:>9.2f}s{level['itl_p50_s'] * 1e3:>8.0f}ms{level['itl_p95_s'] * 1e3:>8.0f}ms"
            )
    print(f"\nin-process generate: {generation['tokens_per_s']:.1f} tokens/s (one stream)")
    print(f"\n{'server':<18}{'system prompt TTFT: first':>28}{'second':>10}")
    for name, result in measured.items():
        prefix = result["shared_prefix"]
        print(f"{name:<18}{prefix['first_ttft_s']:>27.2f}s{prefix['second_ttft_s']:>9.2f}s")

    def level(name: str, clients: int) -> dict:
        return next((lv for lv in measured.get(name, {}).get("levels", []) if lv["clients"] == clients), {})

    top = max(args.levels)
    ratios = {
        "api_1_client_vs_generate": ratio(level("lmforge", 1).get("stream_tokens_per_s"), generation["tokens_per_s"]),
        "ttft_p50_1_client_vs_llama_server": ratio(
            level("lmforge", 1).get("ttft_p50_s"), level("llama-server", 1).get("ttft_p50_s")
        ),
        f"tokens_per_s_{top}_clients_vs_llama_server": ratio(
            level("lmforge", top).get("tokens_per_s"), level("llama-server", top).get("tokens_per_s")
        ),
        f"tokens_per_s_{top}_clients_vs_llama_cpp_server": ratio(
            level("lmforge", top).get("tokens_per_s"), level("llama_cpp.server", top).get("tokens_per_s")
        ),
        f"ttft_p95_{top}_clients_vs_llama_server": ratio(
            level("lmforge", top).get("ttft_p95_s"), level("llama-server", top).get("ttft_p95_s")
        ),
    }
    targets = {
        "api_1_client_vs_generate": ">= 0.9",
        "ttft_p50_1_client_vs_llama_server": "<= 1.0",
        f"tokens_per_s_{top}_clients_vs_llama_server": ">= 1.0",
        f"tokens_per_s_{top}_clients_vs_llama_cpp_server": ">= 3.0",
        f"ttft_p95_{top}_clients_vs_llama_server": "<= 1.0",
    }
    print()
    for name, value in ratios.items():
        shown = "n/a (a peer was skipped)" if value is None else f"{value:.2f}x"
        print(f"{name}: {shown} (target {targets[name]})")
    suffix = ("_fp32" if args.fp32 else "") + (
        "" if args.peer_threads == CORES else f"_peers_{args.peer_threads}_thread"
    )
    results = RESULTS_DIR / f"serve{suffix}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": Path(gguf).name, "fp32": args.fp32, "max_tokens": args.max_tokens,
        "requests_per_client": args.requests, "cores": CORES, "peer_threads": args.peer_threads,
        "load_average_at_end": os.getloadavg(),
        "generate": generation, "servers": measured,
        "skipped": skipped, "ratios": ratios, "targets": targets,
    }  # fmt: skip
    results.write_text(json.dumps(summary, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
