import pytest
import torch

from lmforge.generate import SamplingConfig, apply_repetition_penalty, generate, generate_tokens, pick_next_token
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=24,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        d_model=32,
        norm="rmsnorm",
        mlp="swiglu",
        positions="rope",
        bias=False,
    )
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer("abcdefghijklmnopqrstuvwxyz .\n")


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(max_new_tokens=60, temperature=0),
        SamplingConfig(max_new_tokens=60, temperature=1.0, top_k=20, seed=3),
    ],
)
def test_cached_and_uncached_decoding_agree(model, sampling):
    # 60 new tokens on a 24-token block: crosses the context limit and the sliding-window path.
    prompt = list(range(40, 50))
    cached = list(generate_tokens(model, prompt, sampling, use_cache=True))
    uncached = list(generate_tokens(model, prompt, sampling, use_cache=False))
    assert cached == uncached and len(cached) == 60


def test_seed_makes_sampling_reproducible(model):
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    first = list(generate_tokens(model, [5, 6], sampling))
    assert first == list(generate_tokens(model, [5, 6], sampling))
    assert first != list(generate_tokens(model, [5, 6], SamplingConfig(max_new_tokens=20, temperature=1.0, seed=8)))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(pick_next_token(logits, SamplingConfig(temperature=1.5, top_k=1), generator), greedy)
    assert torch.equal(pick_next_token(logits, SamplingConfig(temperature=1.5, top_p=1e-6), generator), greedy)
    assert torch.equal(pick_next_token(logits, SamplingConfig(temperature=0), None), greedy)


def test_top_p_keeps_the_smallest_covering_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    picks = {int(pick_next_token(logits, SamplingConfig(temperature=1.0, top_p=0.75), generator)) for _ in range(300)}
    assert picks == {0, 1}


def test_repetition_penalty_closed_form():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalised = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


def test_streamed_text_equals_decoded_tokens(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=30, temperature=1.0, seed=1)
    pieces = list(generate(model, tokenizer, "ab", sampling, stop_at_eos=False))
    tokens = list(generate_tokens(model, tokenizer.encode("ab"), sampling))
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert len(pieces) > 1  # streamed, not one blob


def test_stop_strings_cut_the_text(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=1)
    full = "".join(generate(model, tokenizer, "ab", sampling, stop_at_eos=False))
    stop = full[10:12]
    cut = "".join(
        generate(model, tokenizer, "ab", SamplingConfig(**{**sampling.__dict__, "stop": [stop]}), stop_at_eos=False)
    )
    assert cut == full[: full.find(stop)]
