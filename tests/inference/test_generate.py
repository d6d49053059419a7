import pytest
import torch

from lmforge.inference import engine
from lmforge.inference.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    generate,
    generate_batch,
    generate_tokens,
    keep_top_p,
    pick_next_token,
)
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
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
        **LLAMA_SWITCHES,
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


def test_prompt_embeddings_prefill_and_then_the_native_step_decodes(model, monkeypatch):
    """Embeddings equal to the prompt's own give its tokens; the prefill runs on them, and every later
    step takes the usual one-token decode path (native kernels where they run)."""
    prompt = list(range(3, 13))
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    with torch.no_grad():
        embeddings = model.embed(torch.tensor([prompt]))
    plain = list(generate_tokens(model, prompt, sampling))
    steps = []
    step = engine.decode_step if engine.supports(model) else engine.torch_decode_step
    name = step.__name__
    monkeypatch.setattr(engine, name, lambda *args, **kwargs: steps.append(args[1].shape) or step(*args, **kwargs))
    assert list(generate_tokens(model, prompt, sampling, prompt_embeddings=embeddings)) == plain
    assert steps == [(1, 1)] * 7
    assert list(generate_tokens(model, prompt, sampling, False, prompt_embeddings=embeddings)) == plain
    assert list(generate_tokens(model, prompt, sampling, prompt_embeddings=embeddings + 0.5)) != plain
    # past the block the embeddings cannot be recomputed: generation ends once the block is full (its
    # last position still predicts one token), with and without the cache
    long = SamplingConfig(max_new_tokens=40, temperature=0)
    for use_cache in (True, False):
        assert len(list(generate_tokens(model, prompt, long, use_cache, prompt_embeddings=embeddings))) == 24 - 10 + 1


def test_batched_prefill_takes_each_rows_own_embeddings(model):
    prompts = [list(range(3, 13)), list(range(20, 26))]
    with torch.no_grad():
        own = [model.embed(torch.tensor(prompt)) for prompt in prompts]
        plain = engine.prefill(model, prompts, KVCache(model.config, 2, 24))
        given = engine.prefill(model, prompts, KVCache(model.config, 2, 24), embeddings=[own[0], None])
        changed = engine.prefill(model, prompts, KVCache(model.config, 2, 24), embeddings=[None, own[1] + 0.5])
    torch.testing.assert_close(given, plain)
    torch.testing.assert_close(changed[0], plain[0])
    assert not torch.allclose(changed[1], plain[1])


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


def full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by sorting the whole vocabulary: the definition `keep_top_p` must agree with."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probabilities = sorted_logits.softmax(dim=-1)
    drop_sorted = probabilities.cumsum(dim=-1) - probabilities >= top_p
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


@pytest.mark.parametrize("spread", [8.0, 0.05])  # peaked: the nucleus is among the candidates; flat: it is not
def test_top_p_from_the_likeliest_candidates_is_the_full_sorts_nucleus(spread):
    torch.manual_seed(1)
    logits = torch.randn(3, 5000) * spread
    for top_p in (0.5, 0.9, 0.99):
        kept = keep_top_p(logits, top_p)
        assert torch.equal(kept, full_sort_top_p(logits, top_p))
        assert (kept > float("-inf")).sum() > (3 * 256 if spread < 1 else 2)


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


def gpt2_model(vocab_size: int) -> Transformer:
    torch.manual_seed(1)
    return Transformer(ModelConfig(vocab_size=vocab_size, block_size=40, n_layers=2, n_heads=2, d_model=32)).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_generation_equals_one_prompt_at_a_time(model, tokenizer, family):
    """Prompts of different lengths share one cache with per-row positions (no padding in the cache):
    each row must produce exactly what it produces alone. Llama runs the native decode step, GPT-2
    the model's own forward with per-row positions and cache slots."""
    model = model if family == "llama" else gpt2_model(tokenizer.vocab_size)
    prompts = [[3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15], [2, 2]]
    sampling = SamplingConfig(max_new_tokens=9, temperature=0)
    alone = [list(generate_tokens(model, prompt, sampling)) for prompt in prompts]
    assert generate_batch(model, prompts, sampling) == alone
    # a row that hits a stop token leaves the batch; the others carry on unchanged
    stop = alone[1][2]
    stopped = generate_batch(model, prompts, sampling, stop_token_ids={stop})
    for row, tokens in enumerate(alone):
        expected = tokens[: tokens.index(stop) + 1] if stop in tokens else tokens
        assert stopped[row] == expected


