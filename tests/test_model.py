import math

import pytest
import torch

from lmforge.model import (
    HUGE_PAGE_BYTES,
    KVCache,
    ModelConfig,
    Transformer,
    apply_rope,
    preset,
    rope_tables,
    zeroed_from_os,
)
from lmforge.settings import LLAMA_SWITCHES


def gpt2_small(**overrides):
    return ModelConfig(**(dict(vocab_size=97, block_size=32, n_layers=2, n_heads=4, d_model=32) | overrides))


def llama_small(**overrides):
    values = dict(
        vocab_size=97,
        block_size=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_model=32,
        d_mlp=48,
        **LLAMA_SWITCHES,
        rope_theta=500.0,
    )
    return ModelConfig(**(values | overrides))


def every_switch(**overrides):
    """Gemma 3's switches at once (and Qwen2's q/k/v biases): sliding and full layers with their own RoPE
    bases, scaled global RoPE, q/k norms, branch norms, scaled embeddings, a soft cap, d_head != d_model/n_heads."""
    values = dict(
        d_head=16,
        mlp="geglu",
        qkv_bias=True,
        qk_norm=True,
        post_norms=True,
        scale_embeddings=True,
        attention_scale=0.3,
        logit_softcap=5.0,
        sliding_window=5,
        layer_types=["sliding", "full", "sliding", "full"],
        rope_local_theta=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        n_layers=4,
        block_size=64,
    )
    return llama_small(**(values | overrides))


def sliding_llama(**overrides):
    return llama_small(**(dict(sliding_window=4, block_size=64) | overrides))


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small])
def test_forward_shapes_and_loss(make_config):
    torch.manual_seed(0)
    model = Transformer(make_config())
    tokens = torch.randint(0, 97, (3, 16))
    logits, loss = model(tokens, torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    # An untrained model with small weights predicts close to uniform: loss near ln(vocab).
    assert abs(loss.item() - math.log(97)) < 0.3


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small, every_switch])
def test_given_embeddings_stand_in_for_the_tokens(make_config):
    """`embeddings=model.embed(tokens)` gives the tokens' own logits, with and without a cache; other
    embeddings change them (a vision-language model's image tokens go in this way)."""
    torch.manual_seed(0)
    model = Transformer(make_config()).eval()
    tokens = torch.randint(0, 97, (2, 12))
    embeddings = model.embed(tokens)
    assert torch.equal(model(tokens, embeddings=embeddings)[0], model(tokens)[0])
    assert torch.equal(model(None, embeddings=embeddings)[0], model(tokens)[0])
    cache = KVCache(model.config, batch_size=2)
    cached = model(tokens[:, :8], cache=cache, embeddings=embeddings[:, :8])[0]
    torch.testing.assert_close(torch.cat([cached, model(tokens[:, 8:], cache=cache)[0]], 1), model(tokens)[0])
    changed = embeddings.clone()
    changed[:, 3] += 1.0
    assert not torch.allclose(model(tokens, embeddings=changed)[0][:, 3:], model(tokens)[0][:, 3:])
    torch.testing.assert_close(model(tokens, embeddings=changed)[0][:, :3], model(tokens)[0][:, :3])


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small, every_switch, sliding_llama])
def test_cached_decoding_matches_full_forward(make_config):
    """Aligned prefill in pieces, then one token at a time (past the sliding window, where there is one)."""
    torch.manual_seed(0)
    model = Transformer(make_config()).eval()
    tokens = torch.randint(0, 97, (2, 20))
    full, _ = model(tokens)
    cache = KVCache(model.config, batch_size=2)
    prefill, _ = model(tokens[:, :7], cache=cache)
    pieces = [prefill]
    pieces.append(model(tokens[:, 7:12], cache=cache)[0])  # several tokens at once after a prefix
    for position in range(12, 20):
        pieces.append(model(tokens[:, position : position + 1], cache=cache)[0])
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small, every_switch, sliding_llama])
def test_a_static_cache_attends_over_its_whole_capacity_and_matches_the_full_forward(make_config):
    """Per-row decoding into a static cache (what the compiled step runs): rows at different positions,
    keys read over the whole capacity whatever the positions, logits those of the full forward."""
    torch.manual_seed(0)
    model = Transformer(make_config()).eval()
    tokens = torch.randint(0, 97, (2, 12))
    full, _ = model(tokens)
    cache = KVCache(model.config, batch_size=2, max_length=16, static=True)
    model(tokens[:1, :5], cache=cache, positions=torch.tensor([0]), slots=torch.tensor([0]))
    model(tokens[1:, :9], cache=cache, positions=torch.tensor([0]), slots=torch.tensor([1]))
    seen, cache_update = [], cache.update

    def recording_update(layer, k, v):
        keys, values, mask, is_causal = cache_update(layer, k, v)
        seen.append(keys.shape[2])
        return keys, values, mask, is_causal

    cache.update = recording_update
    with torch.no_grad():
        logits, _ = model(tokens[:, [5, 9]].diagonal()[:, None], cache=cache, positions=torch.tensor([5, 9]))
    assert set(seen) == {16}
    torch.testing.assert_close(logits[0, 0], full[0, 5], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, 0], full[1, 9], atol=1e-5, rtol=1e-4)


