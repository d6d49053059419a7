import math

import pytest
import torch

from lmforge.data import TokenDataset
from lmforge.evaluate import evaluate_loss
from lmforge.model import ModelConfig, Transformer


def test_uniform_model_has_closed_form_perplexity_and_bpb(char_dataset):
    dataset = TokenDataset(char_dataset, "val")
    tokenizer = dataset.tokenizer()
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layers=1, n_heads=2, d_model=16))
    torch.nn.init.zeros_(model.lm_head.weight)  # zero logits: every token has probability 1/V
    result = evaluate_loss(model, dataset, tokenizer.token_byte_lengths(), block_size=16)
    vocab = tokenizer.vocab_size
    assert abs(result["loss"] - math.log(vocab)) < 1e-5
    assert abs(result["perplexity"] - vocab) < 1e-2
    # Char tokens of ASCII text are one byte each, except end-of-text separators (zero bytes).
    windows = list(dataset.iterate(16, 8))
    targets = torch.cat([t for _, t in windows]).flatten()
    text_tokens = int((targets != tokenizer.eos_id).sum())
    assert result["bits_per_byte"] == pytest.approx(math.log2(vocab) * len(targets) / text_tokens, rel=1e-6)


def test_evaluation_respects_max_tokens_and_restores_mode(char_dataset):
    dataset = TokenDataset(char_dataset, "val")
    model = Transformer(
        ModelConfig(vocab_size=dataset.tokenizer().vocab_size, block_size=16, n_layers=1, n_heads=2, d_model=16)
    )
    model.train()
    result = evaluate_loss(model, dataset, block_size=16, max_tokens=64)
    assert result["tokens"] == 64 and model.training
