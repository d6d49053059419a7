"""The decoding step's thread count: chosen from measured step times, or fixed by --threads / $LMFORGE_THREADS."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference import engine
from lmforge.inference.generate import SamplingConfig, generate_tokens
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES


def drive(most: int, seconds_for, steps: int, free_cores_at=lambda step: None):
    """A chooser over `steps` steps whose times are `seconds_for(step, threads)` and whose free cores are
    `free_cores_at(step)`; (the chooser, the thread count of each step)."""
    clock = {"step": 0}
    chooser = engine.ThreadChooser(most, cores_free_now=lambda: free_cores_at(clock["step"]))
    used = []
    for step in range(steps):
        clock["step"] = step
        threads, measured = chooser.pick()
        used.append(threads)
        if measured:
            chooser.record(threads, seconds_for(step, threads))
    return chooser, used


def test_candidates_halve_from_the_most_threads_down_to_one():
    assert engine.ThreadChooser(8).candidates == [8, 4, 2, 1]
    assert engine.ThreadChooser(6).candidates == [6, 3, 1]
    assert engine.ThreadChooser(1).candidates == [1]


def test_an_idle_machine_keeps_every_thread_and_tries_fewer_less_and_less_often():
    chooser, used = drive(2, lambda step, threads: {2: 0.010, 1: 0.012}[threads], 3000, lambda step: 2)
    assert chooser.current == 2
    # only the explorations leave the best count, two steps each; each lost try doubles the wait
    tries = [step for step in range(1, len(used)) if used[step] == 1 and used[step - 1] == 2]
    gaps = [later - earlier for earlier, later in zip(tries, tries[1:])]
    assert used.count(1) == 2 * len(tries)
    assert gaps == sorted(gaps) and gaps[0] > engine.ThreadChooser.EXPLORE_EVERY
    assert gaps[-1] >= engine.ThreadChooser.EXPLORE_FEWER_AT_MOST_EVERY and len(tries) <= 20


def test_a_slowdown_brings_the_try_of_fewer_threads_back_at_once():
    # idle for 2,000 steps (tries of one thread backed off), then another process takes a core
    def seconds(step, threads):
        return {2: 0.010, 1: 0.012}[threads] if step < 2000 else {2: 0.040, 1: 0.014}[threads]

    chooser, used = drive(2, seconds, 2100, lambda step: 2 if step < 2000 else 1)
    assert chooser.current == 1 and used[2000 + engine.ThreadChooser.EXPLORE_EVERY + 2 :].count(2) == 0


def test_a_busy_machine_moves_to_fewer_threads_and_does_not_try_more_without_free_cores():
    chooser, used = drive(2, lambda step, threads: {2: 0.030, 1: 0.012}[threads], 200, lambda step: 1)
    assert chooser.current == 1
    assert used[:2] == [2, 2] and used[2:4] == [1, 1] and used[4:].count(2) == 0


def test_more_threads_that_keep_losing_are_tried_less_and_less_often():
    # cores that look free but are not (the count is one look at a moment): each lost try doubles the wait
    chooser, used = drive(2, lambda step, threads: {2: 0.500, 1: 0.012}[threads], 3000, lambda step: 2)
    tries = [step for step in range(1, len(used)) if used[step] == 2 and used[step - 1] == 1]
    gaps = [later - earlier for earlier, later in zip(tries, tries[1:])]
    assert chooser.current == 1 and gaps == sorted(gaps) and gaps[-1] >= engine.ThreadChooser.EXPLORE_AT_MOST_EVERY
    assert len(tries) <= 10  # of 3000 steps, about 20 spent on a lost cause


def test_load_that_comes_and_goes_is_followed_both_ways():
    def busy(step):
        return 100 <= step < 300

    def seconds(step, threads):
        return {4: 0.040, 2: 0.020, 1: 0.014}[threads] if busy(step) else {4: 0.008, 2: 0.010, 1: 0.016}[threads]

    chooser, used = drive(4, seconds, 500, lambda step: 1 if busy(step) else 4)  # candidates 4, 2, 1
    assert used[80:100].count(4) >= 18  # idle: all four threads
    assert used[250:300].count(1) >= 46  # busy: down to one, a neighbour at a time
    assert used[450:500].count(4) >= 46  # idle again: back up
    assert chooser.current == 4


def test_fixed_threads_bypass_the_chooser_and_set_pytorch(monkeypatch):
    seen = []
    try:
        engine.set_decode_threads(1)
        assert torch.get_num_threads() == 1
        engine.run_timed_step(object(), 1, seen.append)
        engine.run_timed_step(object(), 1, seen.append)
    finally:
        engine.set_decode_threads(None)
    assert seen == [1, 1]


@pytest.mark.parametrize("value", ["0", "two", "-3", "1.5"])
def test_a_bad_lmforge_threads_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("LMFORGE_THREADS", value)
    with pytest.raises(LmforgeError, match="LMFORGE_THREADS must be a whole number"):
        engine.threads_from_environment()


def test_lmforge_threads_is_read(monkeypatch):
    monkeypatch.setenv("LMFORGE_THREADS", " 3 ")
    assert engine.threads_from_environment() == 3
    monkeypatch.setenv("LMFORGE_THREADS", "")
    assert engine.threads_from_environment() is None


def test_thread_count_does_not_change_the_tokens(monkeypatch):
    """Chosen per step or fixed at one or two threads: every row of every kernel is summed by one
    thread in one order, so greedy decoding gives the same tokens (native kernels or PyTorch)."""
    monkeypatch.setattr(engine, "free_cores", lambda looks=3: 2)  # as on an idle machine, whatever runs beside
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                         **LLAMA_SWITCHES)  # fmt: skip
    model = Transformer(config).eval()
    sampling = SamplingConfig(max_new_tokens=80, temperature=0)
    runs = []
    try:
        for threads in (None, 1, 2):
            engine.set_decode_threads(threads)
            runs.append(list(generate_tokens(model, [1, 2, 3], sampling)))
    finally:
        engine.set_decode_threads(None)
        torch.set_num_threads(2)
    assert runs[0] == runs[1] == runs[2]
    chooser = engine._choosers[model][1]
    assert chooser.steps >= 79 and set(chooser.seconds) == {1, 2}  # both counts were measured


def test_the_first_count_fits_the_cores_other_processes_leave_free():
    assert engine.ThreadChooser(8, free=3).current == 2
    assert engine.ThreadChooser(8, free=8).current == 8
    assert engine.ThreadChooser(2, free=1).current == 1
    assert engine.ThreadChooser(2, free=None).current == 2
    free = engine.free_cores()
    import os

    assert free is None or 1 <= free <= len(os.sched_getaffinity(0))


def test_prefill_runs_on_the_count_decoding_found_fastest():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=64, n_layers=1, n_heads=2, d_model=32)
    model = Transformer(config).eval()
    chooser = engine._chooser(model, 1)
    try:
        chooser.current = 1
        list(generate_tokens(model, list(range(20)), SamplingConfig(max_new_tokens=1, temperature=0)))
        assert torch.get_num_threads() == 1
        engine.set_decode_threads(2)  # fixed: the chooser is not asked
        list(generate_tokens(model, list(range(20)), SamplingConfig(max_new_tokens=1, temperature=0)))
        assert torch.get_num_threads() == 2
    finally:
        engine.set_decode_threads(None)
        torch.set_num_threads(2)


def test_a_decode_plan_is_made_once_per_cache_and_goes_with_it():
    """Plans live beside the cache (not in it), keyed by it weakly: a finished request's cache frees its plan."""
    import gc

    from lmforge.model import KVCache

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=32, n_layers=1, n_heads=2, d_model=32,
                         **LLAMA_SWITCHES)  # fmt: skip
    model = Transformer(config).eval()
    if not engine.supports(model):
        pytest.skip("native kernels unavailable")
    cache = KVCache(config, 1, 16)
    with torch.no_grad():
        for token in (1, 2, 3):
            engine.decode_step(model, torch.tensor([[token]]), cache)
    plans = engine._decode_plans[cache]
    assert list(plans) == [(id(model), 1)] and cache.length == 3
    assert "_decode_plans" not in vars(cache)
    del cache, plans
    gc.collect()
    assert not any(key[0] == id(model) for plans in engine._decode_plans.values() for key in plans)


