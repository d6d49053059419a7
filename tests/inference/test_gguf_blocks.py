"""Weights kept in llama.cpp's block formats (Q4_K, Q5_K, Q6_K, Q5_0, ...): the kernels in kquants.c and
the layers around them, against the gguf package's dequantisation."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.inference import kernels
from lmforge.inference.engine import DecodePlan, decode_step
from lmforge.inference.quantize import (
    GGUF_BLOCK_TYPES,
    QuantizedLinear,
    QuantizedTensor,
    dequantize_blocks,
    model_from_weights,
    model_weights,
    quantize_int8,
    segment_table,
)
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable (no C compiler or AVX2)")

# where each type keeps its fp16 scale(s): (byte offset, how many halves); ggml-common.h's layouts
HALF_FIELDS = {"Q4_0": (0, 1), "Q4_1": (0, 2), "Q5_0": (0, 1), "Q5_1": (0, 2), "Q8_0": (0, 1)}
HALF_FIELDS |= {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, 1), "Q2_K": (80, 2), "Q3_K": (108, 1)}


def random_gguf_blocks(type_name: str, rows: int, columns: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    """Valid blocks of `type_name` (rows, row bytes): random codes, small finite fp16 scales. The
    gguf package cannot quantise into K-quants, so any byte pattern with finite scales will do."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    rng = np.random.default_rng(seed)
    weights, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, size=(rows, columns // weights, size), dtype=np.uint8)
    start, count = HALF_FIELDS[type_name]
    halves = rng.uniform(-scale, scale, size=(rows, columns // weights, count)).astype(np.float16)
    blocks[..., start : start + 2 * count] = halves.view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_dequantized(type_name: str, blocks: np.ndarray) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(blocks, GGMLQuantizationType[type_name]), dtype=np.float32))


def block_tensor(type_name: str, rows: int, columns: int, seed: int = 0, scale: float = 0.01) -> QuantizedTensor:
    blocks = torch.from_numpy(random_gguf_blocks(type_name, rows, columns, seed, scale))
    return QuantizedTensor.from_blocks(blocks, [(type_name, rows)], columns)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("type_name", list(GGUF_BLOCK_TYPES))
def test_dequantisation_equals_the_gguf_package(type_name):
    blocks = random_gguf_blocks(type_name, 7, 512)
    reference = gguf_dequantized(type_name, blocks)
    assert torch.equal(dequantize_blocks(torch.from_numpy(blocks).reshape(-1), ((type_name, 7),), 512), reference)
    if kernels.available():
        native = kernels.dequantize_blocks(
            torch.from_numpy(blocks).reshape(-1), segment_table(((type_name, 7),)), 512, slice(None)
        )
        assert torch.equal(native, reference)
        rows = kernels.dequantize_blocks(
            torch.from_numpy(blocks).reshape(-1), segment_table(((type_name, 7),)), 512, slice(2, 5)
        )
        assert torch.equal(rows, reference[2:5])
        halves = torch.empty(3, 512, dtype=torch.bfloat16)  # prefill's bf16 slabs: the values rounded
        kernels.dequantize_blocks(torch.from_numpy(blocks).reshape(-1), segment_table(((type_name, 7),)), 512,
                                  slice(2, 5), halves)  # fmt: skip
        assert torch.equal(halves, reference[2:5].bfloat16())


@pytest.mark.parametrize("type_name", list(GGUF_BLOCK_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 6])
@needs_kernels
def test_block_matvec_matches_the_gguf_dequantised_matmul(type_name, rows):
    """x is rounded to int8 per 32 values on the way in (as llama.cpp rounds to Q8), hence ~0.5%."""
    blocks = random_gguf_blocks(type_name, 45, 768, seed=rows)
    weight = gguf_dequantized(type_name, blocks)
    x, bias = torch.randn(rows, 768), torch.randn(45)
    table = segment_table(((type_name, 45),))
    result = kernels.matvec_blocks(x, torch.from_numpy(blocks).reshape(-1), table, 45, bias)
    reference = F.linear(x, weight, bias)
    assert relative_error(result, reference) < 0.015
    # x whose rounding to int8 is exact (each run of 32 peaks at 127): then only summation order differs
    exact = torch.randint(-127, 128, (rows, 768)).float()
    exact[:, ::32] = 127
    result = kernels.matvec_blocks(exact, torch.from_numpy(blocks).reshape(-1), table, 45, None)
    assert relative_error(result, exact @ weight.T) < 1e-5


def mixed_parts() -> list[QuantizedTensor]:
    """q, k, v as a Q4_K_M file may hold them: Q5_0, Q4_K, and int8 (a Q8_0 tensor as it loads)."""
    codes, scale = quantize_int8(torch.randn(24, 512) * 0.05, 32)
    v = QuantizedTensor(8, 32, codes, scale.half().float())  # Q8_0 scales are fp16
    return [block_tensor("Q5_0", 40, 512, 1), block_tensor("Q4_K", 16, 512, 2), v]


def test_rows_of_several_types_join_as_blocks_and_keep_their_values():
    q, k, v = mixed_parts()
    fused = QuantizedTensor.cat([q, k, v])
    assert fused.segments == (("Q5_0", 40), ("Q4_K", 16), ("Q8_0", 24)) and fused.shape == (80, 512)
    expected = torch.cat([q.dequantize(), k.dequantize(), v.dequantize()])
    assert torch.equal(fused.dequantize(), expected)
    order = torch.randperm(80)
    assert torch.equal(fused.index_rows(order).dequantize(), expected[order])
    # parts in one non-block format with nothing in common fall back to fp32
    int4 = QuantizedTensor(
        4, 64, torch.zeros(3, 256, dtype=torch.uint8), torch.ones(3, 8).half(), torch.zeros(3, 8).half()
    )
    assert isinstance(QuantizedTensor.cat([q, int4]), torch.Tensor)


@needs_kernels
def test_a_block_layer_decodes_prefills_and_rebuilds_from_its_layout():
    weight = QuantizedTensor.cat(mixed_parts())
    layer = QuantizedLinear(512, 80, 0, 32, bias=True, segments=weight.segments)
    layer.codes, layer.bias.data = weight.codes, torch.randn(80)
    reference_weight = weight.dequantize()
    for rows in (1, 4, 40, 200):  # kernels up to NATIVE_MAX_ROWS, dequantised slabs above
        x = torch.randn(rows, 512)
        assert relative_error(layer(x), F.linear(x, reference_weight, layer.bias)) < 0.015
    assert torch.equal(layer.weight_tensor().dequantize(), reference_weight)
    with pytest.raises(ValueError, match="rows"):
        QuantizedLinear(512, 81, 0, 32, bias=False, segments=weight.segments)
    with pytest.raises(ValueError, match="whole blocks"):
        QuantizedLinear(288, 80, 0, 32, bias=False, segments=(("Q4_K", 80),))


def tiny_llama(tie_embeddings: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=96, block_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=256, d_mlp=512,
        **LLAMA_SWITCHES, tie_embeddings=tie_embeddings,
    )  # fmt: skip


def test_a_tied_block_embedding_is_the_lm_head_and_looks_up_its_rows():
    config = tiny_llama(tie_embeddings=True)
    weights = dict(Transformer(config).state_dict())
    table = block_tensor("Q6_K", 96, 256)
    weights["token_embedding.weight"] = table
    model = model_from_weights(config, weights)
    assert model.lm_head.segments == (("Q6_K", 96),)
    tokens = torch.tensor([[3, 95, 3, 0]])
    assert torch.equal(model.token_embedding(tokens)[0], table.dequantize()[[3, 95, 3, 0]])


def block_model() -> tuple[Transformer, Transformer]:
    """A tiny Llama whose every matrix is GGUF blocks (mixed in q|k|v), and its fp32 twin."""
    config = tiny_llama(tie_embeddings=False)
    reference = Transformer(config).eval()
    weights = {name: value.detach().clone() for name, value in reference.state_dict().items()}
    types = iter(["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"] * 4)
    for name, value in list(weights.items()):
        if value.ndim == 2 and name != "token_embedding.weight":
            if name.endswith("attention.qkv.weight"):  # q+k in one type, v in another, as llama.cpp files do
                q_k = block_tensor(next(types), 256 + 128, 256, seed=len(name), scale=0.002)
                weights[name] = QuantizedTensor.cat([q_k, block_tensor(next(types), 128, 256, seed=1, scale=0.002)])
            else:  # scales small enough that activations stay of order one through the layers
                weights[name] = block_tensor(next(types), value.shape[0], value.shape[1], len(name), scale=0.002)
    model = model_from_weights(config, weights).eval()
    reference.load_state_dict(
        {
            name: value.dequantize() if isinstance(value, QuantizedTensor) else value
            for name, value in model_weights(model).items()
        }
    )
    return model, reference


@needs_kernels
def test_the_native_decode_plan_runs_block_layers_like_the_model_itself():
    """The plan's calls (segment tables, scratch, pointers) against the model's own forward, which runs
    each layer through the same kernel; and roughly the fp32 twin (random blocks make a chaotic model,
    so int8-rounded activations move its logits by a few percent)."""
    torch.manual_seed(0)
    model, reference = block_model()
    assert DecodePlan.fits(model)
    tokens = torch.randint(0, 96, (1, 12))
    cache = KVCache(model.config, 1, 32)
    with torch.no_grad():
        model.hidden_states(tokens[:, :-1], cache)
        logits = decode_step(model, tokens[:, -1:], cache)[0]
        assert relative_error(logits, model(tokens)[0][0, -1]) < 1e-4
        assert relative_error(logits, reference(tokens)[0][0, -1]) < 0.1


@needs_kernels
def test_a_short_prefill_of_block_layers_runs_natively_like_the_model_itself():
    """Two prompts as rows of the native step (each block unpacked once per four rows), against the
    model's forward, which runs each block layer of so few rows through the same kernel."""
    from lmforge.inference import engine

    torch.manual_seed(0)
    model, _ = block_model()
    prompts = [torch.randint(0, 96, (9,)).tolist(), torch.randint(0, 96, (5,)).tolist()]
    native, reference = KVCache(model.config, 2, 32), KVCache(model.config, 2, 32)
    with torch.no_grad():
        ours = engine.native_prefill(model, prompts, native, [0, 0], [0, 1])
        theirs = torch.stack(
            [
                model.hidden_states(torch.tensor([prompt]), reference, torch.tensor([0]), torch.tensor([row]))[0, -1]
                for row, prompt in enumerate(prompts)
            ]
        )
        assert relative_error(ours, model.logits(theirs)) < 1e-4


def test_a_block_model_saves_and_loads_as_an_lmforge_checkpoint(tmp_path):
    from lmforge.formats.checkpoint import load_model, save_model
    from lmforge.tokenizer import CharTokenizer

    torch.manual_seed(0)
    model, _ = block_model()
    save_model(tmp_path / "blocks", model, CharTokenizer("".join(chr(c) for c in range(32, 32 + 93))))
    loaded, _, _ = load_model(tmp_path / "blocks")
    assert loaded.blocks[0].attention.qkv.segments == model.blocks[0].attention.qkv.segments
    tokens = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])


