import math

import pytest
import torch

from lmforge.model import KVCache, ModelConfig, Transformer, apply_rope, preset, rope_tables, zeroed_from_os


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
        norm="rmsnorm",
        mlp="swiglu",
        positions="rope",
        bias=False,
        rope_theta=500.0,
    )
    return ModelConfig(**(values | overrides))


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small])
def test_forward_shapes_and_loss(make_config):
    torch.manual_seed(0)
    model = Transformer(make_config())
    tokens = torch.randint(0, 97, (3, 16))
    logits, loss = model(tokens, torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    # An untrained model with small weights predicts close to uniform: loss near ln(vocab).
    assert abs(loss.item() - math.log(97)) < 0.3


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small])
def test_cached_decoding_matches_full_forward(make_config):
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


@pytest.mark.parametrize("make_config", [gpt2_small, llama_small])
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
