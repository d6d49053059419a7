"""Structured outputs on SmolLM2-135M-Instruct: decoding speed with and without a JSON Schema, same run, and
the two grammar libraries issue 21 names, llguidance (what lmforge uses) and xgrammar, on the same vocabulary.

Speed: tokens/s of decoding (prefill excluded) without a schema and with one, its masks computed in line
before sampling or on lmforge's helper thread during the model's step (`constrained.masks_in_background`
picks one); one stream through `generate_tokens` (native decode kernels) and 8 rows through `generate_batch`.
Rounds are interleaved and the median kept, and the grammar's own time per token is counted directly: the
machine is shared and noisy.

Libraries (--libraries): for each schema, the time to build the tokenizer index, to compile the schema, and
per token of a fixed valid document, to compute the allowed-token mask and to advance past the token; and the
cost of applying a mask to 49k logits (lmforge's numpy unpack, llguidance.torch's compiled kernel, xgrammar's).
xgrammar is optional: it needs transformers and triton at runtime, which lmforge does not take; for this
measurement it can be installed without them (`pip install --no-deps xgrammar apache-tvm-ffi`).

    python benchmarks/structured.py [--rounds 3] [--libraries]

Writes benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from lmforge.formats.loading import load
from lmforge.inference import constrained
from lmforge.inference.chat import encode_chat, stop_token_ids
from lmforge.inference.generate import generate_batch, generate_tokens
from lmforge.settings import JSON_LAYOUT, SamplingConfig

RESULTS = Path(__file__).parent / "results" / "structured.json"
MAX_NEW_TOKENS = 96
BATCH = 8
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 60},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "zip": {"type": "string", "maxLength": 10}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "address", "hobbies", "role"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person (nested, array, enum)": PERSON,
    "any JSON object": {"type": "object"},
}
DOCUMENTS = {  # one valid reply per schema, for the per-token library timings
    "person (nested, array, enum)": {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.org",
        "address": {"city": "London", "zip": "W1"},
        "hobbies": ["mathematics", "poetry", "horses"],
        "role": "admin",
    },
    "any JSON object": {"title": "A walk", "steps": [1, 2, 3], "nested": {"ok": True, "score": 0.75}},
}
PROMPT = [{"role": "user", "content": "Describe a fictional person as a JSON object."}]


def single_stream(model, tokenizer, prompt, sampling) -> tuple[int, float]:
    """(decoded tokens, seconds) after the first token, so the prefill is not counted."""
    stamps = [time.perf_counter() for _ in generate_tokens(model, prompt, sampling, tokenizer=tokenizer)]
    return len(stamps) - 1, stamps[-1] - stamps[0]


def batch(model, tokenizer, prompt, sampling) -> tuple[int, float]:
    """(decoded tokens, seconds) of BATCH rows, less one prefill (timed in the same call with 1 new token)."""
    prompts = [prompt] * BATCH
    stops = stop_token_ids(tokenizer)
    start = time.perf_counter()
    generate_batch(model, prompts, SamplingConfig(max_new_tokens=1, temperature=0), stops, tokenizer)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    outputs = generate_batch(model, prompts, sampling, stops, tokenizer)
    seconds = time.perf_counter() - start - prefill_seconds
    return sum(len(row) - 1 for row in outputs), seconds


class GrammarTime:
    """Seconds spent in the grammar's own calls (starting and applying masks, advancing matchers) while
    decoding: what a constrained step adds, counted directly, since tokens/s on this busy machine swing by
    more than that between two runs."""

    def __init__(self):
        self.seconds = 0.0
        self.originals = {}

    def __enter__(self):
        for owner, name in ((constrained.TokenMasks, "start"), (constrained.TokenMasks, "apply")):
            self._time(owner, name)
        self._time(constrained.GrammarMatcher, "consume")
        return self

    def _time(self, owner, name):
        original = self.originals[(owner, name)] = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)

    def __exit__(self, *exc):
        for (owner, name), original in self.originals.items():
            setattr(owner, name, original)


def decoding_speed(rounds: int) -> list[dict]:
    model, tokenizer = load("smollm2-135m-instruct")
    prompt = encode_chat(tokenizer, PROMPT)
    plain = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, seed=0)
    schema = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, seed=0, json_schema=PERSON)
    constrained.guidance_tokenizer(tokenizer)  # built once per tokenizer (~0.3 s): not a per-request cost
    runs, grammar_seconds, decode_seconds, token_counts = {}, {}, {}, {}
    policy = constrained.masks_in_background
    for _ in range(rounds):
        for path, run in (("generate_tokens, 1 stream", single_stream), (f"generate_batch, {BATCH} rows", batch)):
            for mode, sampling, background in (
                ("no schema", plain, None),
                ("schema, masks in line", schema, False),
                ("schema, masks on a thread", schema, True),
            ):
                if background is not None:
                    constrained.masks_in_background = lambda device, background=background: background
                try:
                    with GrammarTime() as grammar:
                        tokens, seconds = run(model, tokenizer, prompt, sampling)
                finally:
                    constrained.masks_in_background = policy
                key = (path, mode)
                runs.setdefault(key, []).append(tokens / seconds)
                grammar_seconds[key] = grammar_seconds.get(key, 0.0) + grammar.seconds
                decode_seconds[key] = decode_seconds.get(key, 0.0) + seconds
                token_counts[key] = token_counts.get(key, 0) + tokens
    rows = []
    for (path, mode), speeds in runs.items():
        baseline = statistics.median(runs[(path, "no schema")])
        speed = statistics.median(speeds)
        key = (path, mode)
        rows.append(
            {
                "path": path,
                "mode": mode,
                "tokens_per_second": speed,
                "vs_no_schema": speed / baseline,
                # includes the first mask (computed during the prefill), over the decoded tokens
                "grammar_us_per_token": grammar_seconds[key] / token_counts[key] * 1e6,
                "grammar_share_of_decode_time": grammar_seconds[key] / decode_seconds[key],
            }
        )
    return rows


def library_timings() -> dict:
    _, tokenizer = load("smollm2-135m-instruct")
    pieces, special_ids = constrained.token_bytes(tokenizer)
    end_ids = sorted(stop_token_ids(tokenizer))
    results = {"llguidance": {}, "xgrammar": {}}
    start = time.perf_counter()
    constrained._guidance_tokenizers.pop(tokenizer, None)
    constrained.guidance_tokenizer(tokenizer)
    results["llguidance"]["tokenizer_index_seconds"] = time.perf_counter() - start
    try:
        import xgrammar
    except ImportError as error:
        xgrammar = None
        results["xgrammar"]["unavailable"] = str(error)
    if xgrammar is not None:
        start = time.perf_counter()
        vocab = [b"" if index in special_ids else piece for index, piece in enumerate(pieces)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=end_ids)
        compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        results["xgrammar"]["tokenizer_index_seconds"] = time.perf_counter() - start
    for name, schema in SCHEMAS.items():
        document = json.dumps(DOCUMENTS[name])  # json.dumps' separators: the layout both libraries are given
        tokens = tokenizer.encode(document)
        start = time.perf_counter()
        matcher = constrained.GrammarMatcher(tokenizer, SamplingConfig(json_schema=schema).constraint())
        compile_seconds = time.perf_counter() - start
        mask, advance = [], []
        for token in tokens:
            start = time.perf_counter()
            bitmask = constrained._fill_masks([matcher.matcher], matcher.mask_words, parallel=False)
            mask.append(time.perf_counter() - start)
            assert np.unpackbits(bitmask.view(np.uint8), bitorder="little")[token], "document outside the schema"
            start = time.perf_counter()
            matcher.consume(token)
            advance.append(time.perf_counter() - start)
        results["llguidance"][name] = timing_row(compile_seconds, mask, advance)
        if xgrammar is None:
            continue
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(
            json.dumps(schema),
            any_whitespace=JSON_LAYOUT["whitespace_flexible"],
            separators=(JSON_LAYOUT["item_separator"], JSON_LAYOUT["key_separator"]),
            strict_mode=False,  # as llguidance: properties a schema leaves open stay allowed
        )
        x_matcher = xgrammar.GrammarMatcher(compiled)
        compile_seconds = time.perf_counter() - start
        bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
        mask, advance = [], []
        for token in tokens:
            start = time.perf_counter()
            x_matcher.fill_next_token_bitmask(bitmask)
            mask.append(time.perf_counter() - start)
            start = time.perf_counter()
            accepted = x_matcher.accept_token(token)
            advance.append(time.perf_counter() - start)
            assert accepted, "xgrammar refused a token of the valid document"
        results["xgrammar"][name] = timing_row(compile_seconds, mask, advance)
    results["apply_mask_to_49k_logits"] = mask_application(tokenizer.vocab_size, xgrammar)
    return results


def timing_row(compile_seconds: float, mask: list[float], advance: list[float]) -> dict:
    return {
        "compile_ms": compile_seconds * 1e3,
        "mask_us_per_token_median": statistics.median(mask) * 1e6,
        "mask_us_per_token_max": max(mask) * 1e6,
        "advance_us_per_token_median": statistics.median(advance) * 1e6,
        "tokens": len(mask),
    }


def mask_application(vocab: int, xgrammar) -> dict:
    """Microseconds to apply one row's bitmask to (1, vocab) logits, steady state, and the first call; for a
    dense mask (inside a string: most tokens allowed) and a sparse one (between keys: a few)."""
    rng = np.random.default_rng(0)
    base = torch.randn(1, vocab)
    logits = base.clone()
    timings = {}
    for density in (0.5, 0.002):
        allowed = rng.random((1, (vocab + 31) // 32 * 32)) < density
        bitmask = np.packbits(allowed, axis=1, bitorder="little").view(np.int32)
        candidates = mask_appliers(bitmask, logits, xgrammar)
        for name, apply in candidates.items():
            steady, first = [], None
            for call in range(201):
                np.copyto(logits.numpy(), base.numpy())  # fresh logits, outside the timing
                start = time.perf_counter()
                try:
                    apply()
                except Exception as error:  # noqa: BLE001 - a missing backend is a result too
                    timings[f"{name}, {density:.1%} allowed"] = {"error": f"{type(error).__name__}: {error}"[:200]}
                    break
                seconds = time.perf_counter() - start
                first = seconds if call == 0 else first
                steady += [seconds] if call else []
            else:
                timings[f"{name}, {density:.1%} allowed"] = {
                    "first_call_ms": first * 1e3,
                    "steady_us_median": statistics.median(steady) * 1e6,
                }
    return timings


def mask_appliers(bitmask: np.ndarray, logits: torch.Tensor, xgrammar) -> dict:
    """Each library's way to apply `bitmask` to `logits` in place."""
    import llguidance.torch

    masks = constrained.TokenMasks(torch.device("cpu"))
    masks.rows = [0]
    torch_mask = torch.from_numpy(bitmask)

    def lmforge_unpack():
        masks.pending = Future()
        masks.pending.set_result(bitmask)
        masks.apply(logits)

    appliers = {
        "lmforge (numpy unpack)": lmforge_unpack,
        "llguidance.torch (torch.compile)": lambda: llguidance.torch.apply_token_bitmask_inplace(logits, torch_mask),
    }
    if xgrammar is not None:
        appliers["xgrammar"] = lambda: xgrammar.apply_token_bitmask_inplace(logits, torch_mask)
    return appliers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--libraries", action="store_true", help="also time llguidance against xgrammar")
    args = parser.parse_args()
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    report["load_average_at_start"] = os.getloadavg()[0]  # other work on the machine: the timings' noise
    if args.libraries:
        report["libraries"] = libraries = library_timings()
        print("library timings (SmolLM2's 49k vocabulary):")
        print(json.dumps(libraries, indent=2))
    report["decoding"] = rows = decoding_speed(args.rounds)
    print(f"\n{'path':<28} {'mode':<26} {'tokens/s':>9} {'vs no schema':>13} {'grammar us/token':>17} {'share':>6}")
    for row in rows:
        print(
            f"{row['path']:<28} {row['mode']:<26} {row['tokens_per_second']:>9.1f} {row['vs_no_schema']:>12.2f}x "
            f"{row['grammar_us_per_token']:>17.0f} {row['grammar_share_of_decode_time']:>6.1%}"
        )
    report["load_average_at_end"] = os.getloadavg()[0]
    start_load, end_load = report["load_average_at_start"], report["load_average_at_end"]
    print(f"load average {start_load:.1f} at the start, {end_load:.1f} at the end (2 cores, shared)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
