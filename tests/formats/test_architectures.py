"""Issue 20's families from HF folders: tiny random transformers models (Llama 3 scaled RoPE, Mistral, Qwen2,
Qwen3, Gemma 3, Phi-3) → ours: same logits, same greedy tokens past the sliding window (cached and batched
generation); ours → an HF folder that transformers loads with the same logits; sharded folders both ways."""

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.hf import load_hf, save_hf
from lmforge.inference.generate import SamplingConfig, generate_batch, generate_tokens
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer

from ..conftest import make_corpus

transformers = pytest.importorskip("transformers")

VOCAB = 300
WINDOW = 8  # smaller than the prompts + 48 new tokens
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # logits spread wider than a 0.02 init's, so greedy picks are no near-ties
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_config(family: str):
    if family == "llama3":
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        rope |= dict(original_max_position_embeddings=16, rope_theta=5000.0)
        return transformers.LlamaConfig(**SHAPE, rope_parameters=rope, tie_word_embeddings=False)
    if family == "llama-yarn":
        rope = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1000.0)
        return transformers.LlamaConfig(**SHAPE, rope_parameters=rope, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**SHAPE, sliding_window=WINDOW, rope_theta=1000.0)
    if family == "qwen2":  # sliding from layer 1 on (max_window_layers), q/k/v biases, untied head
        return transformers.Qwen2Config(
            **SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=False
        )
    if family == "qwen2-tied":
        return transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True)
    if family == "qwen3":  # head_dim 32 != 64 / 4
        return transformers.Qwen3Config(
            **SHAPE, head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0
        )
    if family == "gemma3":
        rope = {
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=100000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=1000.0),
        }
        return transformers.Gemma3TextConfig(
            **(SHAPE | dict(num_hidden_layers=4)),
            head_dim=32,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters=rope,
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
        )
    if family == "phi3":
        return transformers.Phi3Config(
            **SHAPE, sliding_window=WINDOW, original_max_position_embeddings=128, tie_word_embeddings=False
        )
    raise AssertionError(family)


FAMILIES = ["llama3", "llama-yarn", "mistral", "qwen2", "qwen2-tied", "qwen3", "gemma3", "phi3"]
ARCHITECTURE = dict(qwen2="qwen2", mistral="mistral", qwen3="qwen3", gemma3="gemma3", phi3="phi3")
ARCHITECTURE |= {"llama3": "llama", "llama-yarn": "llama", "qwen2-tied": "qwen2"}


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([make_corpus(100)], vocab_size=VOCAB)