@pytest.mark.slow
@needs_kernels
def test_compiled_decoding_calls_the_block_kernel_as_an_operator():
    """torch.compile's decode step (tens of seconds to compile) keeps the block kernel as one custom
    operator per layer and gives the same tokens as the uncompiled path."""
    from lmforge.inference.generate import SamplingConfig, generate_tokens

    torch.manual_seed(0)
    model, _ = block_model()
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    assert list(generate_tokens(model, [3, 4, 5], sampling, compile=True)) == list(
        generate_tokens(model, [3, 4, 5], sampling)
    )


@pytest.mark.parametrize("type_name", list(GGUF_BLOCK_TYPES))
@needs_kernels
def test_block_matvec_of_rows_together_equals_each_row_alone(type_name):
    """Eleven rows take the 4-row path twice (each block unpacked once for 4 rows of x) and three
    single rows: every row's result is the one it gets alone, to the bit."""
    blocks = torch.from_numpy(random_gguf_blocks(type_name, 45, 768, seed=9)).reshape(-1)
    table = segment_table(((type_name, 45),))
    x, bias = torch.randn(11, 768), torch.randn(45)
    together = kernels.matvec_blocks(x, blocks, table, 45, bias)
    alone = torch.cat([kernels.matvec_blocks(x[row : row + 1], blocks, table, 45, bias) for row in range(11)])
    assert torch.equal(together, alone)


