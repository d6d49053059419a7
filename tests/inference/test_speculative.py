"""Speculative decoding gives exactly the target's greedy tokens, whatever the draft proposes."""

import copy

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.inference.generate import SamplingConfig, check_greedy_for_draft, generate, generate_tokens
from lmforge.inference.quantize import quantize_model, use_native_kernels
from lmforge.inference.speculative import SpeculationStats, speculative_generate
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import CharTokenizer


def chaotic_model(seed: int, family: str = "llama") -> Transformer:
    """Weights large enough that greedy outputs vary (a default-init tiny model repeats one token,
    which any draft would 'predict')."""
    torch.manual_seed(seed)
    llama = dict(**LLAMA_SWITCHES, n_kv_heads=2)
    config = ModelConfig(
        vocab_size=96, block_size=256, n_layers=2, n_heads=4, d_model=64, **(llama if family == "llama" else {})
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.15)
    return use_native_kernels(model)


def greedy(model, prompt, count):
    return list(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=count, temperature=0)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("draft_kind", ["int4 copy", "unrelated", "itself"])
def test_output_is_the_targets_greedy_output_whatever_the_draft(seed, draft_kind):
    target = chaotic_model(seed)
    draft = {
        "int4 copy": lambda: quantize_model(copy.deepcopy(target), 4, 32).eval(),
        "unrelated": lambda: chaotic_model(seed + 100),  # nearly every proposal rejected
        "itself": lambda: target,  # every proposal accepted, including the last of each round
    }[draft_kind]()
    prompt = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(seed)).tolist()
    stats = SpeculationStats()
    tokens = list(speculative_generate(target, draft, prompt, 60, draft_tokens=4, stats=stats))
    assert tokens == greedy(target, prompt, 60)
    assert stats.proposed > 0
    if draft_kind == "itself":
        assert stats.acceptance_rate == 1.0 and stats.rounds < 60 / 4
    if draft_kind == "unrelated":
        assert stats.acceptance_rate < 0.2


def test_models_the_native_step_does_not_cover_verify_through_forward():
    target, draft = chaotic_model(3, "gpt2"), chaotic_model(4, "gpt2")
    prompt = [5, 17, 42, 8]
    assert list(speculative_generate(target, draft, prompt, 30, draft_tokens=3)) == greedy(target, prompt, 30)


@pytest.mark.parametrize("count", [1, 2, 5, 9])
def test_yields_exactly_max_new_tokens(count):
    target = chaotic_model(0)
    assert len(list(speculative_generate(target, target, [1, 2, 3], count, draft_tokens=4))) == count


def test_mismatched_vocabularies_and_greedy_only_are_errors():
    target = chaotic_model(0)
    other = Transformer(ModelConfig(vocab_size=50, block_size=64, n_layers=1, n_heads=2, d_model=32))
    with pytest.raises(LmforgeError, match="vocabularies differ"):
        list(speculative_generate(target, other, [1, 2], 5))
    with pytest.raises(LmforgeError, match="at least one token"):
        list(speculative_generate(target, target, [], 5))
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    with pytest.raises(LmforgeError, match="greedy"):
        list(generate(target, tokenizer, "abc", SamplingConfig(temperature=0.8), draft=target))


@pytest.mark.parametrize(
    "sampling, named, not_named",
    [
        (SamplingConfig(temperature=0.8), "temperature must be 0 (not 0.8)", "repetition_penalty"),
        (
            SamplingConfig(temperature=0, repetition_penalty=1.2),
            "repetition_penalty must be 1 (not 1.2)",
            "temperature",
        ),
    ],
)
def test_the_greedy_check_names_only_what_is_wrong(sampling, named, not_named):
    with pytest.raises(LmforgeError) as error:
        check_greedy_for_draft(sampling)
    assert named in str(error.value) and not_named not in str(error.value)
    check_greedy_for_draft(SamplingConfig(temperature=0))  # greedy: nothing to refuse
