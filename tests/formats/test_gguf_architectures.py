"""GGUF for every family lmforge exports: Llama (and Llama 3's rope_freqs), Mistral, Qwen2, Qwen3,
Gemma 3, Phi-3 and GPT-2. Each tiny random model goes through our writer and reader unchanged, and llama.cpp
(llama-cpp-python, where installed) continues a prompt on our file with the same greedy tokens."""

import math

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.gguf import load_gguf, save_gguf
from lmforge.inference.generate import SamplingConfig, generate_tokens
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer

from ..conftest import make_corpus

LLAMA = dict(**LLAMA_SWITCHES)
SIZES = dict(block_size=96, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=128)
GEMMA3 = dict(
    mlp="geglu", qk_norm=True, post_norms=True, scale_embeddings=True, d_head=32, rope_theta=1e6, norm_eps=1e-6,
    rope_local_theta=10000.0, attention_scale=32**-0.5, architecture="gemma3",
)  # fmt: skip
# Each case: (config switches, the GGUF architecture it is written as). Windows are shorter than the
# 8-token prompt plus 40 generated tokens, so decoding runs far past them.
ARCHITECTURES = {
    "llama3": (
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
        "llama",
    ),  # fmt: skip
    "mistral": (dict(sliding_window=8, architecture="mistral"), "llama"),
    "qwen2": (dict(qkv_bias=True, tie_embeddings=False, architecture="qwen2"), "qwen2"),
    "qwen3": (dict(qk_norm=True, d_head=24, rope_theta=1e6, architecture="qwen3"), "qwen3"),
    "qwen2-yarn": (
        dict(
            qkv_bias=True,
            architecture="qwen2",
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
        ),
        "qwen2",
    ),  # fmt: skip
    # llama.cpp's own layer pattern for gemma3: five sliding layers, then a full one
    "gemma3": (
        dict(
            GEMMA3,
            n_layers=6,
            sliding_window=6,
            layer_types=["sliding"] * 5 + ["full"],
            rope_scaling=dict(rope_type="linear", factor=4.0),
        ),  # (Gemma 3 4B+: of the full layers only)
        "gemma3",
    ),  # fmt: skip
    # any pattern, written per layer
    "gemma3-alternating": (dict(GEMMA3, sliding_window=5, layer_types=["sliding", "full"]), "gemma3"),
    "phi3": (dict(tie_embeddings=False, architecture="phi3"), "phi3"),
    # The rest of what lmforge exports, so every family's GGUF is known to load in llama.cpp (README: `llama-server`):
    "llama": (dict(), "llama"),
    "mistral-wide-window": (dict(sliding_window=64, architecture="mistral"), "llama"),  # 48 tokens fit in it
    "gpt2": (dict(norm="layernorm", mlp="gelu_tanh", positions="learned", bias=True, n_kv_heads=4), "gpt2"),
}


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([make_corpus(100)], vocab_size=300)


