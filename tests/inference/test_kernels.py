"""Native decode kernels against PyTorch references (skipped where they cannot be built)."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.inference import kernels
from lmforge.inference.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from lmforge.model import apply_rope, rope_tables


def test_kernels_build_wherever_a_compiler_and_avx2_exist():
    """Guards against a kernel source that no longer compiles: that would silently mean the slow path."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None or not kernels._cpu_supports_kernels():
        pytest.skip("no C compiler or no AVX2/FMA/F16C here")
    assert kernels.available()


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable (no C compiler or AVX2)")


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 2, 5, 9])
@pytest.mark.parametrize("inner", [32, 37, 576])
@needs_kernels
def test_matvec_f32_matches_linear(rows, inner):
    x, weight, bias = torch.randn(rows, inner), torch.randn(67, inner), torch.randn(67)
    torch.testing.assert_close(kernels.matvec_f32(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.matvec_f32(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 4, 6])
@pytest.mark.parametrize("group_size", [32, 64, 192])
@needs_kernels
def test_quantized_matvecs_match_the_dequantized_product(rows, group_size):
    """x is rounded to int8 per 32 values inside the q8/q4 kernels: ~0.5% of the largest output.
    The exact q8 variant keeps x in fp32."""
    torch.manual_seed(rows * group_size)
    x, weight, bias = torch.randn(rows, 384), torch.randn(70, 384), torch.randn(70)
    codes, scale = quantize_int8(weight, group_size)
    reference = F.linear(x, dequantize_int8(codes, scale), bias)
    assert relative_error(kernels.matvec_q8(x, codes, scale, group_size, bias), reference) < 0.015
    torch.testing.assert_close(
        kernels.matvec_q8_exact(x, codes, scale, group_size, bias), reference, rtol=1e-5, atol=1e-4
    )
    packed, scale, offset = quantize_int4(weight, group_size)
    reference = F.linear(x, dequantize_int4(packed, scale, offset), bias)
    assert relative_error(kernels.matvec_q4(x, packed, scale, offset, group_size, bias), reference) < 0.015


@needs_kernels
def test_the_exact_q8_head_gives_each_row_of_a_batch_what_it_gets_alone():
    """Rows of x go four at a time (each weight widened once for four): a batched server step's logits
    are each sequence's own, to the bit, so greedy picks do not depend on who else is decoding."""
    torch.manual_seed(3)
    x, weight, bias = torch.randn(11, 384), torch.randn(70, 384), torch.randn(70)
    codes, scale = quantize_int8(weight, 64)
    together = kernels.matvec_q8_exact(x, codes, scale, 64, bias)
    alone = torch.cat([kernels.matvec_q8_exact(x[row : row + 1], codes, scale, 64, bias) for row in range(11)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("inner", [384, 416])  # 416: an odd number of 32-weight blocks
@pytest.mark.parametrize("group_size", [32, 64])
@needs_kernels
def test_the_q4_kernel_gives_each_row_of_a_batch_what_it_gets_alone(inner, group_size):
    """One row, four-row tiles and a short tile (and, where the CPU has it, the AVX-512 VNNI path)
    sum each row in one order: a sequence's logits do not depend on who else is decoding."""
    if inner % group_size:
        pytest.skip("the group size must divide the width")
    torch.manual_seed(inner + group_size)
    x, weight, bias = torch.randn(11, inner), torch.randn(70, inner), torch.randn(70)
    packed, scale, offset = quantize_int4(weight, group_size)
    together = kernels.matvec_q4(x, packed, scale, offset, group_size, bias)
    alone = torch.cat(
        [kernels.matvec_q4(x[row : row + 1], packed, scale, offset, group_size, bias) for row in range(11)]
    )
    assert torch.equal(together, alone)
    reference = F.linear(x, dequantize_int4(packed, scale, offset), bias)
    assert relative_error(together, reference) < 0.015


@pytest.mark.parametrize("group_size", [32, 64, 192])
@needs_kernels
def test_native_dequantisation_equals_the_pytorch_reference(group_size):
    weight = torch.randn(70, 384)
    packed, scale, offset = quantize_int4(weight, group_size)
    assert torch.equal(kernels.dequantize_q4(packed, scale, offset, group_size), dequantize_int4(packed, scale, offset))
    codes, scale8 = quantize_int8(weight, group_size)
    assert torch.equal(kernels.dequantize_q8(codes, scale8, group_size), dequantize_int8(codes, scale8))
    # into bf16 (prefill's slabs where bf16 matmuls are fast): rounded to nearest even, as .bfloat16()
    halves = torch.empty(70, 384, dtype=torch.bfloat16)
    assert torch.equal(
        kernels.dequantize_q8(codes, scale8, group_size, halves), dequantize_int8(codes, scale8).bfloat16()
    )
    kernels.dequantize_q4(packed, scale, offset, group_size, halves)
    assert torch.equal(halves, dequantize_int4(packed, scale, offset).bfloat16())
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        kernels.dequantize_q8(codes, scale8, group_size, torch.empty(70, 384, dtype=torch.float16))
    with pytest.raises(TypeError, match="float16"):  # fp32 bits read as halves would be silent garbage
        kernels.dequantize_q4(packed, scale.float(), offset.float(), group_size)


@needs_kernels
def test_each_row_of_a_batch_gets_exactly_its_single_row_result():
    """Batched decoding must equal one-at-a-time decoding, so the multi-row tiles may not change the sums."""
    x, weight = torch.randn(7, 256), torch.randn(50, 256)
    packed, scale, offset = quantize_int4(weight, 64)
    codes, scale8 = quantize_int8(weight)
    together_q4 = kernels.matvec_q4(x, packed, scale, offset, 64, None)
    together_q8 = kernels.matvec_q8(x, codes, scale8, 256, None)
    together_f32 = kernels.matvec_f32(x, weight, None)
    for row in range(7):
        one = x[row : row + 1]
        assert torch.equal(kernels.matvec_q4(one, packed, scale, offset, 64, None)[0], together_q4[row])
        assert torch.equal(kernels.matvec_q8(one, codes, scale8, 256, None)[0], together_q8[row])
        assert torch.equal(kernels.matvec_f32(one, weight, None)[0], together_f32[row])


@needs_kernels
def test_norms_and_swiglu_match_torch():
    x, delta, weight = torch.randn(3, 96), torch.randn(3, 96), torch.rand(96) + 0.5
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, (96,), weight, 1e-5))
    residual = x.clone()
    normed = kernels.add_rms_norm(residual, delta, weight, 1e-6)
    torch.testing.assert_close(residual, x + delta)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (96,), weight, 1e-6))
    gate_up = torch.randn(2, 2 * 40)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate_up[:, :40]) * gate_up[:, 40:])


