"""BERT encoder and sentence embeddings against transformers (same weights, same tokens)."""

import pytest
import torch

from lmforge.apps.encoder import SentenceEmbedder, builtin_encoder_path, embed
from lmforge.errors import LmforgeError

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, I loved every minute of it!",
    "Quantum computers use qubits instead of bits.",
    "短い日本語の文も入れておきます。",
]


@pytest.fixture(scope="module")
def embedder():
    try:
        return SentenceEmbedder()
    except LmforgeError as error:  # the wheel is installed by `make setup`
        pytest.skip(str(error))


def test_embeddings_match_transformers_mean_pooling(embedder):
    transformers = pytest.importorskip("transformers")
    folder = builtin_encoder_path("all-minilm-l6-v2")
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = embedder.embed(SENTENCES)
    cosine = (ours * expected).sum(-1)
    assert cosine.min() > 0.9999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_padding_does_not_change_an_embedding(embedder):
    """Alone or batched with a much longer text (so padded), a sentence gets the same vector."""
    alone = embedder.embed([SENTENCES[0]])[0]
    together = embedder.embed([SENTENCES[0], " ".join(SENTENCES) * 3])[0]
    assert torch.allclose(alone, together, atol=1e-5)


def test_similar_sentences_are_closer(embedder):
    vectors = embed(["The cat sits on the mat.", "A cat is sitting on a rug.", "Interest rates rose again."])
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