def random_model(vocab_size: int, switches: dict, seed: int = 0) -> Transformer:
    """Weights scaled so a layer's output matters as much as its input and the logits are decisive:
    greedy decoding then rarely meets a near-tie that rounding could flip."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**LLAMA, **SIZES, "vocab_size": vocab_size, **switches})
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[1]))
            else:  # norm weights near 1 (Gemma's stored as 1 + w, like ours), biases near 0
                parameter.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(parameter))
        model.token_embedding.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("case", ARCHITECTURES)
def test_round_trip_keeps_logits_and_switches(tmp_path, bpe, case):
    switches, architecture = ARCHITECTURES[case]
    model = random_model(bpe.vocab_size, switches)
    loaded, _ = load_gguf(save_gguf(model, bpe, tmp_path / f"{case}.gguf", "f32"))
    tokens = torch.randint(0, bpe.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # Llama 3's scaling comes back as the file's fp32 factors: last-bit differences
        assert (model(tokens)[0] - loaded(tokens)[0]).abs().max() < (1e-4 if case == "llama3" else 1e-5)
    for name in ("qkv_bias", "qk_norm", "post_norms", "scale_embeddings", "mlp", "head_dim", "sliding_window"):
        assert bool(getattr(loaded.config, name)) == bool(getattr(model.config, name)) or name in ("mlp", "head_dim")
        assert name not in ("mlp", "head_dim") or getattr(loaded.config, name) == getattr(model.config, name)
    assert [loaded.config.is_sliding(i) for i in range(model.config.n_layers)] == [
        model.config.is_sliding(i) for i in range(model.config.n_layers)
    ]
    assert loaded.config.architecture == (
        None if architecture in ("llama", "gpt2") else architecture
    )  # named by switches


def test_llama3_scaling_is_written_as_rope_freqs(tmp_path, bpe):
    """As llama.cpp's converter does: one divisor per frequency, 1 for the fast ones, `factor` for the slow."""
    from gguf import GGUFReader

    model = random_model(bpe.vocab_size, ARCHITECTURES["llama3"][0])
    reader = GGUFReader(save_gguf(model, bpe, tmp_path / "llama3.gguf", "f32"))
    factors = {t.name: t for t in reader.tensors}["rope_freqs.weight"].data
    assert len(factors) == model.config.head_dim // 2
    assert factors[0] == 1.0 and factors[-1] == 8.0 and np.all(np.diff(factors) >= 0)


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens` (one pass, fresh context)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


@pytest.mark.parametrize("case", ARCHITECTURES)
def test_llama_cpp_continues_our_file_with_the_same_greedy_tokens(tmp_path, bpe, case):
    """48 tokens (8 of prompt, 40 generated), past every sliding window: llama.cpp's logits at each
    position equal ours, and where its greedy choice differs from ours, its own top two logits there must
    be a near-tie (< 0.25 apart)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    switches, _ = ARCHITECTURES[case]
    if case == "mistral":
        pytest.skip("llama.cpp's llama architecture has no sliding window (it reads no such key)")
    model = random_model(bpe.vocab_size, switches)
    # (not named after the model: llama.cpp looks up Phi-3's own special tokens in a file whose general.name
    # says phi3, and our tiny vocabulary has none)
    path = save_gguf(model, bpe, tmp_path / "model.gguf", "f32")
    prompt = bpe.encode("ROMEO.\nGood night, sweet love")[:8]
    ours = prompt + list(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0)))
    assert len(ours) == 48
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:  # closed here: freed later by the garbage collector, at any allocation, it can crash the process
        theirs = llama_cpp_logits(llm, ours)
    finally:
        llm.close()
    with torch.no_grad():  # the logits themselves: a switch read wrongly moves them by 1-10 (f16 KV cache: ~0.005)
        assert np.abs(model(torch.tensor([ours]))[0][0].numpy() - theirs).max() < 0.05
    for position in range(len(prompt) - 1, len(ours) - 1):
        chosen = ours[position + 1]
        best = int(theirs[position].argmax())
        if best != chosen:
            top_two = np.sort(theirs[position])[-2:]
            assert top_two[1] - top_two[0] < 0.25, f"llama.cpp picks {best}, we {chosen} at {position}"
            break


def write_gguf(path, architecture: str, fields: dict, tensors: list[str]):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    for key, value in fields.items():
        writer.add_uint32(key, value)
    for name in tensors:
        writer.add_tensor(name, np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "architecture, fields, tensors, expected",
    [
        (
            "qwen3moe",
            {"qwen3moe.expert_count": 8},
            ["blk.0.ffn_gate_exps.weight"],
            "'qwen3moe' with mixture-of-experts",
        ),
        ("llama", {"llama.expert_count": 8}, ["blk.0.ffn_up_exps.weight"], "'llama' with mixture-of-experts"),
        ("clip", {}, ["v.blk.0.attn_q.weight"], "multimodal projector"),
        ("mamba", {}, ["token_embd.weight"], "'mamba' is not supported (supported: llama, qwen2, qwen3, gemma3"),
    ],
)
def test_unsupported_files_are_refused_by_name(tmp_path, architecture, fields, tensors, expected):
    path = write_gguf(tmp_path / f"{architecture}.gguf", architecture, fields, tensors)
    with pytest.raises(LmforgeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_gguf(path)


def test_export_refuses_switches_no_architecture_holds(tmp_path, bpe):
    model = random_model(bpe.vocab_size, dict(qk_norm=True, qkv_bias=True))  # Qwen3's norms with Qwen2's biases
    with pytest.raises(LmforgeError, match="GGUF export supports the published families"):
        save_gguf(model, bpe, tmp_path / "m.gguf", "f32")


def test_architecture_follows_the_switches_when_unnamed(tmp_path, bpe):
    """A model trained here names no published architecture: the first whose switches it has is used."""
    from gguf import GGUFReader

    model = random_model(bpe.vocab_size, dict(qk_norm=True))
    reader = GGUFReader(save_gguf(model, bpe, tmp_path / "m.gguf", "f32"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "qwen3"


@pytest.mark.parametrize("case", ["qwen2", "gemma3"])
def test_kept_quantized_blocks_decode_like_their_dequantized_values(tmp_path, bpe, case):
    """A Q8_0 file loaded as its blocks (native int8 kernels, q/k/v biases and norms beside them) and
    dequantised to fp32: the same greedy continuation past the sliding window, or a first difference
    where the fp32 model's top two logits are a near-tie (the kernels round activations to int8)."""
    model = random_model(bpe.vocab_size, ARCHITECTURES[case][0])
    path = save_gguf(model, bpe, tmp_path / "m.gguf", "q8_0")
    (kept, _), (dequantized, _) = load_gguf(path, keep_quantized=True), load_gguf(path)
    prompt = bpe.encode("ROMEO.\nGood night, sweet love")[:8]
    sampling = SamplingConfig(max_new_tokens=24, temperature=0)
    ours, reference = (list(generate_tokens(m, prompt, sampling)) for m in (kept, dequantized))
    if ours != reference:
        first = next(i for i, (a, b) in enumerate(zip(ours, reference)) if a != b)
        with torch.no_grad():
            top_two = dequantized(torch.tensor([prompt + reference[:first]]))[0][0, -1].topk(2).values
        assert top_two[0] - top_two[1] < 0.05, f"tokens part at {first} without a near-tie"


def test_tensors_the_model_has_no_place_for_are_refused(tmp_path, bpe, monkeypatch):
    """A variant of an architecture with tensors we would ignore (its maths silently wrong) stops instead."""
    from lmforge.formats import gguf

    writes = gguf.layer_tensors

    def with_an_extra_tensor(config, architecture):
        pairs, joined = writes(config, architecture)
        return [*pairs, ("attention_norm.weight", "attn_extra_norm.weight")], joined

    monkeypatch.setattr(gguf, "layer_tensors", with_an_extra_tensor)
    path = save_gguf(random_model(bpe.vocab_size, ARCHITECTURES["qwen3"][0]), bpe, tmp_path / "m.gguf", "f32")
    monkeypatch.setattr(gguf, "layer_tensors", writes)
    with pytest.raises(
        LmforgeError, match=r"tensors blk.0.attn_extra_norm.weight, .* have no place in lmforge's qwen3"
    ):
        load_gguf(path)


@pytest.mark.parametrize(
    "family", ["llama3", "llama-yarn", "mistral", "qwen2", "qwen2-tied", "qwen3", "gemma3", "phi3"]
)
def test_transformers_models_convert_to_gguf_with_their_logits(tmp_path, family):
    """The issue's chain: a tiny random transformers model (tests/formats/test_architectures.py's, with
    sliding windows, per-layer patterns, Gemma's query_pre_attn_scalar and soft cap) saved as an HF
    folder, loaded here, written as GGUF and read back: transformers' logits within 1e-4."""
    from lmforge.formats.hf import load_hf

    from .test_architectures import VOCAB, hf_logits, random_hf_model

    reference = random_hf_model(family)
    reference.save_pretrained(tmp_path / "hf")
    BPETokenizer.train([make_corpus(100)], vocab_size=VOCAB).hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    model, tokenizer = load_hf(tmp_path / "hf")
    loaded, _ = load_gguf(save_gguf(model, tokenizer, tmp_path / "m.gguf", "f32"))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    expected = hf_logits(reference, tokens)
    with torch.no_grad():
        assert (loaded(tokens)[0] - expected).abs().max() < 1e-4
    assert loaded.config.family == model.config.family
    # llama.cpp computes the same where it has every switch (no windows on llama/qwen2/phi3, no soft cap or
    # query_pre_attn_scalar of its own on gemma3)
    llama_cpp = pytest.importorskip("llama_cpp") if family in ("llama3", "llama-yarn", "qwen2-tied") else None
    if llama_cpp is not None:
        llm = llama_cpp.Llama(
            model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, logits_all=True, verbose=False
        )
        try:
            theirs = llama_cpp_logits(llm, tokens[0].tolist())
        finally:
            llm.close()
        assert np.abs(theirs - expected[0].numpy()).max() < 0.05