def random_hf_model(family: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager").eval()
    with torch.no_grad():  # norms (Gemma's start at 0, the others at 1) and biases away from their init
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' own greedy tokens, each from a full forward without a cache (the plainest reference)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_loads_with_transformers_logits_and_greedy_tokens_and_exports_back(tmp_path, bpe, family):
    reference = random_hf_model(family)
    reference.save_pretrained(tmp_path / "theirs")
    bpe.hf.save(str(tmp_path / "theirs" / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path / "theirs")
    assert ours.config.family == ARCHITECTURE[family]
    tokens = torch.randint(0, VOCAB, (2, 40))
    expected = hf_logits(reference, tokens)
    with torch.no_grad():
        assert (ours(tokens)[0] - expected).abs().max() < 1e-4

    prompts = [[5, 17, 33, 2, 99, 150, 7, 8, 9, 10], [42, 43, 44]]
    greedy = [hf_greedy(reference, prompt, 48) for prompt in prompts]
    sampling = SamplingConfig(max_new_tokens=48, temperature=0)
    assert [list(generate_tokens(ours, prompt, sampling)) for prompt in prompts] == greedy
    assert generate_batch(ours, prompts, sampling) == greedy

    save_hf(ours, tokenizer, tmp_path / "ours")
    values = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert values["architectures"] == [type(reference).__name__]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert type(exported) is type(reference)
    assert (hf_logits(exported.eval(), tokens) - expected).abs().max() < 1e-4


def test_gemma_norm_weights_hold_one_plus_hf_s_and_export_back_exactly(tmp_path, bpe):
    """Gemma's RMSNorm scales by (1 + w), ours by w: loading adds the 1, exporting takes it off. HF's forward
    computes 1 + w in fp32, the very value ours hold; exported, w' = fl(1 + w) - 1 is exact (Sterbenz, for
    1 + w within [0.5, 2]), so 1 + w' is that value again: transformers' norms scale by the same numbers."""
    reference = random_hf_model("gemma3")
    reference.save_pretrained(tmp_path / "theirs")
    bpe.hf.save(str(tmp_path / "theirs" / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path / "theirs")
    theirs = reference.model.layers[0]
    assert torch.equal(ours.blocks[0].mlp_norm.weight, 1.0 + theirs.pre_feedforward_layernorm.weight)
    assert torch.equal(ours.blocks[0].attention.q_norm.weight, 1.0 + theirs.self_attn.q_norm.weight)
    save_hf(ours, tokenizer, tmp_path / "ours")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    for name, parameter in reference.named_parameters():
        scale = (lambda weight: 1.0 + weight) if "norm" in name else (lambda weight: weight)
        assert torch.equal(scale(exported.get_parameter(name)), scale(parameter)), name


def test_gemma3_older_config_keys_read_the_same(tmp_path, bpe):
    """sliding_window_pattern, rope_local_base_freq and rope_scaling (Gemma 3's first configs) name the
    same model as layer_types and per-layer rope_parameters."""
    reference = random_hf_model("gemma3")
    reference.save_pretrained(tmp_path)
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    values = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        values.pop(key)
    values |= dict(sliding_window_pattern=2, rope_theta=100000.0, rope_local_base_freq=1000.0)
    values["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = load_hf(tmp_path)[0].config
    assert config.layer_types == ["sliding", "full", "sliding", "full"]
    assert (config.rope_theta, config.rope_local_theta) == (100000.0, 1000.0)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_qwen2_configs_before_layer_types_slide_from_max_window_layers_on(tmp_path, bpe):
    random_hf_model("qwen2").save_pretrained(tmp_path)
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    values = json.loads((tmp_path / "config.json").read_text())
    values.pop("layer_types")
    (tmp_path / "config.json").write_text(json.dumps(values | dict(max_window_layers=1)))
    assert load_hf(tmp_path)[0].config.layer_types == ["full", "sliding", "sliding"]
    (tmp_path / "config.json").write_text(json.dumps(values | dict(use_sliding_window=False)))
    assert load_hf(tmp_path)[0].config.sliding_window is None


def test_sharded_folders_read_and_write(tmp_path, bpe):
    reference = random_hf_model("qwen3")
    reference.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists()
    bpe.hf.save(str(tmp_path / "theirs" / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path / "theirs")
    tokens = torch.randint(0, VOCAB, (1, 20))
    expected = hf_logits(reference, tokens)
    out = tmp_path / "ours"
    save_hf(ours, tokenizer, out)  # first whole, then over it in shards: the single file must go
    save_hf(ours, tokenizer, out, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(path.name for path in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
    for folder_loader in (lambda: load_hf(out)[0], lambda: transformers.AutoModelForCausalLM.from_pretrained(out)):
        with torch.no_grad():
            logits = folder_loader()(tokens)
        logits = logits[0] if isinstance(logits, tuple) else logits.logits
        assert (logits - expected).abs().max() < 1e-4
    save_hf(ours, tokenizer, out)  # and back to one file: the shards and their index go
    assert sorted(path.name for path in out.glob("*.safetensors*")) == ["model.safetensors"]


def edit_config(folder, **changes):
    values = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(values))


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("llama3", dict(model_type="qwen3_moe"), "mixture-of-experts"),
        ("llama3", dict(model_type="mixtral"), "mixture-of-experts"),
        ("llama3", dict(model_type="falcon"), "not supported \\(supported: llama, mistral, qwen2, qwen3, gemma3_text"),
        ("llama3", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "RoPE scaling 'dynamic'"),
        ("llama3", dict(rope_parameters={"rope_type": "llama3", "factor": 2.0}), "needs low_freq_factor"),
        ("phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "LongRoPE"),
        ("phi3", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        ("gemma3", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        ("gemma3", dict(model_type="gemma3", text_config={}), "vision-language Gemma 3"),
        ("qwen3", dict(attention_bias=True), "attention biases"),
        ("mistral", dict(layer_types=["full_attention"]), "layer_types should list num_hidden_layers=3"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, bpe, family, changes, message):
    random_hf_model(family).save_pretrained(tmp_path)
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    edit_config(tmp_path, **changes)
    with pytest.raises(LmforgeError, match=message):
        load_hf(tmp_path)


def test_per_frequency_rope_factors_cannot_go_into_config_json(tmp_path, bpe):
    from lmforge.model import ModelConfig, Transformer

    config = ModelConfig(
        vocab_size=VOCAB, block_size=32, n_layers=1, n_heads=2, d_model=16, **LLAMA_SWITCHES,
        rope_scaling={"rope_type": "factors", "factors": [1.0, 2.0, 4.0, 8.0]},
    )  # fmt: skip
    with pytest.raises(LmforgeError, match="rope_freqs"):
        save_hf(Transformer(config), bpe, tmp_path)