def test_batched_sampling_is_reproducible_per_row(model):
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5)
    assert generate_batch(model, [[1, 2], [3]], sampling) == generate_batch(model, [[1, 2], [3]], sampling)


def test_batched_generation_rejects_prompts_beyond_the_context(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 24"):
        generate_batch(model, [[1] * 20], SamplingConfig(max_new_tokens=10))


@pytest.mark.skipif(not engine.supports(Transformer(ModelConfig(
    **LLAMA_SWITCHES))), reason="native kernels unavailable")  # fmt: skip
def test_native_decode_step_matches_the_model_forward(model):
    """Per-row positions in cache slots 1 and 0 against a full forward pass of each sequence."""
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    cache = KVCache(model.config, 2, 16)
    for row, sequence in zip([1, 0], sequences):
        model(torch.tensor([sequence[:-1]]), cache=cache, positions=torch.tensor([0]), slots=torch.tensor([row]))
    logits = engine.decode_step(
        model, torch.tensor([[sequences[0][-1]], [sequences[1][-1]]]), cache,
        positions=torch.tensor([5, 2]), slots=torch.tensor([1, 0]),
    )  # fmt: skip
    with torch.no_grad():
        for row, sequence in enumerate(sequences):
            full = model(torch.tensor([sequence]))[0][0, -1]
            torch.testing.assert_close(logits[row], full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("native_layers", [False, True])
def test_compiled_decode_step_gives_the_same_tokens(model, native_layers):
    """torch.compile of the static-shape decode step (tens of seconds to compile) agrees with the default
    path, with plain Linear layers and with layers that call the native kernels as custom operators."""
    import copy

    from lmforge.inference.quantize import use_native_kernels

    subject = use_native_kernels(copy.deepcopy(model)) if native_layers else model
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    assert list(generate_tokens(subject, [3, 4, 5], sampling, compile=True)) == list(
        generate_tokens(model, [3, 4, 5], sampling)
    )


def test_sampling_follows_the_distribution():
    """Inverse-CDF sampling: frequencies match softmax(logits / T) and masked tokens never appear."""
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), 1.5]])
    generator = torch.Generator().manual_seed(0)
    sampling = SamplingConfig(temperature=1.0)
    draws = torch.stack([pick_next_token(logits, sampling, generator) for _ in range(20000)]).flatten()
    frequencies = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert frequencies[3] == 0
    torch.testing.assert_close(frequencies, logits.softmax(-1)[0], atol=0.015, rtol=0)


def test_decode_step_falls_back_to_the_model_for_layers_it_cannot_run(model):
    """A non-contiguous weight has no native call: the step runs through the model's forward instead."""
    import copy

    odd = copy.deepcopy(model)
    weight = odd.blocks[0].mlp.up.weight
    odd.blocks[0].mlp.up.weight = torch.nn.Parameter(weight.detach().t().contiguous().t())
    assert not odd.blocks[0].mlp.up.weight.is_contiguous()
    sampling = SamplingConfig(max_new_tokens=10, temperature=0)
    assert list(generate_tokens(odd, [3, 4, 5], sampling)) == list(generate_tokens(model, [3, 4, 5], sampling))


def test_a_long_prompt_prefilled_in_chunks_gives_the_same_logits():
    from lmforge.inference.engine import next_token_logits
    from lmforge.model import KVCache

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, block_size=64, n_layers=2, n_heads=2, d_model=16)
    model = Transformer(config).eval()
    tokens = torch.randint(0, 50, (1, 40))
    with torch.no_grad():
        whole = model(tokens)[0][:, -1]
        chunk = engine.PREFILL_CHUNK
        engine.PREFILL_CHUNK = 16  # 40 tokens: passes of 16, 16 and 8
        try:
            cache = KVCache(config, 1)
            chunked = next_token_logits(model, tokens, cache)
        finally:
            engine.PREFILL_CHUNK = chunk
    assert cache.length == 40 and torch.allclose(chunked, whole, atol=1e-5)


