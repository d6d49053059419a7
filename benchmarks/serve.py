"""Serving throughput and latency: N concurrent streaming clients against `lmforge serve`.

Starts the server (SmolLM2-135M-Instruct by default) on a free loopback port, then for each
concurrency level (1, 4, 16) runs that many clients at once, each streaming a chat completion
of --max-tokens tokens. Reports total completion tokens/s, time to first token (p50/p95) and
inter-token latency (p50/p95), and the throughput of 16 clients relative to 1 (continuous
batching at work). The peer is the same server with one client. Stops by itself; writes
benchmarks/results/serve.json (serve_fp32.json with --fp32).

    python benchmarks/serve.py [--model smollm2-135m-instruct] [--max-tokens 64] [--levels 1 4 16] [--fp32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def stream_one(port: int, index: int, max_tokens: int) -> dict:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": f"Write a short poem about {TOPICS[index % len(TOPICS)]}."}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": index,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    arrivals, completion_tokens = [], 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            completion_tokens = chunk["usage"]["completion_tokens"]
        if any(choice["delta"].get("content") for choice in chunk.get("choices", [])):
            arrivals.append(time.perf_counter())
    connection.close()
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    return {
        "time_to_first_token_s": arrivals[0] - start if arrivals else float("nan"),
        "inter_token_s": gaps,
        "completion_tokens": completion_tokens,
    }


def run_level(port: int, clients: int, max_tokens: int) -> dict:
    results: list[dict] = [{}] * clients
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, stream_one(port, i, max_tokens)))
        for i in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(result["completion_tokens"] for result in results)
    first = [result["time_to_first_token_s"] for result in results]
    gaps = [gap for result in results for gap in result["inter_token_s"]]
    return {
        "clients": clients,
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(first, 0.5),
        "ttft_p95_s": percentile(first, 0.95),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p95_s": percentile(gaps, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--fp32", action="store_true", help="serve fp32 weights instead of the GGUF's Q4/Q8 blocks")
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lmforge", "serve", "--model", args.model, "--port", str(port),
               "--max-batch", str(max(args.levels)), "--embedding-model", "none",
               "--keep-quantized", "false" if args.fp32 else "true"]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start:\n{server.stderr.read() if server.poll() is not None else ''}")
            time.sleep(0.5)
        stream_one(port, 0, 4)  # warm-up
        levels = []
        for clients in args.levels:
            print(f"{clients} concurrent client(s) ...", flush=True)
            levels.append(run_level(port, clients, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=30)

    weights = "fp32" if args.fp32 else "as stored (Q4_1/Q8_0 for the shipped GGUF)"
    print(f"\n{args.model}, weights {weights}, {args.max_tokens} tokens per request, streaming")
    print(f"{'clients':>8}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>10}{'ITL p95':>10}")
    for level in levels:
        print(
            f"{level['clients']:>8}{level['tokens_per_s']:>10.1f}{level['ttft_p50_s']:>9.2f}s{level['ttft_p95_s']:>9.2f}s"
            f"{level['itl_p50_s'] * 1e3:>8.0f}ms{level['itl_p95_s'] * 1e3:>8.0f}ms"
        )
    single = next((level for level in levels if level["clients"] == 1), None)
    ratios = {}
    if single:
        for level in levels:
            if level["clients"] > 1:
                ratios[f"throughput_{level['clients']}_clients_vs_1"] = level["tokens_per_s"] / single["tokens_per_s"]
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    results = RESULTS_DIR / ("serve_fp32.json" if args.fp32 else "serve.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {"model": args.model, "fp32": args.fp32, "max_tokens": args.max_tokens, "levels": levels, "ratios": ratios},
            indent=2,
        )
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