# The switches of each published family (as tests/formats/test_gguf_architectures.py builds them).
FAMILY_SWITCHES = {
    "llama3": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    "mistral": dict(sliding_window=5),
    "qwen2": dict(qkv_bias=True, tie_embeddings=False),
    "qwen3": dict(qk_norm=True, d_head=24, rope_theta=1e6),
    "gemma3": dict(mlp="geglu", qk_norm=True, post_norms=True, scale_embeddings=True, d_head=32, rope_theta=1e6,
                   sliding_window=5, layer_types=["sliding", "full", "sliding"], rope_local_theta=10000.0,
                   attention_scale=0.15, logit_softcap=30.0,
                   rope_scaling=dict(rope_type="linear", factor=4.0)),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILY_SWITCHES)
def test_native_decoding_equals_the_model_for_each_family(family):
    """Three rows at different positions, decoded token by token past the sliding window by the native
    plan and by the model's own forward over a copy of the same cache: the same logits."""
    from lmforge.inference import kernels
    from lmforge.model import KVCache

    if not kernels.available():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(0)
    sizes = dict(vocab_size=128, block_size=64, n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96)
    llama = dict(**LLAMA_SWITCHES)
    config = ModelConfig(**sizes, **{**llama, **FAMILY_SWITCHES[family]})
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:  # norms near 1, biases near 0, not all alike
                parameter.add_(0.1 * torch.randn_like(parameter))
    assert engine.supports(model)
    native, reference = KVCache(config, 3, 40), KVCache(config, 3, 40)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    slots = torch.tensor([2, 0, 1])
    with torch.no_grad():
        for cache in (native, reference):
            engine.prefill(model, prompts, cache, slots)
        positions = torch.tensor([len(prompt) for prompt in prompts])
        tokens = torch.tensor([[20], [21], [22]])
        for _ in range(14):  # row 1 ends at position 20, four windows on
            ours = engine.decode_step(model, tokens, native, positions, slots)
            theirs = engine.torch_decode_step(model, tokens, reference, positions, slots)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
            tokens, positions = theirs.argmax(-1, keepdim=True), positions + 1