def test_generate_command_says_when_the_model_ends_at_once(tmp_path, capsys):
    """A model whose every next token is end-of-text writes nothing; the command says why on stderr."""
    from lmforge.cli import main
    from lmforge.formats.checkpoint import save_model

    tokenizer = CharTokenizer("abc ")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layers=1, n_heads=2, d_model=8,
                         norm="layernorm", bias=True, tie_embeddings=False)  # fmt: skip
    model = Transformer(config).eval()
    with torch.no_grad():  # the final norm outputs its bias (ones); only end-of-text's row of the head sees it
        model.final_norm.weight.zero_()
        model.final_norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_id] = 1.0
    save_model(tmp_path / "eos", model, tokenizer)
    assert main(["generate", "--model", str(tmp_path / "eos"), "--prompt", "ab", "--temperature=0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "ab\n"
    assert "generated no text: its first token was end-of-text" in captured.err


def test_a_text_prompt_gets_the_bos_the_model_files_ask_for(monkeypatch):
    from lmforge.inference import generate as generate_module

    tokenizer = CharTokenizer("abc")
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layers=1, n_heads=2, d_model=16))
    prompts = []

    def record(model, prompt_ids, sampling, tokenizer=None):
        prompts.append(prompt_ids)
        return iter(())

    monkeypatch.setattr(generate_module, "generate_tokens", record)
    list(generate_module.generate(model, tokenizer, "ab"))
    tokenizer.add_bos_token = True
    list(generate_module.generate(model, tokenizer, "ab"))
    list(generate_module.generate(model, tokenizer, [tokenizer.bos_id, 9]))  # ids (a chat prompt) are taken as they are
    assert prompts == [tokenizer.encode("ab"), [tokenizer.bos_id, *tokenizer.encode("ab")], [tokenizer.bos_id, 9]]


def greedy_tokens(model, prompt, sampling, path):
    if path == "batch":
        return generate_batch(model, [prompt, prompt[:2]], sampling)[0]
    return list(generate_tokens(model, prompt, sampling, use_cache=path != "uncached"))


@pytest.mark.parametrize("path", ["native", "torch", "uncached", "batch"])
def test_logit_bias_reaches_every_decode_path(model, monkeypatch, path):
    """+100 makes a token win every step; -100 keeps the greedy choices out: in the native decode step, PyTorch's
    step (the native one unavailable), the uncached forward and batched generation alike."""
    if path == "torch":
        monkeypatch.setattr(engine, "supports", lambda model: False)
    prompt = [3, 4, 5]
    plain = SamplingConfig(max_new_tokens=6, temperature=0)
    unbiased = greedy_tokens(model, prompt, plain, path)
    forced = SamplingConfig(max_new_tokens=6, temperature=0, logit_bias={17: 100.0})
    assert greedy_tokens(model, prompt, forced, path) == [17] * 6
    banned = SamplingConfig(max_new_tokens=6, temperature=0, logit_bias=dict.fromkeys(set(unbiased), -100.0))
    assert not set(greedy_tokens(model, prompt, banned, path)) & set(unbiased)


def test_logit_bias_is_checked_against_the_vocabulary_and_refused_by_speculative_decoding(model, tokenizer):
    from lmforge.errors import LmforgeError
    from lmforge.inference.generate import check_greedy_for_draft

    with pytest.raises(LmforgeError, match="token id 999, outside the vocabulary"):
        list(generate(model, tokenizer, "ab", SamplingConfig(max_new_tokens=2, logit_bias={999: 1.0})))
    with pytest.raises(LmforgeError, match="logit_bias must be empty"):
        check_greedy_for_draft(SamplingConfig(temperature=0, logit_bias={3: 1.0}))
    with pytest.raises(ValueError, match="logit_bias must be token ids"):
        SamplingConfig(logit_bias={-1: 1.0})


def test_prompt_scores_are_the_model_log_softmax(model):
    """score_prompt: each token's log-probability given the ones before it (a plain forward's log-softmax, plus
    the bias), its most likely alternatives best first; chunked LM-head passes change nothing."""
    from lmforge.inference import generate as generate_module
    from lmforge.inference.generate import score_prompt

    prompt = [3, 4, 5, 9, 9, 2, 7]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt]))[0][0] + torch.eye(model.config.vocab_size)[9], -1)
    original_chunk = generate_module.PROMPT_SCORE_CHUNK
    generate_module.PROMPT_SCORE_CHUNK = 4
    try:
        scores = score_prompt(model, prompt, 3, {9: 1.0})
    finally:
        generate_module.PROMPT_SCORE_CHUNK = original_chunk
    assert [score.token_id for score in scores] == prompt[1:]
    for position, score in enumerate(scores):
        assert score.logprob == pytest.approx(float(reference[position, prompt[position + 1]]), abs=1e-5)
        best = reference[position].topk(3)
        assert [token for token, _ in score.top] == best.indices.tolist()
        assert [value for _, value in score.top] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert score_prompt(model, [3], 2, {}) == []
