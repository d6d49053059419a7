"""The decoding step's thread count: chosen from measured step times, or fixed by --threads / $LMFORGE_THREADS."""

import pytest
import torch

from lmforge import engine
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingConfig, generate_tokens
from lmforge.model import ModelConfig, Transformer


def drive(chooser: engine.ThreadChooser, seconds_for, steps: int) -> list[int]:
    """Run `steps` picks against step times `seconds_for(step, threads)`; the thread count of each step."""
    used = []
    for step in range(steps):
        threads, measured = chooser.pick()
        used.append(threads)
        if measured:
            chooser.record(threads, seconds_for(step, threads))
    return used


def test_candidates_halve_from_the_most_threads_down_to_one():
    assert engine.ThreadChooser(8).candidates == [8, 4, 2, 1]
    assert engine.ThreadChooser(6).candidates == [6, 3, 1]
    assert engine.ThreadChooser(1).candidates == [1]


def test_an_idle_machine_keeps_every_thread():
    chooser = engine.ThreadChooser(2)
    used = drive(chooser, lambda step, threads: {2: 0.010, 1: 0.012}[threads], 240)
    assert chooser.current == 2
    # only the exploring pairs leave the best count: steps 3 and 4 of every EXPLORE_EVERY
    exploring = [step for step in range(1, 241) if step % engine.ThreadChooser.EXPLORE_EVERY in (3, 4)]
    assert used.count(1) == len(exploring) == 20


def test_a_busy_machine_moves_to_fewer_threads_within_the_first_steps():
    chooser = engine.ThreadChooser(2)
    used = drive(chooser, lambda step, threads: {2: 0.030, 1: 0.012}[threads], 100)
    assert chooser.current == 1
    assert used[:2] == [2, 2] and used[4:].count(2) <= 2 * (100 // engine.ThreadChooser.EXPLORE_EVERY)


def test_load_that_comes_and_goes_is_followed_both_ways():
    chooser = engine.ThreadChooser(4)  # candidates 4, 2, 1

    def seconds(step, threads):
        busy = 100 <= step < 300
        return {4: 0.040 if busy else 0.008, 2: 0.020 if busy else 0.010, 1: 0.014 if busy else 0.016}[threads]

    used = drive(chooser, seconds, 500)
    assert used[90:100].count(4) >= 8  # idle: all four threads
    assert used[280:300].count(1) >= 17  # busy: down to one, a neighbour at a time
    assert used[480:500].count(4) >= 17  # idle again: back up
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


def test_thread_count_does_not_change_the_tokens():
    """Chosen per step or fixed at one or two threads: every row of every kernel is summed by one
    thread in one order, so greedy decoding gives the same tokens (native kernels or PyTorch)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
                         norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)  # fmt: skip
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
    assert engine.ThreadChooser(8, free_cores=3).current == 2
    assert engine.ThreadChooser(8, free_cores=8).current == 8
    assert engine.ThreadChooser(2, free_cores=1).current == 1
    assert engine.ThreadChooser(2, free_cores=None).current == 2
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
