"""Sentence embeddings with all-MiniLM-L6-v2: lmforge against transformers, same sentences, same run.

1,000 sentences of mixed length (3 to 120 words of the built-in Shakespeare, a fixed seed), batch 32,
2 threads. The peer is what a transformers user writes: AutoTokenizer + AutoModel over the batches
in the given order, mean pooling over the attention mask, L2 norm. lmforge is timed three ways:
`lmforge.apps.encoder.embed` (Python), `/v1/embeddings` (a live server, one request per 32
sentences) and `lmforge embed` (a subprocess: the time of 1,000 sentences minus that of one, so
start-up and loading are left out). Each is timed `--repeats` times, interleaved, best kept. Prints a
table and writes benchmarks/results/embeddings.json.

    python benchmarks/embeddings.py [--sentences 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
BATCH_SIZE = 32
THREADS = 2
MODEL = "all-minilm-l6-v2"


def mixed_length_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` passages of Shakespeare, 3 to 120 words each (lengths log-uniform: many short, some long)."""
    from lmforge.training.recipes import shakespeare_corpus

    words = re.sub(r"\s+", " ", shakespeare_corpus().read_text()).split(" ")
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        length = round(3 * 40 ** rng.random())
        start = rng.randrange(len(words) - length)
        sentences.append(" ".join(words[start : start + length]))
    return sentences


def transformers_embedder():
    """The peer: transformers' tokenizer and BertModel, mean pooling, L2 norm, batches in input order."""
    import transformers

    from lmforge.apps.encoder import builtin_encoder_path

    folder = builtin_encoder_path(MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def embed(texts: list[str]) -> torch.Tensor:
        vectors = []
        for start in range(0, len(texts), BATCH_SIZE):
            batch = tokenizer(
                texts[start : start + BATCH_SIZE], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(vectors)

    return embed


def server_embedder():
    """(embed over /v1/embeddings, stop): `lmforge serve --threads 2` in a subprocess, one request per batch."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lmforge", "serve", "--port", str(port), "--threads", str(THREADS),
               "--embedding-model", MODEL]  # fmt: skip
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=lmforge_environment()
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit(f"server did not start:\n{server.stderr.read()}")
        time.sleep(0.5)

    def embed(texts: list[str]) -> torch.Tensor:
        vectors = []
        for start in range(0, len(texts), BATCH_SIZE):
            body = json.dumps({"model": MODEL, "input": texts[start : start + BATCH_SIZE]})
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # as a client's first request
            connection.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
            reply = connection.getresponse()
            data = json.loads(reply.read())
            connection.close()
            if reply.status != 200:
                raise SystemExit(f"/v1/embeddings answered {reply.status}: {data}")
            vectors += [item["embedding"] for item in data["data"]]
        return torch.tensor(vectors)

    def stop():
        server.terminate()
        server.wait(timeout=30)

    return embed, stop


def lmforge_environment() -> dict[str, str]:
    """This checkout's lmforge, on THREADS threads."""
    environment = {**os.environ, "LMFORGE_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
    environment["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), environment.get("PYTHONPATH", "")])
    return environment


def cli_seconds(texts: list[str]) -> float:
    """Wall time of `lmforge embed` reading `texts` on stdin (process start and model load included)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lmforge", "embed"],
        input="\n".join(texts),
        text=True,
        capture_output=True,
        check=True,
        env=lmforge_environment(),
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-server", action="store_true", help="skip /v1/embeddings")
    parser.add_argument("--no-cli", action="store_true", help="skip `lmforge embed`")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    texts = mixed_length_sentences(args.sentences)

    import lmforge.apps.encoder as encoder

    candidates = {
        "transformers (AutoModel + mean pooling)": transformers_embedder(),
        "lmforge.apps.encoder.embed": lambda batch: encoder.embed(batch, MODEL),
    }
    stop_server = None
    if not args.no_server:
        candidates["/v1/embeddings (32 per request)"], stop_server = server_embedder()
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    vectors = {}
    try:
        for name, embed in candidates.items():  # warm-up: first calls load kernels and allocate
            vectors[name] = embed(texts[:64])
        for _ in range(args.repeats):
            for name, embed in candidates.items():
                start = time.perf_counter()
                vectors[name] = embed(texts)
                seconds[name].append(time.perf_counter() - start)
    finally:
        if stop_server:
            stop_server()
    if not args.no_cli:
        name = "lmforge embed (CLI, minus start-up)"
        seconds[name] = []
        for _ in range(args.repeats):
            seconds[name].append(max(cli_seconds(texts) - cli_seconds(texts[:1]), 1e-9))

    peer = "transformers (AutoModel + mean pooling)"
    reference = vectors[peer]
    peer_rate = args.sentences / min(seconds[peer])
    rows = []
    print(f"{args.sentences} sentences (3-120 words), batch {BATCH_SIZE}, {THREADS} threads, best of {args.repeats}")
    print(f"{'':<42}{'sentences/s':>12}{'vs peer':>9}{'min cosine':>12}")
    for name, times in seconds.items():
        rate = args.sentences / min(times)
        cosine = float((vectors[name] * reference).sum(-1).min()) if name in vectors else None
        rows.append({"name": name, "sentences_per_second": rate, "ratio_to_transformers": rate / peer_rate,
                     "seconds": times, "min_cosine_to_transformers": cosine})  # fmt: skip
        shown = "" if cosine is None else f"{cosine:.6f}"
        print(f"{name:<42}{rate:>12.1f}{rate / peer_rate:>8.2f}x{shown:>12}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"sentences": args.sentences, "batch_size": BATCH_SIZE, "threads": THREADS, "repeats": args.repeats,
               "torch": torch.__version__, "results": rows}  # fmt: skip
    (RESULTS / "embeddings.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS / 'embeddings.json'}")


if __name__ == "__main__":
    main()