@needs_kernels
def test_block_matvec_gives_the_same_bits_with_and_without_vnni(tmp_path):
    """Where the CPU has AVX-512 VNNI the block kernels use vpdpbusd / vpdpwssd for the integer sums:
    the same integers as AVX2's maddubs + madd, so every result equals the AVX2 path's bit for bit
    (LMFORGE_NO_VNNI=1, in a fresh process since the check is made once per process)."""
    import subprocess
    import sys

    types = list(GGUF_BLOCK_TYPES)
    x = torch.randn(5, 768)
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_gguf_blocks import random_gguf_blocks
from lmforge.inference import kernels
from lmforge.inference.quantize import segment_table
x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
results = {{}}
for type_name in {types!r}:
    blocks = torch.from_numpy(random_gguf_blocks(type_name, 45, 768, seed=3)).reshape(-1)
    table = segment_table(((type_name, 45),))
    results[type_name] = torch.cat([kernels.matvec_blocks(x, blocks, table, 45, None),
                                    kernels.matvec_blocks(x[:1], blocks, table, 45, None)])
torch.save(results, sys.argv[1])
"""
    outputs = []
    for environment in ({}, {"LMFORGE_NO_VNNI": "1"}):
        target = tmp_path / f"out{len(outputs)}.pt"
        env = {**os.environ, **environment, "PYTHONPATH": str(Path(__file__).parents[2])}
        subprocess.run([sys.executable, "-c", script, str(target)], check=True, env=env)
        outputs.append(torch.load(target, weights_only=True))
    for type_name in types:
        assert torch.equal(outputs[0][type_name], outputs[1][type_name]), type_name