GEMMA_LIKE = dict(
    vocab_size=97, block_size=96, n_layers=4, n_heads=4, n_kv_heads=2, d_model=32, d_head=16, d_mlp=48,
    norm="rmsnorm", mlp="geglu", positions="rope", bias=False, qk_norm=True, post_norms=True,
    scale_embeddings=True, attention_scale=0.3, logit_softcap=5.0, sliding_window=6,
    layer_types=["sliding", "sliding", "full", "sliding"], rope_local_theta=100.0, rope_theta=1000.0,
)  # fmt: skip


@pytest.mark.parametrize(
    "switches", [dict(), dict(sliding_window=6, layer_types=None, rope_local_theta=None), dict(qkv_bias=True)]
)
def test_models_with_issue_20_switches_decode_through_the_model_and_agree_with_no_cache(switches):
    """Decoding with a cache (the native step where it runs): greedy tokens past the sliding window equal
    the cache-free ones, alone and batched."""
    from lmforge.inference.generate import generate_batch

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(GEMMA_LIKE | switches))).eval()
    sampling = SamplingConfig(max_new_tokens=30, temperature=0)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 2, 3]]
    cached = [list(generate_tokens(model, prompt, sampling)) for prompt in prompts]
    assert cached == [list(generate_tokens(model, prompt, sampling, use_cache=False)) for prompt in prompts]
    assert generate_batch(model, prompts, sampling) == cached