def test_inference_mlp_in_place_equals_the_autograd_one():
    torch.manual_seed(0)
    model = Transformer(llama_small()).eval()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.enable_grad():
        expected, _ = model(tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0], expected)


def test_cache_memory_starts_zeroed_and_is_separate_per_tensor():
    first, second = zeroed_from_os((2, 3, 5), "cpu", torch.float32), zeroed_from_os((2, 3, 5), "cpu", torch.float32)
    assert first.shape == (2, 3, 5) and first.dtype == torch.float32 and not first.any()
    first.fill_(1.5)
    assert not second.any() and first.sum() == 1.5 * 30
    assert zeroed_from_os((0, 4), "cpu", torch.float16).shape == (0, 4)
    cache = KVCache(preset("tiny"), batch_size=1, max_length=8)
    assert all(not tensor.any() for tensor in cache.keys + cache.values)


def test_weight_memory_on_huge_pages_starts_at_a_2_mb_boundary_and_stays_separate():
    shape = (3, HUGE_PAGE_BYTES // 4 + 5)  # three rows of a bit over 2 MB each
    first, second = (zeroed_from_os(shape, "cpu", torch.float32, huge_pages=True) for _ in range(2))
    assert first.shape == shape and first.is_contiguous() and not first.any()
    assert first.data_ptr() % HUGE_PAGE_BYTES == 0 and second.data_ptr() % HUGE_PAGE_BYTES == 0
    first[-1, -1] = 2.0  # the last element is inside the region, and the regions do not overlap
    assert first.sum() == 2.0 and not second.any()
    small = zeroed_from_os((16,), "cpu", torch.int8, huge_pages=True)  # under 2 MB: ordinary pages
    assert small.shape == (16,) and not small.any()


def test_attention_equals_manual_softmax_formula():
    torch.manual_seed(0)
    config = gpt2_small(n_layers=1)
    model = Transformer(config).eval()
    x = torch.randn(1, 10, config.d_model)
    attention = model.blocks[0].attention
    q, k, v = attention.qkv(x).split(config.d_model, dim=-1)
    heads = lambda t: t.view(1, 10, config.n_heads, config.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(config.head_dim)
    scores = scores.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf"))
    manual = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 10, config.d_model)
    torch.testing.assert_close(attention(x, None, None), attention.out(manual), atol=1e-5, rtol=1e-4)


def test_grouped_query_attention_shares_kv_heads():
    config = llama_small(n_heads=4, n_kv_heads=1)
    model = Transformer(config)
    qkv = model.blocks[0].attention.qkv
    assert qkv.out_features == (4 + 2 * 1) * config.head_dim
    assert model(torch.randint(0, 97, (1, 8)))[0].shape == (1, 8, 97)


def test_rope_rotation_preserves_norm_and_relative_position():
    cos, sin = rope_tables(8, 16, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rotate = lambda v, p: apply_rope(v.view(1, 1, 1, 8), cos[p], sin[p]).view(8)  # noqa: E731
    assert torch.allclose(rotate(q, 5).norm(), q.norm(), atol=1e-5)
    # The dot product depends only on the distance between positions.
    assert torch.allclose(rotate(q, 3) @ rotate(k, 1), rotate(q, 9) @ rotate(k, 7), atol=1e-5)


def test_parameter_counts_match_published_sizes():
    # GPT-2 small: 124,439,808 parameters (HF GPT2LMHeadModel, tied head).
    assert Transformer(preset("gpt2-124m", block_size=1024)).num_parameters() == 124_439_808
    # SmolLM2-135M: 134,515,008 parameters (HF LlamaForCausalLM, tied head).
    with torch.device("meta"):
        smollm = Transformer(preset("smollm2-135m"))
    assert smollm.num_parameters() == 134_515_008


def test_flops_per_token_closed_form():
    config = preset("nanogpt-cpu")
    model = Transformer(config)
    layer = 12 * config.d_model**2 + 13 * config.d_model  # qkv, out, up, down weights+biases, 2 LayerNorms
    non_embedding = config.n_layers * layer + 2 * config.d_model  # + final LayerNorm
    assert model.num_parameters(exclude_embeddings=True) == non_embedding
    expected = 6 * (non_embedding + config.vocab_size * config.d_model) + 12 * 4 * 128 * 64
    assert model.flops_per_token() == expected


def test_untied_embeddings_are_separate():
    model = Transformer(gpt2_small(tie_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.token_embedding.weight.data_ptr()
    tied = Transformer(gpt2_small())
    assert tied.lm_head.weight is tied.token_embedding.weight


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt5")


def test_sequence_longer_than_block_is_an_error():
    model = Transformer(gpt2_small())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Transformer(gpt2_small(dropout=0.5))
    tokens = torch.randint(0, 97, (1, 8))
    model.eval()
    assert torch.equal(model(tokens)[0], model(tokens)[0])
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])


# --- issue 20's switches: Mistral, Qwen2/3, Gemma 3, Phi-3 ------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_per_row_cache_positions_past_the_sliding_window_match_the_full_forward(static):
    """Rows prefilled to different lengths (one short of the window, one past it) in their own slots, then
    decoded per row (the batched and the static, compiled-step path): each row's logits as its full forward."""
    torch.manual_seed(0)
    model = Transformer(every_switch()).eval()
    tokens = torch.randint(0, 97, (2, 30))
    full, _ = model(tokens)
    cache = KVCache(model.config, batch_size=2, max_length=32, static=static)
    with torch.no_grad():
        model(tokens[1:, :4], cache=cache, positions=torch.tensor([0]), slots=torch.tensor([1]))
        model(tokens[:1, :11], cache=cache, positions=torch.tensor([0]), slots=torch.tensor([0]))
        lengths = torch.tensor([11, 4])
        for _ in range(15):
            step = tokens[torch.arange(2), lengths][:, None]
            logits, _ = model(step, cache=cache, positions=lengths)
            torch.testing.assert_close(logits[:, 0], full[torch.arange(2), lengths], atol=1e-5, rtol=1e-4)
            lengths = lengths + 1


def test_a_one_layer_sliding_model_at_a_position_sees_only_its_window():
    """RoPE is relative, so one sliding layer's output at position p is that of the window's tokens alone."""
    torch.manual_seed(0)
    model = Transformer(sliding_llama(n_layers=1, sliding_window=6)).eval()
    tokens = torch.randint(0, 97, (1, 30))
    full, _ = model(tokens)
    for position in (5, 6, 17, 29):
        window, _ = model(tokens[:, max(0, position - 5) : position + 1])
        torch.testing.assert_close(full[0, position], window[0, -1], atol=1e-5, rtol=1e-4)
    unwindowed = Transformer(llama_small(n_layers=1, block_size=64)).eval()
    unwindowed.load_weights(model.state_dict())
    assert not torch.allclose(unwindowed(tokens)[0][0, 29], full[0, 29], atol=1e-3)  # the window matters


def test_packed_documents_with_a_sliding_window_match_each_document_alone():
    torch.manual_seed(0)
    model = Transformer(every_switch()).eval()
    tokens = torch.randint(0, 97, (1, 30))
    document_ids = torch.tensor([[0] * 12 + [1] * 18])
    packed, _ = model(tokens, document_ids=document_ids)
    first, _ = model(tokens[:, :12])
    second, _ = model(tokens[:, 12:])
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-4)


def test_the_switches_change_what_they_say():
    """Each switch, set on a copy with the same weights where it adds none, changes the logits: none is ignored."""
    torch.manual_seed(0)
    model = Transformer(every_switch()).eval()
    tokens = torch.randint(0, 97, (1, 24))
    reference, _ = model(tokens)
    for change in (
        dict(attention_scale=0.5),
        dict(logit_softcap=2.0),
        dict(scale_embeddings=False),
        dict(sliding_window=12),
        dict(layer_types=["full"] * 4),
        dict(rope_local_theta=50.0),
        dict(rope_scaling=None),
    ):
        changed = Transformer(every_switch(**change)).eval()
        changed.load_weights(model.state_dict())
        assert not torch.allclose(changed(tokens)[0], reference, atol=1e-4), change


def test_logits_are_soft_capped():
    torch.manual_seed(0)
    model = Transformer(every_switch(logit_softcap=0.2)).eval()
    tokens = torch.randint(0, 97, (1, 8))
    logits, _ = model(tokens)
    uncapped = model.lm_head(model.hidden_states(tokens))
    assert uncapped.abs().max() > 0.2 > logits.abs().max()
    torch.testing.assert_close(logits, 0.2 * torch.tanh(uncapped / 0.2))


def test_switch_shapes_qkv_bias_head_width_and_norm_weights():
    model = Transformer(every_switch())
    attention = model.blocks[0].attention
    assert attention.qkv.bias is not None and attention.out.bias is None
    assert attention.out.in_features == 4 * 16 and attention.out.out_features == 32
    assert attention.q_norm.weight.shape == (16,) and attention.k_norm.weight.shape == (16,)
    assert model.blocks[0].mlp.up.out_features == 2 * 48
    names = set(model.state_dict())
    assert {"blocks.0.attention_post_norm.weight", "blocks.0.mlp_post_norm.weight"} <= names
    assert not any("post_norm" in name or "q_norm" in name for name in Transformer(llama_small()).state_dict())


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 16,
            "mscale": 0.9,
            "mscale_all_dim": 0.5,
        },
    ],
)
def test_rope_scaling_frequencies_equal_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmforge.model import rope_frequencies

    config = LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
        rope_parameters={"rope_theta": 10000.0, **scaling},
    )  # fmt: skip
    expected, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    inv_freq, factor = rope_frequencies(64, 10000.0, scaling)
    torch.testing.assert_close(inv_freq.float(), expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)
    cos, sin = rope_tables(64, 8, 10000.0, scaling)
    assert cos[0, 0] == pytest.approx(expected_factor)  # yarn's mscale multiplies the tables


