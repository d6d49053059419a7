"""HF folders: random transformers models → ours (same logits), ours → transformers (same logits)."""

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.hf import load_hf, save_hf
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer, CharTokenizer

from ..conftest import make_corpus

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([make_corpus(100)], vocab_size=300)


def random_hf_model(kind: str, tie: bool):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=500.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie,
        )
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(
        vocab_size=300,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("tie", [True, False])
def test_import_matches_transformers_logits(tmp_path, bpe, kind, tie):
    reference = random_hf_model(kind, tie)
    reference.save_pretrained(tmp_path)
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    ours, tokenizer = load_hf(tmp_path)
    assert ours.config.tie_embeddings == tie
    tokens = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert (ours(tokens)[0] - reference(tokens).logits).abs().max() < 1e-5
    assert tokenizer.encode("the king") == bpe.encode("the king")


@pytest.mark.parametrize(
    "family",
    [
        dict(**LLAMA_SWITCHES, n_kv_heads=2, rope_theta=1000.0),
        dict(norm="layernorm", mlp="gelu_tanh", positions="learned", bias=True),
        dict(norm="layernorm", mlp="gelu", positions="learned", bias=True, tie_embeddings=False),
    ],
)
def test_export_loads_in_transformers_with_same_logits(tmp_path, bpe, family):
    torch.manual_seed(0)
    ours = Transformer(
        ModelConfig(vocab_size=bpe.vocab_size, block_size=32, n_layers=2, n_heads=4, d_model=32, **family)
    ).eval()
    with torch.no_grad():
        for parameter in ours.parameters():  # non-trivial norms and biases too
            parameter.add_(torch.randn_like(parameter) * 0.02)
    save_hf(ours, bpe, tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, bpe.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(tokens)[0] - reference(tokens).logits).abs().max() < 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.encode("the king, my lord", add_special_tokens=False) == bpe.encode("the king, my lord")


def test_char_tokenizer_exports_as_tokenizer_json(tmp_path, char_dataset):
    from lmforge.tokenizer import load_tokenizer

    char = load_tokenizer(char_dataset / "tokenizer.json")
    assert isinstance(char, CharTokenizer)
    model = Transformer(
        ModelConfig(
            vocab_size=char.vocab_size,
            block_size=16,
            n_layers=1,
            n_heads=2,
            d_model=16,
            **LLAMA_SWITCHES,
        )
    )
    save_hf(model, char, tmp_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "KING.\nGood night, sweet — prince ü 🙂"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == char.encode(text)
    assert hf_tokenizer.decode(char.encode(text)) == text
    _, reloaded = load_hf(tmp_path)
    assert reloaded.encode(text) == char.encode(text) and reloaded.decode(char.encode(text)) == text
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_bad_folders_are_clear_errors(tmp_path, bpe):
    with pytest.raises(LmforgeError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LmforgeError, match="model_type 'bert' is not supported"):
        load_hf(tmp_path)
    random_hf_model("llama", True).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(LmforgeError, match="cannot read weights"):
        load_hf(tmp_path)


def test_mixed_family_cannot_export(tmp_path, bpe):
    model = Transformer(
        ModelConfig(
            vocab_size=bpe.vocab_size,
            block_size=16,
            n_layers=1,
            n_heads=2,
            d_model=16,
            norm="rmsnorm",
            positions="learned",
        )
    )
    with pytest.raises(LmforgeError, match="HF export supports"):
        save_hf(model, bpe, tmp_path)


def test_sharded_checkpoint_loads(tmp_path, bpe):
    reference = random_hf_model("llama", False)
    reference.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    ours, _ = load_hf(tmp_path)
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (ours(tokens)[0] - reference(tokens).logits).abs().max() < 1e-5
