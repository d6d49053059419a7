"""BERT encoder and sentence embeddings against transformers (same weights, same tokens)."""

from types import SimpleNamespace

import pytest
import torch

from lmforge.apps.encoder import (
    SentenceEmbedder,
    builtin_encoder_path,
    embed,
    length_batches,
    special_tokens_around_text,
    truncate_dimensions,
)
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


def transformers_embeddings(texts: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe with transformers' BertModel, one text at a time (no padding at all)."""
    transformers = pytest.importorskip("transformers")
    folder = builtin_encoder_path("all-minilm-l6-v2")
    reference = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    vectors = []
    for text in texts:
        batch = tokenizer([text], truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            vectors.append(torch.nn.functional.normalize(reference(**batch).last_hidden_state.mean(1), dim=-1))
    return torch.cat(vectors)


def test_mixed_lengths_come_back_in_input_order_and_match_transformers(embedder, monkeypatch):
    """Batches are cut from the texts sorted by length; the vectors still follow the input order, and each
    matches transformers' (3 batches of 4, padded ones and one over the 256-token truncation)."""
    words = " ".join(SENTENCES[:4]).split()
    lengths = [40, 2, 17, 1, 300, 9, 25, 5, 60, 3, 12, 33]
    texts = [" ".join(words[i % len(words)] for i in range(length)) for length in lengths]
    monkeypatch.setattr(embedder, "batch_size", 4)
    ours = embedder.embed(texts)
    cosine = (ours * transformers_embeddings(texts)).sum(-1)
    assert cosine.min() > 0.9999
    assert max(len(ids) for ids in embedder.tokenize(texts)) == embedder.max_tokens == 256


def test_token_ids_embed_as_their_text(embedder):
    """Ids of the model's own tokenizer, without special tokens, are framed and truncated as text is."""
    texts = [SENTENCES[1], " ".join(SENTENCES) * 20]  # the second is truncated
    ids = [embedder.tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    framed = embedder.frame_token_ids(ids)
    assert framed == embedder.tokenize(texts)
    assert torch.allclose(embedder.embed_tokens(framed), embedder.embed(texts), atol=1e-6)


def test_truncated_dimensions_are_the_renormalised_prefix():
    vectors = torch.tensor([[3.0, 4.0, 12.0], [0.0, -2.0, 1.0]]) / 13
    assert torch.allclose(truncate_dimensions(vectors, 2), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    assert torch.allclose(truncate_dimensions(vectors, 3), torch.nn.functional.normalize(vectors, dim=-1))


def test_length_batches_bound_padding_and_cover_every_index_once():
    lengths = [40, 2, 17, 1, 300, 9, 25, 5, 45, 3, 12, 33, 70, 70, 70, 70]
    batches = length_batches(lengths, max_batch=4, padding_slack=0.2)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    in_order = [lengths[index] for batch in batches for index in batch]
    assert in_order == sorted(lengths)
    for batch in batches:
        sizes = [lengths[index] for index in batch]
        assert len(batch) <= 4 and (len(batch) == 1 or max(sizes) * len(sizes) <= 1.2 * sum(sizes))
    assert [70, 70, 70, 70] in [[lengths[index] for index in batch] for batch in batches]  # nothing padded: full
    assert len(length_batches(lengths, max_batch=4, padding_slack=1e9)) == 4  # no bound: batches of 4


def test_special_tokens_around_text_are_read_from_the_post_processor(embedder):
    assert (embedder.text_start, embedder.text_end) == (
        [embedder.tokenizer.token_to_id("[CLS]")],
        [embedder.tokenizer.token_to_id("[SEP]")],
    )

    class Rewriting:  # a post-processor that replaces the text's own tokens cannot frame token ids
        def encode(self, text, add_special_tokens=True):
            return SimpleNamespace(ids=[1, 9, 2] if add_special_tokens else [5])

    with pytest.raises(LmforgeError, match="post-processor"):
        special_tokens_around_text(Rewriting())