def test_rope_frequency_factors_divide_the_frequencies():
    """GGUF's rope_freqs (llama.cpp's freq_factors): each frequency divided by its factor."""
    from lmforge.model import rope_frequencies

    factors = [1.0, 2.0, 4.0, 8.0]
    plain, _ = rope_frequencies(8, 10000.0)
    scaled, attention_factor = rope_frequencies(8, 10000.0, {"rope_type": "factors", "factors": factors})
    torch.testing.assert_close(scaled, plain / torch.tensor(factors, dtype=torch.float64))
    assert attention_factor == 1.0


@pytest.mark.parametrize(
    "switches, family",
    [
        (dict(), "llama"),
        (dict(sliding_window=8), "mistral"),
        (dict(sliding_window=8, architecture="phi3"), "phi3"),
        (dict(qkv_bias=True), "qwen2"),
        (dict(qk_norm=True, d_head=16), "qwen3"),
        (dict(architecture="qwen2"), "qwen2"),
        (dict(architecture="qwen3"), "llama"),  # named, but without q/k norms a Qwen3 file cannot say it
        (dict(sliding_window=8, layer_types=["sliding", "full"], architecture="qwen2"), "qwen2"),
        (dict(mlp="geglu", qk_norm=True, post_norms=True, scale_embeddings=True, logit_softcap=30.0), "gemma3"),
        (dict(post_norms=True), None),
        (dict(mlp="geglu", qk_norm=True, post_norms=True, scale_embeddings=True, qkv_bias=True), None),
    ],
)
def test_family_names_the_architecture_whose_files_express_the_switches(switches, family):
    assert llama_small(**switches).family == family
    if family is None:
        with pytest.raises(ValueError, match="qwen3, gemma3"):
            llama_small(**switches).require_family("export")