@pytest.mark.parametrize("family", FAMILY_SWITCHES)
@pytest.mark.parametrize("rows_per_pass", [64, 4])
def test_native_prefill_equals_the_models_forward_for_each_family(family, rows_per_pass, monkeypatch):
    """Short prompts as rows of the native step (`engine.native_prefill`), some continuing a cached
    prefix, some past the sliding window, in passes of `rows_per_pass` rows: the same last-token logits
    and the same cache entries as the model's forward, and the decoding that follows agrees too."""
    from lmforge.inference import kernels
    from lmforge.model import KVCache

    if not kernels.available():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(0)
    sizes = dict(vocab_size=128, block_size=64, n_layers=3, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=96)
    config = ModelConfig(**sizes, **{**LLAMA_SWITCHES, **FAMILY_SWITCHES[family]})
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    native, reference = KVCache(config, 3, 40), KVCache(config, 3, 40)
    slots = torch.tensor([2, 0, 1])
    monkeypatch.setattr(engine, "NATIVE_PREFILL_ROWS", rows_per_pass)
    with torch.no_grad():
        monkeypatch.setattr(engine, "NATIVE_PREFILL_TOKENS", 0)  # the model's forward for both: the prefixes
        for cache in (native, reference):
            engine.prefill(model, [[1, 2], [3, 4, 5, 6, 7, 8], [9]], cache, slots)
        tails, starts = [[10, 11, 12, 13, 14, 15, 16], [17], [18, 19, 20]], [2, 6, 1]
        theirs = engine.prefill(model, tails, reference, slots, starts)
        monkeypatch.setattr(engine, "NATIVE_PREFILL_TOKENS", 64)
        ours = engine.prefill(model, tails, native, slots, starts)
        assert engine._decode_plans[native]  # it ran natively
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        for layer in range(config.n_layers):
            for row, (start, tail) in zip(slots.tolist(), zip(starts, tails)):
                seen = slice(0, start + len(tail))
                torch.testing.assert_close(native.keys[layer][row, :, seen], reference.keys[layer][row, :, seen])
                torch.testing.assert_close(native.values[layer][row, :, seen], reference.values[layer][row, :, seen])
        positions = torch.tensor([start + len(tail) for start, tail in zip(starts, tails)])
        tokens = theirs.argmax(-1, keepdim=True)
        for _ in range(6):
            ours = engine.decode_step(model, tokens, native, positions, slots)
            theirs = engine.torch_decode_step(model, tokens, reference, positions, slots)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
            tokens, positions = theirs.argmax(-1, keepdim=True), positions + 1


def test_a_short_prompt_goes_through_the_native_step_and_gives_the_forwards_tokens(monkeypatch):
    """One prompt with an aligned cache (`generate`'s path): the native prefill advances the cache as the
    forward does, and greedy tokens equal those of a prefill through the forward."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                         **LLAMA_SWITCHES)  # fmt: skip
    model = Transformer(config).eval()
    if not engine.supports(model):
        pytest.skip("native kernels unavailable")
    sampling = SamplingConfig(max_new_tokens=20, temperature=0)
    prompt = [5, 9, 2, 7, 7, 1, 30, 12]
    passes = []
    native_prefill = engine.native_prefill
    monkeypatch.setattr(engine, "native_prefill", lambda *args: passes.append(native_prefill(*args)) or passes[-1])
    native = list(generate_tokens(model, prompt, sampling))
    assert passes and passes[0] is not None  # the prompt went through the native step
    monkeypatch.setattr(engine, "NATIVE_PREFILL_TOKENS", 0)
    assert native == list(generate_tokens(model, prompt, sampling))
