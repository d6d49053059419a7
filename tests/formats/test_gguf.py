"""GGUF: export → import round trips, transformers' GGUF reader as the reference, bad files."""

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.gguf import _permute_rope, _unpermute_rope, load_gguf, save_gguf
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer, load_tokenizer

from ..conftest import make_corpus

LLAMA = dict(**LLAMA_SWITCHES, n_kv_heads=2, rope_theta=1000.0)
GPT2 = dict(norm="layernorm", mlp="gelu_tanh", positions="learned", bias=True)


@pytest.fixture(scope="module")
def bpe():
    tokenizer = BPETokenizer.train([make_corpus(100)], vocab_size=300)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def random_model(vocab_size, family, tie=True):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=vocab_size, block_size=32, n_layers=2, n_heads=4, d_model=64, tie_embeddings=tie, **family
        )
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def max_logit_difference(a, b, vocab_size):
    tokens = torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (a(tokens)[0] - b(tokens)[0]).abs().max().item()


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dtype, tolerance", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 3e-2)])
def test_round_trip(tmp_path, bpe, family, dtype, tolerance):
    model = random_model(bpe.vocab_size, family, tie=dtype != "f16")
    path = save_gguf(model, bpe, tmp_path / "m.gguf", dtype)
    loaded, tokenizer = load_gguf(path)
    assert loaded.config.tie_embeddings == model.config.tie_embeddings
    assert max_logit_difference(model, loaded, bpe.vocab_size) <= tolerance
    text = "the king, my lord — ü 🙂"
    assert tokenizer.encode(text) == bpe.encode(text) and tokenizer.decode(bpe.encode(text)) == text
    assert (tokenizer.eos_token, tokenizer.chat_template) == (bpe.eos_token, bpe.chat_template)


def test_gguf_reader_sees_the_tensors(tmp_path, bpe):
    from gguf import GGUFReader

    save_gguf(random_model(bpe.vocab_size, LLAMA), bpe, tmp_path / "m.gguf", "q8_0")
    reader = GGUFReader(tmp_path / "m.gguf")
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.1.ffn_norm.weight"] == "F32"
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"


def test_transformers_reads_our_llama_gguf_identically(tmp_path, bpe):
    """transformers' own GGUF loader undoes llama.cpp's Q/K permutation: an independent check of ours."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = random_model(bpe.vocab_size, LLAMA, tie=False)
    save_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    tokens = torch.randint(0, bpe.vocab_size, (2, 20))
    with torch.no_grad():
        assert (model(tokens)[0] - reference(tokens).logits).abs().max() < 1e-5


def test_rope_permutation_inverts():
    weight = torch.randn(4 * 16, 8)
    assert torch.equal(_unpermute_rope(_permute_rope(weight, 4), 4), weight)
    assert not torch.equal(_permute_rope(weight, 4), weight)


def test_trained_char_model_exports_with_its_tokenizer(tmp_path, char_dataset):
    char = load_tokenizer(char_dataset / "tokenizer.json")
    model = random_model(char.vocab_size, LLAMA)
    loaded, tokenizer = load_gguf(save_gguf(model, char, tmp_path / "char.gguf", "f32"))
    text = "KING.\nGood night, sweet prince — ü 🙂"
    assert tokenizer.encode(text) == char.encode(text)
    assert tokenizer.decode(char.encode(text)) == text
    assert max_logit_difference(model, loaded, char.vocab_size) == 0.0


def test_damaged_files_are_clear_errors(tmp_path, bpe):
    with pytest.raises(LmforgeError, match="no such file"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LmforgeError, match="not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    path = save_gguf(random_model(bpe.vocab_size, LLAMA), bpe, tmp_path / "m.gguf", "f32")
    data = path.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(LmforgeError, match="truncated.gguf"):
        load_gguf(tmp_path / "truncated.gguf")


def test_unknown_architecture_is_a_clear_error(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LmforgeError, match="architecture 'bert' is not supported"):
        load_gguf(tmp_path / "bert.gguf")


def write_raw_tensors(path, tensors):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "type_name, tolerance", [("BF16", 1e-2), ("F16", 1e-3), ("Q8_0", 2e-2), ("Q4_0", 0.3), ("Q4_1", 0.3)]
)
def test_dequantised_tensors_keep_shape_and_values(tmp_path, type_name, tolerance):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize, quantize

    from lmforge.formats.gguf import _dequantize

    quant_type = GGMLQuantizationType[type_name]
    original = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    data = original.astype(np.float16) if type_name == "F16" else quantize(original, quant_type)
    write_raw_tensors(tmp_path / "t.gguf", {"w": (data, None if type_name == "F16" else quant_type)})
    tensor = GGUFReader(tmp_path / "t.gguf").tensors[0]
    values = _dequantize(tensor)
    assert values.shape == (6, 64) and values.dtype == torch.float32
    assert (values - torch.from_numpy(original)).abs().max() < tolerance
    # Our torch dequantiser for Q4_0/Q4_1/Q8_0 agrees bit for bit with llama.cpp's reference (gguf package).
    reference = dequantize(tensor.data, tensor.tensor_type).reshape(6, 64)
    assert torch.equal(values, torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32)))


def test_k_quant_blocks_decode_to_known_values(tmp_path):
    """Hand-built Q4_K and Q6_K blocks (llama.cpp's layouts) with every scale 1 and known codes."""
    from gguf import GGMLQuantizationType, GGUFReader

    from lmforge.formats.gguf import _dequantize

    # Q4_K: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit codes.
    scales = bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])  # every sub-block: scale 1, min 0
    q4k = np.frombuffer(
        np.float16(0.5).tobytes() + np.float16(0).tobytes() + scales + bytes([0x73] * 128), dtype=np.uint8
    )
    # Q6_K: 128 bytes low bits, 64 bytes high bits, 16 int8 scales, d (f16); code 0 means -32.
    q6k = np.frombuffer(bytes(128) + bytes(64) + bytes([1] * 16) + np.float16(0.25).tobytes(), dtype=np.uint8)
    write_raw_tensors(
        tmp_path / "k.gguf",
        {"q4k": (np.stack([q4k, q4k]), GGMLQuantizationType.Q4_K), "q6k": (q6k[None, :], GGMLQuantizationType.Q6_K)},
    )
    tensors = {t.name: t for t in GGUFReader(tmp_path / "k.gguf").tensors}
    q4 = _dequantize(tensors["q4k"])
    assert q4.shape == (2, 256)
    # In each 64-value chunk the low nibbles (3) come first, then the high ones (7); times d = 0.5.
    expected = torch.tensor(([1.5] * 32 + [3.5] * 32) * 4)
    assert torch.equal(q4[0], expected) and torch.equal(q4[1], expected)
    q6 = _dequantize(tensors["q6k"])
    assert q6.shape == (1, 256) and torch.equal(q6, torch.full((1, 256), -8.0))
