"""`lmforge quantize` and `lmforge eval` on the families past Llama, read from GGUF: Gemma 3 and Qwen3."""

import math

import pytest
import torch

from lmforge.evaluation.evaluate import text_perplexity
from lmforge.evaluation.quantization import quantize_and_save
from lmforge.formats.gguf import load_gguf, save_gguf
from lmforge.formats.loading import load
from lmforge.tokenizer import BPETokenizer

from ..conftest import make_corpus
from ..formats.test_gguf_architectures import ARCHITECTURES, random_model


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([make_corpus(100)], vocab_size=300)


@pytest.mark.parametrize("case", ["qwen3", "gemma3-alternating"])
def test_quantize_keeps_the_architecture_and_its_predictions(tmp_path, bpe, case):
    switches, _ = ARCHITECTURES[case]
    source = save_gguf(random_model(bpe.vocab_size, switches), bpe, tmp_path / "m.gguf", "f32")
    # int8 in 32-column groups: GGUF's Q8_0 blocks, which the export below writes as they are
    report = quantize_and_save(str(source), str(tmp_path / "q8"), 8, 32, eval_text=make_corpus(30), eval_tokens=256)
    assert report["mean_kl"] < 0.01
    reference, _ = load_gguf(source)
    quantized, _ = load(tmp_path / "q8")
    assert quantized.config == reference.config
    exported, _ = load_gguf(save_gguf(quantized, bpe, tmp_path / "q8.gguf", "q8_0"))
    tokens = torch.randint(0, bpe.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # Q8_0 keeps each block's scale in fp16: logits of +-20 move by a few hundredths
        assert (exported(tokens)[0] - quantized(tokens)[0]).abs().max() < 0.05


def test_eval_scores_a_gemma3_file_as_the_model_it_came_from(tmp_path, bpe):
    """Perplexity over a text longer than the context and the sliding window, in overlapping windows."""
    model = random_model(bpe.vocab_size, ARCHITECTURES["gemma3-alternating"][0])
    loaded, tokenizer = load_gguf(save_gguf(model, bpe, tmp_path / "m.gguf", "f32"))
    text = make_corpus(40)
    ours = text_perplexity(loaded, tokenizer, text, window=64, stride=32)
    original = text_perplexity(model, bpe, text, window=64, stride=32)
    assert ours["tokens"] == len(bpe.encode(text)) and ours["tokens"] > 96
    assert ours["loss"] == pytest.approx(original["loss"], rel=1e-5) and math.isfinite(ours["loss"])