@needs_kernels
def test_attention_decode_matches_rope_plus_sdpa():
    """Two rows at different positions in cache slots 2 and 0; GQA with 6 query and 2 KV heads."""
    heads, kv_heads, head_dim, capacity = 6, 2, 16, 12
    cos, sin = rope_tables(head_dim, 64, 10000.0)
    keys, values = torch.randn(3, kv_heads, capacity, head_dim), torch.randn(3, kv_heads, capacity, head_dim)
    qkv = torch.randn(2, (heads + 2 * kv_heads) * head_dim)
    slots, positions = torch.tensor([2, 0]), torch.tensor([5, 9])
    expected_keys, expected_values = keys.clone(), values.clone()
    out = kernels.attention_decode(qkv.clone(), heads, kv_heads, slots, positions, keys, values, cos, sin)
    for row in range(2):
        slot, position = int(slots[row]), int(positions[row])
        q, k, v = qkv[row].split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        q = apply_rope(q.view(1, heads, 1, head_dim), cos[position], sin[position])
        k = apply_rope(k.view(1, kv_heads, 1, head_dim), cos[position], sin[position])
        expected_keys[slot, :, position], expected_values[slot, :, position] = k[0, :, 0], v.view(kv_heads, head_dim)
        cached_k = expected_keys[slot : slot + 1, :, : position + 1].repeat_interleave(heads // kv_heads, dim=1)
        cached_v = expected_values[slot : slot + 1, :, : position + 1].repeat_interleave(heads // kv_heads, dim=1)
        reference = F.scaled_dot_product_attention(q, cached_k, cached_v).reshape(-1)
        torch.testing.assert_close(out[row], reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, expected_keys)
    torch.testing.assert_close(values, expected_values)


@needs_kernels
def test_gelu_tanh_mul_matches_torch():
    gate_up = torch.randn(3, 2 * 40) * 3
    reference = F.gelu(gate_up[:, :40], approximate="tanh") * gate_up[:, 40:]
    torch.testing.assert_close(kernels.gelu_tanh_mul(gate_up), reference)


@needs_kernels
@pytest.mark.parametrize("window", [None, 4])
def test_attention_decode_with_qk_norms_scale_and_window(window):
    """Qwen3 / Gemma 3 attention: per-head RMSNorm of q and k before RoPE, a scale of its own, and a
    sliding window: a row past the window sees only its last `window` positions."""
    heads, kv_heads, head_dim, capacity, scale = 4, 2, 24, 16, 0.3
    cos, sin = rope_tables(head_dim, 64, 1e6)
    q_norm, k_norm = torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5
    keys, values = torch.randn(2, kv_heads, capacity, head_dim), torch.randn(2, kv_heads, capacity, head_dim)
    qkv = torch.randn(2, (heads + 2 * kv_heads) * head_dim)
    slots, positions = torch.tensor([1, 0]), torch.tensor([9, 2])
    expected_keys = keys.clone()
    out = kernels.attention_decode(
        qkv.clone(), heads, kv_heads, slots, positions, keys, values, cos, sin, q_norm, k_norm, 1e-6, scale, window
    )
    for row in range(2):
        slot, position = int(slots[row]), int(positions[row])
        q, k, v = qkv[row].split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        q = F.rms_norm(q.view(1, heads, 1, head_dim), (head_dim,), q_norm, 1e-6)
        k = F.rms_norm(k.view(1, kv_heads, 1, head_dim), (head_dim,), k_norm, 1e-6)
        q, k = apply_rope(q, cos[position], sin[position]), apply_rope(k, cos[position], sin[position])
        expected_keys[slot, :, position] = k[0, :, 0]
        first = 0 if window is None else max(0, position - window + 1)
        cached_k = expected_keys[slot : slot + 1, :, first : position + 1].repeat_interleave(2, dim=1)
        cached_v = values[slot : slot + 1, :, first : position + 1].repeat_interleave(2, dim=1)
        reference = F.scaled_dot_product_attention(q, cached_k, cached_v, scale=scale).reshape(-1)
        torch.testing.assert_close(out[row], reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, expected_keys)
