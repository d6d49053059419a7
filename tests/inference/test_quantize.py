"""Weight-only int8/int4 quantisation: formats, layers, whole models, checkpoints, the CLI report."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.evaluation.quantization import kl_divergence_report, leading_tokens
from lmforge.formats.checkpoint import save_model
from lmforge.formats.loading import load
from lmforge.inference import kernels
from lmforge.inference.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    bf16_products,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer, CharTokenizer

from ..conftest import make_corpus


def llama_model(seed: int = 0, d_model: int = 64) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=96, block_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=d_model, d_mlp=128,
        **LLAMA_SWITCHES,
    )  # fmt: skip
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: peaked predictions make KL informative
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.1)
    return model


def test_int4_packing_round_trips_in_the_gguf_nibble_layout():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed), codes)
    # low nibble of byte j is weight j, high nibble is weight j + 16 (per 32-weight run)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 16]) << 4)


def test_quantisation_error_is_at_most_half_a_step():
    weight = torch.randn(8, 128)
    codes, scale = quantize_int8(weight, 32)
    step = scale.repeat_interleave(32, dim=1)
    assert ((dequantize_int8(codes, scale) - weight).abs() <= step / 2 + 1e-6).all()
    packed, scale, offset = quantize_int4(weight, 64)
    assert scale.dtype == offset.dtype == torch.float16
    step = scale.float().repeat_interleave(64, dim=1)
    # plus fp16's rounding of the offset and of the top of the range, at the ends of each group
    fp16_rounding = 2**-10 * weight.abs().amax()
    assert ((dequantize_int4(packed, scale, offset) - weight).abs() <= step / 2 + fp16_rounding).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_prefill_path_is_the_dequantized_matmul(bits, bias, monkeypatch):
    monkeypatch.setattr(kernels, "bf16_matmul_is_fast", lambda: False)
    linear = nn.Linear(64, 40, bias=bias)
    layer = QuantizedLinear.from_linear(linear, bits, 32)
    x = torch.randn(3, 40, 64)  # 120 rows: the dequantise + matmul path (above NATIVE_MAX_ROWS)
    with torch.no_grad():
        expected = F.linear(x, layer.dequantize(), linear.bias)
        torch.testing.assert_close(layer(x), expected)
        # the weight in slabs of 9 rows: 40 = 4 x 9 + 4, so the last slab is short
        monkeypatch.setattr("lmforge.inference.quantize.PREFILL_SLAB_ELEMENTS", 9 * 64)
        torch.testing.assert_close(layer(x), expected)
        columns = torch.randn(3, 40, 128)[..., :64]  # rows 128 apart, as the in-place SwiGLU hands `down`
        torch.testing.assert_close(layer(columns), layer(columns.contiguous()))
        torch.testing.assert_close(layer.dequantize(rows=slice(9, 18)), layer.dequantize()[9:18])
        # a single row takes the kernel path (or the same matmul without kernels): close to it
        torch.testing.assert_close(
            layer(x[:1, :1]), F.linear(x[:1, :1], layer.dequantize(), linear.bias), rtol=0.05, atol=0.05
        )


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_prefill_path_rounds_only_x_the_weight_and_the_products(bits, bias, monkeypatch):
    """Inside `bf16_products`, where bf16 matmuls are fast, prefill multiplies bf16(x) by bf16(W) and
    rounds each product to bf16: within one bf16 ulp (2^-8 relative; oneDNN's rounding of the fp32 sums
    is not always to nearest) of the exact product of the rounded operands."""
    monkeypatch.setattr(kernels, "bf16_matmul_is_fast", lambda: True)
    linear = nn.Linear(64, 40, bias=bias)
    layer = QuantizedLinear.from_linear(linear, bits, 32)
    x = torch.randn(120, 64)
    with torch.no_grad():
        weight = layer.dequantize().bfloat16().double()
        exact = x.bfloat16().double() @ weight.T
        monkeypatch.setattr("lmforge.inference.quantize.PREFILL_SLAB_ELEMENTS", 9 * 64)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), linear.bias))  # outside: fp32
        with bf16_products():
            product = layer(x).double() - (0 if linear.bias is None else linear.bias.double())
            layer.exact_activations = True  # the LM head: fp32 even inside
            torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), linear.bias))
    assert ((product - exact).abs() <= 2**-8 * exact.abs() + 1e-6 * exact.abs().max()).all()


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="group size 48"):
        QuantizedLinear(64, 8, 4, 48, bias=False)


@pytest.mark.parametrize(("bits", "kl_bound"), [(8, 0.002), (4, 0.06)])
def test_quantized_model_stays_close_to_fp32(bits, kl_bound):
    reference = llama_model()
    quantized = quantize_model(llama_model(), bits)
    assert isinstance(quantized.blocks[0].mlp.up, QuantizedLinear) and quantized.blocks[0].mlp.up.bits == bits
    assert isinstance(quantized.lm_head, QuantizedLinear) and quantized.lm_head.bits == 8  # head stays int8
    assert isinstance(quantized.token_embedding, QuantizedEmbedding)
    assert weight_bytes(quantized) < weight_bytes(reference) / (3.0 if bits == 8 else 4.0)
    tokens = torch.randint(0, 96, (200,))
    report = kl_divergence_report(reference, quantized, tokens, window=64)
    assert 0 <= report["mean_kl"] < kl_bound
    broken = quantize_model(llama_model(), bits)
    broken.blocks[0].mlp.up.scale.mul_(-1)  # a wrong sign in one layer must show up in the KL
    assert kl_divergence_report(reference, broken, tokens, window=64)["mean_kl"] > 5 * report["mean_kl"]


def test_quantized_checkpoint_loads_directly_with_the_same_outputs(tmp_path):
    model = quantize_model(llama_model(), 4, 32)
    tokenizer = CharTokenizer("".join(chr(c) for c in range(32, 32 + 90)))
    save_model(tmp_path / "q4", model, tokenizer)
    loaded, _ = load(tmp_path / "q4")
    assert isinstance(loaded.blocks[1].attention.qkv, QuantizedLinear) and loaded.blocks[1].attention.qkv.bits == 4
    tokens = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], loaded(tokens)[0])


def test_int4_checkpoints_with_fp32_scales_load_as_fp16(tmp_path):
    """Checkpoints written before int4 scales moved to fp16 hold fp32 ones; loading converts them."""
    from safetensors.torch import load_file, save_file

    model = quantize_model(llama_model(), 4, 32)
    save_model(tmp_path / "q4", model, CharTokenizer("".join(chr(c) for c in range(32, 32 + 90))))
    weights = load_file(tmp_path / "q4" / "model.safetensors")
    old = {name: value.float() if name.endswith((".scale", ".offset")) else value for name, value in weights.items()}
    save_file(old, tmp_path / "q4" / "model.safetensors")
    loaded, _ = load(tmp_path / "q4")
    layer = loaded.blocks[0].mlp.up
    assert layer.scale.dtype == layer.offset.dtype == torch.float16
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], loaded(tokens)[0])


def test_quantize_cli_writes_a_checkpoint_and_reports_kl(tmp_path):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
    model = llama_model()
    config = model.config
    model = Transformer(ModelConfig(**{**config.to_dict(), "vocab_size": tokenizer.vocab_size}))
    save_model(tmp_path / "fp32", model, tokenizer)
    text = tmp_path / "held_out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "quantize", str(tmp_path / "fp32"), "--bits", "8", "--out",
         str(tmp_path / "int8"), "--eval-text", str(text), "--json", str(tmp_path / "report.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mean KL" in result.stdout and "perplexity" in result.stdout
    progress = (
        result.stderr.splitlines()
    )  # fit's progress bar, one per slow stage (2 blocks x 4 + head layers; 15 windows of 64 tokens)
    layers, scoring = progress.index("quantising layers"), progress.index("scoring both models on 900 tokens")
    assert progress[layers + 1].startswith("9/9 ━") and progress[scoring + 1].startswith("15/15 ━")
    loaded, _ = load(tmp_path / "int8")
    assert isinstance(loaded.blocks[0].mlp.down, QuantizedLinear)


def test_sizes_are_shown_in_a_unit_that_fits():
    from lmforge.cli import format_bytes

    # a small model's weights were "0 MB -> 0 MB"
    assert [format_bytes(size) for size in (812, 45_300, 98_200_000, 1_420_000_000)] == [
        "812 B",
        "45.3 KB",
        "98.2 MB",
        "1.4 GB",
    ]


def test_leading_tokens_are_the_texts_first_tokens_from_a_short_prefix():
    text = make_corpus(2000)
    tokenizer = BPETokenizer.train([make_corpus(100)], vocab_size=300)
    encoded = []
    original = tokenizer.encode
    tokenizer.encode = lambda part: encoded.append(len(part)) or original(part)
    assert leading_tokens(tokenizer, text, 500) == original(text)[:500]
    assert max(encoded) < len(text) // 10
    assert leading_tokens(tokenizer, "short text", 500) == original("short text")
